"""A client for OCI distribution registries: the HTTP calls, retries and auth.

Plain http for loopback hosts (and with `insecure`), https otherwise. Every request retries
with exponential back-off on connection errors, 5xx and 429 (a bounded number of times); the
read timeout is the stall timeout. A 401 is answered once through `Auth` and the request
retried. Each worker thread has its own `requests.Session` (sessions are not thread-safe);
`session_factory` lets tests inject their own transport.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

import requests
from requests.adapters import HTTPAdapter

from . import oci_paths
from .auth import Auth, AuthError
from .errors import ModelNotFound, ZregError
from .names import is_loopback

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_ACCEPT = ", ".join([DOCKER_MANIFEST, OCI_MANIFEST, OCI_INDEX])
RETRY_STATUS = {429, 500, 502, 503, 504}


class TransferError(ZregError):
    pass


class RegistryUnreachable(TransferError):
    pass


def registry_error(resp: requests.Response) -> str:
    """The registry's own words, from its error JSON when it sent one."""
    try:
        errors = resp.json().get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or resp.text[:200]
    except ValueError:
        return resp.text[:200].strip() or resp.reason


class RegistryClient:
    def __init__(self, host: str, *, insecure: bool = False, auth: Auth | None = None,
                 retries: int = 5, backoff: float = 0.5, stall_timeout: float = 30.0,
                 session_factory: Callable[[], requests.Session] = requests.Session):
        self.host = host
        scheme = "http" if insecure or is_loopback(host) else "https"
        self.base = f"{scheme}://{host}"
        self.auth = auth or Auth(host)
        self.retries = retries
        self.backoff = backoff
        self.timeout = (10.0, stall_timeout)
        self._factory = session_factory
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            session = self._factory()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return self._local.session

    def request(self, method: str, path: str, *, scope: str, headers: dict | None = None,
                body: Callable[[], object] | None = None, stream: bool = False,
                expect: Iterable[int] = (200,), allow_redirects: bool = True) -> requests.Response:
        """Send with retries; `body` is a callable so a retry can re-create a streamed body."""
        url = path if path.startswith("http") else self.base + path
        answered = False
        attempt = 0
        while True:
            all_headers = {**(headers or {}), **self.auth.headers(scope)}
            try:
                resp = self.session.request(method, url, headers=all_headers, data=body() if body else None,
                                            stream=stream, timeout=self.timeout, allow_redirects=allow_redirects)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                if attempt >= self.retries:
                    raise RegistryUnreachable(f"{self.host}: {method} {path} failed after {attempt + 1} tries: "
                                              f"{type(e).__name__}") from None
                self._sleep(attempt)
                attempt += 1
                continue
            if resp.status_code == 401 and not answered:
                answered = True
                resp.close()
                self.auth.answer(resp.headers.get("WWW-Authenticate"), scope, self.session,
                                 sent=all_headers.get("Authorization"))
                continue
            if resp.status_code in RETRY_STATUS and attempt < self.retries:
                resp.close()
                self._sleep(attempt, resp.headers.get("Retry-After"))
                attempt += 1
                continue
            if resp.status_code in expect:
                return resp
            return self._fail(method, path, resp)

    def _sleep(self, attempt: int, retry_after: str | None = None) -> None:
        delay = self.backoff * (2 ** attempt)
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), 30.0))
        time.sleep(min(delay, 30.0))

    def _fail(self, method: str, path: str, resp: requests.Response):
        detail = registry_error(resp)
        resp.close()
        if resp.status_code in (401, 403):
            raise AuthError(f"{self.host}: access to {path} refused ({resp.status_code}: {detail})")
        raise TransferError(f"{self.host}: {method} {path} answered {resp.status_code}: {detail}")

    # ---- the calls push and pull need ----------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str]:
        scope = f"repository:{repository}:pull"
        try:
            resp = self.request("GET", oci_paths.manifest(repository, reference), scope=scope,
                                headers={"Accept": MANIFEST_ACCEPT}, expect=(200,))
        except TransferError as e:
            if " 404" in str(e) or "answered 404" in str(e):
                raise ModelNotFound(f"{self.host}/{repository}:{reference}: no such model or tag on the "
                                    f"registry ({str(e).split(': ', 2)[-1]})") from None
            raise
        return resp.content, resp.headers.get("Content-Type", "").split(";")[0].strip()

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        resp = self.request("PUT", oci_paths.manifest(repository, reference),
                            scope=f"repository:{repository}:pull,push",
                            headers={"Content-Type": media_type}, body=lambda: data, expect=(201, 200, 202))
        return resp.headers.get("Docker-Content-Digest", "")

    def blob_size(self, repository: str, digest: str) -> int | None:
        """HEAD a blob: its size, or None when the registry does not have it."""
        resp = self.request("HEAD", oci_paths.blob(repository, digest), scope=f"repository:{repository}:pull",
                            expect=(200, 404))
        resp.close()
        if resp.status_code == 404:
            return None
        return int(resp.headers.get("Content-Length", -1))

    def open_blob(self, repository: str, digest: str, offset: int = 0) -> requests.Response:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        return self.request("GET", oci_paths.blob(repository, digest), scope=f"repository:{repository}:pull",
                            headers=headers, stream=True, expect=(200, 206))

    def mount(self, repository: str, digest: str, source: str) -> bool:
        """Cross-repository mount; True when the registry mounted it (201)."""
        resp = self.request("POST", oci_paths.uploads(repository, mount=digest, **{"from": source}),
                            scope=f"repository:{repository}:pull,push repository:{source}:pull",
                            expect=(201, 202))
        resp.close()
        if resp.status_code == 202:  # a session was opened instead: cancel it, we upload later
            self._cancel(repository, resp.headers.get("Location"))
            return False
        return True

    def _cancel(self, repository: str, location: str | None) -> None:
        if location:
            try:
                self.request("DELETE", self._absolute(location), scope=f"repository:{repository}:pull,push",
                             expect=(204, 200, 202, 404, 405))
            except ZregError:
                pass  # best effort: registries purge abandoned sessions themselves

    def _absolute(self, location: str) -> str:
        return location if location.startswith("http") else self.base + location

    def start_upload(self, repository: str) -> tuple[str, int]:
        resp = self.request("POST", oci_paths.uploads(repository), scope=f"repository:{repository}:pull,push",
                            expect=(202,))
        resp.close()
        return self._absolute(resp.headers["Location"]), int(resp.headers.get("OCI-Chunk-Min-Length", 0) or 0)

    def upload_chunk(self, repository: str, location: str, start: int, length: int,
                     body: Callable[[], object]) -> str:
        resp = self.request("PATCH", location, scope=f"repository:{repository}:pull,push",
                            headers={"Content-Type": "application/octet-stream",
                                     "Content-Range": f"{start}-{start + length - 1}",
                                     "Content-Length": str(length)}, body=body, expect=(202,))
        resp.close()
        return self._absolute(resp.headers.get("Location", location))

    def finish_upload(self, repository: str, location: str, digest: str,
                      body: Callable[[], object] | None = None, length: int = 0) -> None:
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        resp = self.request("PUT", f"{location}{sep}digest={digest}", scope=f"repository:{repository}:pull,push",
                            headers=headers, body=body or (lambda: b""), expect=(201, 204))
        resp.close()
