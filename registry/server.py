"""`zreg serve`: the OCI distribution API (`/v2/`) over the local store.

    add_registry_routes(app, store, ...)   adds /v2/ to any aiohttp app (the image API shares it)
    make_app(store, ...)                   a new app with only the registry
    BackgroundServer(app).start()          runs an app on a loopback port in a thread (tests)
    run(app, host, port)                   runs until SIGINT/SIGTERM (the CLI)

Modules, one idea each:
    server_storage.py     repositories/references/blobs mapped onto the store (no HTTP)
    uploads.py            upload sessions on disk (no HTTP)
    server_auth.py        read-only / htpasswd rules;  htpasswd.py  the file format
    server_errors.py      OCI error JSON and the one exception -> code/status table
    server_blobs.py, server_uploads.py, server_manifests.py, server_discovery.py   handlers
Every handler is wrapped by `_endpoint`: auth first, then the handler, and any zreg exception
becomes the spec's error JSON there, so handlers only parse, call and answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from aiohttp import web

from . import oci_paths
from .errors import ZregError
from .htpasswd import Htpasswd
from .names import default_host
from .server_auth import PULL, PUSH, Auth
from .server_blobs import BlobHandlers
from .server_discovery import DiscoveryHandlers
from .server_errors import OciError, from_exception
from .server_manifests import ManifestHandlers
from .server_storage import RegistryStorage
from .server_uploads import UploadHandlers
from .store import Store
from .uploads import UPLOAD_MAX_AGE, Uploads

log = logging.getLogger("zreg.serve")

REGISTRY = web.AppKey("zreg.registry", RegistryStorage)


def _endpoint(handler, access: str, auth: Auth, challenge_anonymous: bool = False):
    async def endpoint(request: web.Request) -> web.StreamResponse:
        try:
            await auth.check(request, access, challenge_anonymous)
            response = await handler(request)
        except OciError as e:
            response = e.response()
        except ZregError as e:
            response = from_exception(e).response()
        except web.HTTPException:
            raise
        except ConnectionError as e:  # the client went away mid-body: nobody reads the answer
            log.info("%s %s: %s", request.method, request.path, e)
            response = web.Response(status=400)
        except Exception:  # a bug or an OS error: log it, answer in the spec's form
            log.exception("%s %s failed", request.method, request.path)
            response = OciError(500, "UNKNOWN", "internal server error (see the server log)").response()
        response.headers["Docker-Distribution-API-Version"] = "registry/2.0"
        return response
    return endpoint


async def _base(request: web.Request) -> web.Response:
    return web.json_response({})


def add_registry_routes(app: web.Application, store: Store, *, host_name: str | None = None,
                        htpasswd: Htpasswd | None = None, auth_reads: bool = False,
                        upload_max_age: float = UPLOAD_MAX_AGE) -> RegistryStorage:
    """Add the /v2/ endpoints over `store` to `app` (and a purge of idle uploads to its life)."""
    storage = RegistryStorage(store, host_name or default_host())
    uploads = Uploads(store)
    auth = Auth(htpasswd, auth_reads)
    blobs, manifests = BlobHandlers(storage), ManifestHandlers(storage)
    upload, discovery = UploadHandlers(storage, uploads), DiscoveryHandlers(storage)
    R = oci_paths.ROUTES
    # Order matters: `{name:.+}` would also match the fixed words of later routes.
    routes = [
        ("GET", R["base"], _base, PULL),
        ("HEAD", R["base"], _base, PULL),
        ("GET", R["catalog"], discovery.catalog, PULL),
        ("POST", R["uploads"], upload.start, PUSH),
        ("PATCH", R["upload"], upload.patch, PUSH),
        ("PUT", R["upload"], upload.finish, PUSH),
        ("GET", R["upload"], upload.status, PUSH),
        ("DELETE", R["upload"], upload.cancel, PUSH),
        ("GET", R["blob_any"], blobs.get, PULL),
        ("HEAD", R["blob_any"], blobs.get, PULL),
        ("DELETE", R["blob_any"], blobs.delete, PUSH),
        ("GET", R["manifest"], manifests.get, PULL),
        ("HEAD", R["manifest"], manifests.get, PULL),
        ("PUT", R["manifest"], manifests.put, PUSH),
        ("DELETE", R["manifest"], manifests.delete, PUSH),
        ("GET", R["tags"], discovery.tags, PULL),
        ("GET", R["referrers"], manifests.referrers, PULL),
    ]
    for method, path, handler, access in routes:
        endpoint = _endpoint(handler, access, auth, challenge_anonymous=path == R["base"])
        app.router.add_route(method, path, endpoint)
    app[REGISTRY] = storage

    async def purge_uploads(app: web.Application):
        async def loop():
            while True:
                removed = await asyncio.to_thread(uploads.purge, upload_max_age)
                if removed:
                    log.info("purged %d idle upload sessions", removed)
                await asyncio.sleep(min(3600.0, max(60.0, upload_max_age / 2)))
        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(purge_uploads)
    return storage


def make_app(store: Store, **options) -> web.Application:
    app = web.Application()
    add_registry_routes(app, store, **options)
    return app


def parse_addr(addr: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ZregError(f"invalid address {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:11435")
    return host, int(port)


def run(app: web.Application, host: str, port: int, on_ready=None) -> None:
    """Serve until SIGINT or SIGTERM, then finish in-flight requests (a few seconds at most)."""
    async def announce(app):
        if on_ready:
            on_ready()
    app.on_startup.append(announce)
    web.run_app(app, host=host, port=port, print=None, shutdown_timeout=5.0, handle_signals=True)


class BackgroundServer:
    """An app served on a loopback port from a thread with its own event loop.

        with BackgroundServer(make_app(store)) as server:
            requests.get(server.url + "/v2/")
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread = threading.Thread(target=self._serve, name="zreg-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the server did not start in time")
        if self._error:
            raise self._error
        return self

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as e:
            self._error = e
            self._ready.set()
            loop.run_until_complete(runner.cleanup())
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
