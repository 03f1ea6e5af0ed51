"""Handlers for `/v2/<name>/blobs/<digest>`: GET and HEAD (FileResponse: sendfile, Range -> 206
with Content-Range) and DELETE."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .server_storage import RegistryStorage


class BlobHandlers:
    def __init__(self, storage: RegistryStorage):
        self.storage = storage

    async def get(self, request: web.Request) -> web.StreamResponse:
        """GET and HEAD. aiohttp's FileResponse sends the file with sendfile(2) (zero-copy, no
        TLS here), answers a Range with 206 + Content-Range and an unsatisfiable one with 416."""
        digest = request.match_info["digest"]
        path, _ = await asyncio.to_thread(self.storage.blob, request.match_info["name"], digest)
        return web.FileResponse(path, chunk_size=1 << 20, headers={
            "Docker-Content-Digest": digest,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            # Content-addressed: the bytes behind this URL never change.
            "Cache-Control": "max-age=31536000, immutable",
        })

    async def delete(self, request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        await asyncio.to_thread(self.storage.delete_blob, request.match_info["name"], digest)
        return web.Response(status=202, headers={"Docker-Content-Digest": digest})
