"""Real and faulty registries for transfer tests, on free loopback ports, started and stopped
by the tests themselves.

- `cncf_registry(tmp, htpasswd=None)`: the CNCF distribution registry (`docker-registry`).
- `FaultProxy(upstream)`: an HTTP proxy in front of a registry that can answer 500s, drop a
  connection mid-body, flip a byte, throttle, and demand Bearer tokens from its own token
  endpoint; it logs what it forwarded.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code in (200, 401):
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s")


@contextlib.contextmanager
def cncf_registry(tmp: Path, htpasswd: Path | None = None):
    """Yields 'host:port' of a fresh CNCF registry storing under tmp."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise RuntimeError("docker-registry is not installed (`apt-get install docker-registry`)")
    port = free_port()
    auth = (f"auth:\n  htpasswd:\n    realm: zreg-test\n    path: {htpasswd}\n" if htpasswd else "")
    config = tmp / f"registry-{port}.yml"
    config.write_text(f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {tmp / f'registry-data-{port}'}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: {secrets.token_hex(8)}
{auth}""")
    # Its log goes to a file: an unread pipe would fill up and stall the registry.
    log = open(tmp / f"registry-{port}.log", "wb")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/", proc=proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@dataclass
class Faults:
    fail_requests: int = 0            # answer 500 to this many blob/manifest requests first
    drop_after: int | None = None     # close blob GET bodies after this many bytes (once per blob)
    flip_byte: bool = False           # flip one byte in every blob GET body
    bytes_per_second: float | None = None
    bearer: tuple[str, str] | None = None   # (user, password) the token endpoint accepts
    log: list = field(default_factory=list)  # (method, path, range header, bytes sent, status)
    _dropped: set = field(default_factory=set)


class FaultProxy:
    """A threaded proxy to `upstream` (host:port) that injects the faults in `self.faults`."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.faults = Faults()
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy._handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _auth_ok(self, h) -> bool:
        f = self.faults
        if f.bearer is None:
            return True
        if h.path.startswith("/token"):
            expected = "Basic " + base64.b64encode(f"{f.bearer[0]}:{f.bearer[1]}".encode()).decode()
            if h.headers.get("Authorization") == expected:
                self._send(h, 200, b'{"token": "%s", "expires_in": 300}' % self.token.encode(),
                           {"Content-Type": "application/json"})
            else:
                self._send(h, 401, b'{"details": "bad credentials"}', {"Content-Type": "application/json"})
            return False
        if h.headers.get("Authorization") == f"Bearer {self.token}":
            return True
        challenge = (f'Bearer realm="http://{self.host}/token",service="zreg-test",'
                     f'scope="repository:library/x:pull"')
        self._send(h, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}',
                   {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
        return False

    def _send(self, h, status: int, body: bytes, headers: dict) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _handle(self, h) -> None:
        f = self.faults
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        if not self._auth_ok(h):
            return
        is_blob_get = h.command == "GET" and "/blobs/sha256:" in h.path
        if f.fail_requests > 0 and ("/blobs/" in h.path or "/manifests/" in h.path):
            f.fail_requests -= 1
            f.log.append((h.command, h.path, None, 0, 500))
            self._send(h, 500, b'{"errors":[{"code":"UNKNOWN","message":"injected"}]}', {})
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "authorization", "content-length")}
        resp = requests.request(h.command, f"http://{self.upstream}{h.path}", headers=headers, data=body,
                                stream=True, allow_redirects=False, timeout=30)
        h.send_response(resp.status_code)
        for k, v in resp.headers.items():
            if k.lower() in ("content-length", "transfer-encoding", "connection"):
                continue
            if k.lower() == "location" and self.upstream in v:
                v = v.replace(self.upstream, self.host)
            h.send_header(k, v)
        content_length = resp.headers.get("Content-Length")
        if content_length is not None:
            h.send_header("Content-Length", content_length)
        h.end_headers()
        sent = 0
        if h.command != "HEAD":
            drop = f.drop_after is not None and is_blob_get and h.path not in f._dropped
            for chunk in resp.iter_content(64 << 10):
                if drop and sent + len(chunk) > f.drop_after:
                    chunk = chunk[: f.drop_after - sent]
                    h.wfile.write(chunk)
                    sent += len(chunk)
                    f._dropped.add(h.path)
                    h.close_connection = True
                    f.log.append((h.command, h.path, h.headers.get("Range"), sent, "dropped"))
                    h.wfile.flush()
                    h.connection.shutdown(socket.SHUT_RDWR)
                    return
                if f.flip_byte and is_blob_get and sent == 0 and chunk:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                h.wfile.write(chunk)
                sent += len(chunk)
                if f.bytes_per_second:
                    time.sleep(len(chunk) / f.bytes_per_second)
        resp.close()
        f.log.append((h.command, h.path, h.headers.get("Range"), sent, resp.status_code))

    def blob_bytes_sent(self) -> int:
        return sum(entry[3] for entry in self.faults.log if entry[0] == "GET" and "/blobs/" in entry[1])
