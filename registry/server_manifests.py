"""Handlers for `/v2/<name>/manifests/<reference>` (GET, HEAD, PUT, DELETE) and
`/v2/<name>/referrers/<digest>`. Manifests are served byte for byte with the stored media type."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from . import oci_paths
from .manifest import MAX_MANIFEST_BYTES
from .server_common import read_capped
from .server_storage import OCI_INDEX, RegistryStorage, manifest_too_large


class ManifestHandlers:
    def __init__(self, storage: RegistryStorage):
        self.storage = storage

    async def get(self, request: web.Request) -> web.Response:
        """GET and HEAD (aiohttp sends no body for HEAD but keeps Content-Length)."""
        data, info = await asyncio.to_thread(self.storage.get_manifest, request.match_info["name"],
                                             request.match_info["reference"])
        return web.Response(body=data, headers={"Content-Type": info.media_type,
                                                "Docker-Content-Digest": info.digest,
                                                "ETag": f'"{info.digest}"'})

    async def put(self, request: web.Request) -> web.Response:
        repository, reference = request.match_info["name"], request.match_info["reference"]
        # Refuse an announced oversize body before reading it; cap what we read otherwise.
        if request.content_length is not None and request.content_length > MAX_MANIFEST_BYTES:
            raise manifest_too_large(request.content_length)
        data = await read_capped(request, MAX_MANIFEST_BYTES)
        if len(data) > MAX_MANIFEST_BYTES:
            raise manifest_too_large(len(data))
        info = await asyncio.to_thread(self.storage.put_manifest, repository, reference, data,
                                       request.headers.get("Content-Type"))
        headers = {"Location": oci_paths.manifest(repository, info.digest),
                   "Docker-Content-Digest": info.digest}
        if info.subject:
            headers["OCI-Subject"] = info.subject  # tells the client we keep the referrers list
        return web.Response(status=201, headers=headers)

    async def delete(self, request: web.Request) -> web.Response:
        await asyncio.to_thread(self.storage.delete_manifest, request.match_info["name"],
                                request.match_info["reference"])
        return web.Response(status=202)

    async def referrers(self, request: web.Request) -> web.Response:
        artifact_type = request.query.get("artifactType")
        descriptors = await asyncio.to_thread(self.storage.referrers, request.match_info["name"],
                                              request.match_info["digest"], artifact_type)
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        headers = {"Content-Type": OCI_INDEX}  # as is: no charset parameter on a media type
        if artifact_type:
            headers["OCI-Filters-Applied"] = "artifactType"
        return web.Response(body=json.dumps(body).encode(), headers=headers)
