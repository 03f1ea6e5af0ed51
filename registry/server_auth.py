"""Who may do what on `zreg serve`.

- No htpasswd: read-only. Pulls are open; pushes and deletes answer 405 UNSUPPORTED (the CNCF
  registry's answer in read-only mode: credentials would not help, so no challenge).
- With htpasswd: pushes and deletes need valid Basic credentials (401 UNAUTHORIZED with
  `WWW-Authenticate: Basic realm="zreg"` otherwise). Pulls stay open unless `auth_reads`.
  Credentials that are sent are always checked (wrong ones get 401 even on an open pull), so
  `docker login` means something; and `GET /v2/` challenges a client that sends none, because
  Docker learns from that version check alone whether to send credentials later.
"""

from __future__ import annotations

import asyncio
import base64
import binascii

from aiohttp import web

from .htpasswd import Htpasswd
from .server_errors import OciError

PULL, PUSH = "pull", "push"


class Auth:
    def __init__(self, htpasswd: Htpasswd | None, auth_reads: bool = False, realm: str = "zreg"):
        if auth_reads and htpasswd is None:
            raise ValueError("auth_reads needs an htpasswd file")
        self.htpasswd = htpasswd
        self.auth_reads = auth_reads
        self.realm = realm

    async def check(self, request: web.Request, access: str, challenge_anonymous: bool = False) -> None:
        """Raise OciError unless the request may have `access`."""
        if self.htpasswd is None:
            if access == PUSH:
                raise OciError(405, "UNSUPPORTED", "this registry is read-only: start `zreg serve "
                               "--htpasswd FILE` to allow pushes and deletes")
            return
        header = request.headers.get("Authorization")
        if header is None and access == PULL and not self.auth_reads and not challenge_anonymous:
            return
        if header is None or not await self._valid(header):
            message = "authentication required" if header is None else "invalid credentials"
            raise OciError(401, "UNAUTHORIZED", message, {"access": access},
                           {"WWW-Authenticate": f'Basic realm="{self.realm}"'})

    async def _valid(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        return await asyncio.to_thread(self.htpasswd.verify, user, password)
