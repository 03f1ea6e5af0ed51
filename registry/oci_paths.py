"""The `/v2/...` paths of the OCI distribution API, built in one place for the client and the
server (the server's route patterns are the same templates with placeholders)."""

from __future__ import annotations

from urllib.parse import quote, urlencode

API_ROOT = "/v2/"


def blob(repository: str, digest: str) -> str:
    return f"/v2/{repository}/blobs/{digest}"


def manifest(repository: str, reference: str) -> str:
    return f"/v2/{repository}/manifests/{reference}"


def uploads(repository: str, **query: str) -> str:
    """POST target to start an upload; query may hold digest=, mount=, from=."""
    path = f"/v2/{repository}/blobs/uploads/"
    return f"{path}?{urlencode(query)}" if query else path


def upload(repository: str, session: str) -> str:
    return f"/v2/{repository}/blobs/uploads/{quote(session, safe='')}"


def tags(repository: str, n: int | None = None, last: str | None = None) -> str:
    query = {k: v for k, v in (("n", n), ("last", last)) if v is not None}
    return f"/v2/{repository}/tags/list" + (f"?{urlencode(query)}" if query else "")


def catalog(n: int | None = None, last: str | None = None) -> str:
    query = {k: v for k, v in (("n", n), ("last", last)) if v is not None}
    return "/v2/_catalog" + (f"?{urlencode(query)}" if query else "")


def referrers(repository: str, digest: str) -> str:
    return f"/v2/{repository}/referrers/{digest}"


# aiohttp route templates for the server: `{name}` may hold slashes.
ROUTES = {
    "base": "/v2/",
    "catalog": "/v2/_catalog",
    "blob": r"/v2/{name:.+}/blobs/{digest:sha256:[a-f0-9]{64}}",
    "blob_any": r"/v2/{name:.+}/blobs/{digest:[^/]+}",
    "uploads": "/v2/{name:.+}/blobs/uploads/",
    "upload": "/v2/{name:.+}/blobs/uploads/{session}",
    "manifest": "/v2/{name:.+}/manifests/{reference}",
    "tags": "/v2/{name:.+}/tags/list",
    "referrers": "/v2/{name:.+}/referrers/{digest}",
}
