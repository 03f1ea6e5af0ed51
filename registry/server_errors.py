"""OCI error responses for `zreg serve`, and the one table that maps zreg exceptions to them.

Body: `{"errors": [{"code": ..., "message": ..., "detail": ...}]}` with the distribution spec's
codes. Handlers raise `OciError` for what only HTTP knows (a bad header, auth) and let store
exceptions travel; `from_exception` turns those into the spec's code and status here, so no
handler picks a status for a store failure.
"""

from __future__ import annotations

import json

from aiohttp import web

from .errors import FormatError, InvalidName, ModelNotFound, StoreError, ZregError
from .server_storage import (BlobInUse, BlobUnknown, ManifestBlobUnknown, ManifestInvalid,
                             ManifestTooLarge, ManifestUnknown, RepositoryUnknown)
from .uploads import DigestInvalid, UploadInvalid, UploadRangeInvalid, UploadUnknown


class OciError(Exception):
    def __init__(self, status: int, code: str, message: str, detail=None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}
        return web.Response(status=self.status, text=json.dumps(body), content_type="application/json",
                            headers=self.headers)


# Subclasses before their bases: the first match wins.
_TABLE: list[tuple[type[BaseException], int, str]] = [
    (UploadUnknown, 404, "BLOB_UPLOAD_UNKNOWN"),
    (UploadRangeInvalid, 416, "BLOB_UPLOAD_INVALID"),
    (UploadInvalid, 400, "BLOB_UPLOAD_INVALID"),
    (DigestInvalid, 400, "DIGEST_INVALID"),
    (RepositoryUnknown, 404, "NAME_UNKNOWN"),
    (ManifestUnknown, 404, "MANIFEST_UNKNOWN"),
    (ManifestTooLarge, 413, "SIZE_INVALID"),
    (ManifestBlobUnknown, 400, "MANIFEST_BLOB_UNKNOWN"),
    (ManifestInvalid, 400, "MANIFEST_INVALID"),
    (BlobUnknown, 404, "BLOB_UNKNOWN"),
    (BlobInUse, 405, "UNSUPPORTED"),
    (InvalidName, 400, "NAME_INVALID"),
    (ModelNotFound, 404, "MANIFEST_UNKNOWN"),
    (FormatError, 400, "MANIFEST_INVALID"),
    (StoreError, 500, "UNKNOWN"),
    (ZregError, 500, "UNKNOWN"),
]


def from_exception(exc: ZregError) -> OciError:
    for kind, status, code in _TABLE:
        if isinstance(exc, kind):
            return OciError(status, code, str(exc), getattr(exc, "detail", None))
    return OciError(500, "UNKNOWN", str(exc))


def digest_invalid(value) -> OciError:
    return OciError(400, "DIGEST_INVALID", f"invalid digest {value!r}: expected sha256:<64 lowercase hex>",
                    {"digest": value})
