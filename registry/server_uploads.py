"""Handlers for `/v2/<name>/blobs/uploads/...` (push): start (with single-shot and mount),
PATCH a chunk, PUT to finish, GET status, DELETE to cancel. They parse the request and call
`Uploads` (registry/uploads.py); disk work runs in worker threads."""

from __future__ import annotations

import asyncio
import re
import weakref

from aiohttp import web

from .server_common import blob_created, read_batches, upload_headers
from .server_errors import OciError
from .server_storage import RegistryStorage
from .uploads import (DigestInvalid, UploadInvalid, UploadRangeInvalid, UploadSession, Uploads,
                      commit_writer, valid_digest)

# OCI sends `start-end`; some clients write `bytes start-end` or `bytes=start-end[/total]`.
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?")


def _content_range(request: web.Request) -> tuple[int, int] | None:
    """(start, length) from Content-Range, or None when the client sent none (streamed PATCH)."""
    value = request.headers.get("Content-Range")
    if value is None:
        return None
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if not match:
        raise UploadInvalid(f"invalid Content-Range {value!r}: expected <start>-<end>")
    start, end = int(match[1]), int(match[2])
    if end < start:
        raise UploadRangeInvalid(f"Content-Range {value!r} ends before it starts")
    length = end - start + 1
    if request.content_length is not None and request.content_length != length:
        raise UploadInvalid(f"Content-Range {value!r} is {length} bytes, Content-Length {request.content_length}")
    return start, length


class UploadHandlers:
    def __init__(self, storage: RegistryStorage, uploads: Uploads):
        self.storage = storage
        self.uploads = uploads
        # One request at a time per session: chunks are appended in order.
        self._busy: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._busy.get(session_id)
        if lock is None:
            lock = self._busy[session_id] = asyncio.Lock()
        return lock

    async def start(self, request: web.Request) -> web.Response:
        """POST: `?mount=&from=` (201 if the store has the blob), `?digest=` (single shot, 201),
        else a new session (202)."""
        repository = request.match_info["name"]
        self.storage.name(repository)
        query = request.query
        if "mount" in query:
            digest = valid_digest(query["mount"])
            # Blobs are global in the store, so `from` does not matter: any blob we hold mounts.
            if await asyncio.to_thread(self.storage.has_blob, digest):
                return blob_created(repository, digest)
        elif "digest" in query:
            digest = valid_digest(query["digest"])
            await self._single_shot(request, digest)
            return blob_created(repository, digest)
        session = await asyncio.to_thread(self.uploads.create, repository)
        return web.Response(status=202, headers=upload_headers(repository, session.id, 0))

    async def patch(self, request: web.Request) -> web.Response:
        repository, session_id = request.match_info["name"], request.match_info["session"]
        self.storage.name(repository)
        async with self._lock(session_id):
            session = await asyncio.to_thread(self.uploads.open, session_id, repository)
            size = await self._append(request, session)
        return web.Response(status=202, headers=upload_headers(repository, session_id, size))

    async def finish(self, request: web.Request) -> web.Response:
        """PUT `?digest=`: append the body (if any, a last chunk or the whole blob), then commit."""
        repository, session_id = request.match_info["name"], request.match_info["session"]
        self.storage.name(repository)
        if "digest" not in request.query:
            raise DigestInvalid("PUT of an upload needs ?digest=<the blob's digest>")
        digest = valid_digest(request.query["digest"])
        async with self._lock(session_id):
            session = await asyncio.to_thread(self.uploads.open, session_id, repository)
            if request.body_exists or "Content-Range" in request.headers:
                await self._append(request, session)
            await asyncio.to_thread(self.uploads.commit, session, digest)
        return blob_created(repository, digest)

    async def status(self, request: web.Request) -> web.Response:
        repository, session_id = request.match_info["name"], request.match_info["session"]
        self.storage.name(repository)
        session = await asyncio.to_thread(self.uploads.open, session_id, repository)
        size = await asyncio.to_thread(session.size)
        return web.Response(status=204, headers=upload_headers(repository, session_id, size))

    async def cancel(self, request: web.Request) -> web.Response:
        repository, session_id = request.match_info["name"], request.match_info["session"]
        self.storage.name(repository)
        async with self._lock(session_id):
            session = await asyncio.to_thread(self.uploads.open, session_id, repository)
            await asyncio.to_thread(self.uploads.cancel, session)
        return web.Response(status=204)

    async def _append(self, request: web.Request, session: UploadSession) -> int:
        """Append the body at the session's end; returns the session's new size."""
        declared = _content_range(request)
        try:
            appender = await asyncio.to_thread(self.uploads.append, session,
                                               declared[0] if declared else None)
        except UploadRangeInvalid as e:
            # 416 says where the session really ends, so the client can resume from there.
            size = await asyncio.to_thread(session.size)
            raise OciError(416, "BLOB_UPLOAD_INVALID", str(e), {"size": size},
                           upload_headers(session.repository, session.id, size)) from None
        try:
            async for batch in read_batches(request):
                await asyncio.to_thread(appender.write, batch)
            if declared and appender.written != declared[1]:
                await asyncio.to_thread(appender.rollback)
                raise UploadInvalid(f"Content-Range announced {declared[1]} bytes, the body had "
                                    f"{appender.written}; the chunk was dropped")
        finally:
            await asyncio.to_thread(appender.close)
        return appender.start + appender.written

    async def _single_shot(self, request: web.Request, digest: str) -> None:
        """POST ?digest= with the whole blob: stream it straight into the blob store."""
        writer = await asyncio.to_thread(self.storage.store.blobs.writer)
        try:
            async for batch in read_batches(request):
                await asyncio.to_thread(writer.write, batch)
            await asyncio.to_thread(commit_writer, self.storage.store, writer, digest)
        finally:
            await asyncio.to_thread(writer.abort)
