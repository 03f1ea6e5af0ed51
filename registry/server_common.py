"""What every `zreg serve` handler module shares: reading bodies, building common responses."""

from __future__ import annotations

from typing import AsyncIterator

from aiohttp import web

from . import oci_paths

# Bodies go to disk in batches this big: large enough that hashing and writing in a worker
# thread amortise the hand-off, small enough to bound memory per request.
BATCH = 8 << 20


async def read_batches(request: web.Request) -> AsyncIterator[bytes]:
    """The request body in batches of up to BATCH bytes (never the whole body in memory).
    If the client goes away, what did arrive is still handed over before the error, so an
    upload keeps it and the client can resume from the Range the status reports."""
    buffer = bytearray()
    try:
        async for chunk in request.content.iter_any():
            buffer += chunk
            if len(buffer) >= BATCH:
                yield bytes(buffer)
                buffer.clear()
    except ConnectionError:
        if buffer:
            yield bytes(buffer)
        raise
    if buffer:
        yield bytes(buffer)


async def read_capped(request: web.Request, limit: int) -> bytes:
    """The whole body, but at most limit + 1 bytes (so the caller can tell it was too big)."""
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > limit:
            break
    return bytes(data)


def blob_created(repository: str, digest: str) -> web.Response:
    """201 for a blob now in the store (uploaded, or mounted because it already was)."""
    return web.Response(status=201, headers={"Location": oci_paths.blob(repository, digest),
                                             "Docker-Content-Digest": digest})


def upload_headers(repository: str, session_id: str, size: int) -> dict:
    """Where an upload continues and what it holds. `Range` is inclusive, and `0-0` for an
    empty session too, as the CNCF registry sends it (clients expect that form)."""
    return {"Location": oci_paths.upload(repository, session_id),
            "Range": f"0-{max(size - 1, 0)}",
            "Docker-Upload-UUID": session_id}
