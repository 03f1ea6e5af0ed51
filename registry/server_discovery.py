"""Handlers for content discovery: `/v2/<name>/tags/list` and `/v2/_catalog`, both sorted
lexically, paged with `n` (page size) and `last` (exclusive), with a `Link: <...>; rel="next"`
header while more remain."""

from __future__ import annotations

import asyncio
import bisect

from aiohttp import web

from . import oci_paths
from .server_errors import OciError
from .server_storage import RegistryStorage


def paginate(items: list[str], query) -> tuple[list[str], int | None]:
    """(the page, n for the next page's link or None when this is the last page)."""
    last = query.get("last")
    if last is not None:
        items = items[bisect.bisect_right(items, last):]
    if "n" not in query:
        return items, None
    try:
        n = int(query["n"])
        if n < 0:
            raise ValueError
    except ValueError:
        # The CNCF registry's code for this; the spec lists none.
        raise OciError(400, "PAGINATION_NUMBER_INVALID", f"n must be a non-negative integer, got {query['n']!r}",
                       {"n": query["n"]}) from None
    more = n > 0 and len(items) > n
    return items[:n], n if more else None


def _link(path: str) -> dict:
    return {"Link": f'<{path}>; rel="next"'}


class DiscoveryHandlers:
    def __init__(self, storage: RegistryStorage):
        self.storage = storage

    async def tags(self, request: web.Request) -> web.Response:
        repository = request.match_info["name"]
        tags = await asyncio.to_thread(self.storage.tags, repository)
        page, n = paginate(tags, request.query)
        headers = _link(oci_paths.tags(repository, n=n, last=page[-1])) if n else {}
        return web.json_response({"name": repository, "tags": page}, headers=headers)

    async def catalog(self, request: web.Request) -> web.Response:
        repositories = await asyncio.to_thread(self.storage.catalog)
        page, n = paginate(repositories, request.query)
        headers = _link(oci_paths.catalog(n=n, last=page[-1])) if n else {}
        return web.json_response({"repositories": page}, headers=headers)
