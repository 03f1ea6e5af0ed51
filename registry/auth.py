"""Registry credentials and the two auth schemes of the distribution spec.

Credentials come from ZREG_USERNAME/ZREG_PASSWORD, else from `zreg login` (one entry per host in
`$ZREG_HOME/auth.json`, default ~/.zreg/auth.json, mode 0600). On a 401 the client reads
`WWW-Authenticate`: `Basic` -> send the credentials; `Bearer realm=,service=,scope=` -> fetch a
token from the realm (with the credentials, if any) and retry. Tokens are cached per scope.
Credentials are never printed, and never sent to another host on a redirect.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from pathlib import Path

import requests

from .errors import ZregError
from .store import write_atomic


class AuthError(ZregError):
    pass


def zreg_home() -> Path:
    return Path(os.environ.get("ZREG_HOME") or Path.home() / ".zreg")


def auth_file() -> Path:
    return zreg_home() / "auth.json"


def _read_entries() -> dict:
    try:
        return json.loads(auth_file().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise AuthError(f"{auth_file()}: unreadable credentials file ({e})") from None


def save_credentials(host: str, username: str, password: str) -> Path:
    entries = _read_entries()
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    entries[host] = {"auth": token}
    path = auth_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    old_umask = os.umask(0o077)  # the temp file is created 0600 before any byte is written
    try:
        write_atomic(path, json.dumps(entries, indent=2, sort_keys=True).encode())
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return path


def remove_credentials(host: str) -> bool:
    entries = _read_entries()
    if host not in entries:
        return False
    del entries[host]
    write_atomic(auth_file(), json.dumps(entries, indent=2, sort_keys=True).encode())
    return True


def credentials_for(host: str) -> tuple[str, str] | None:
    user, password = os.environ.get("ZREG_USERNAME"), os.environ.get("ZREG_PASSWORD")
    if user and password is not None:
        return user, password
    entry = _read_entries().get(host)
    if not entry:
        return None
    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    return user, password


_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_PARAM.findall(rest))


class Auth:
    """Per-host authorisation state shared by a client's worker threads."""

    def __init__(self, host: str, credentials: tuple[str, str] | None = None):
        self.host = host
        self.credentials = credentials if credentials is not None else credentials_for(host)
        self._lock = threading.Lock()
        self._basic = False
        self._tokens: dict[str, tuple[str, float]] = {}   # scope -> (token, expiry)

    def headers(self, scope: str) -> dict[str, str]:
        with self._lock:
            token = self._tokens.get(scope)
            if token and token[1] > time.monotonic():
                return {"Authorization": f"Bearer {token[0]}"}
            if self._basic and self.credentials:
                return {"Authorization": _basic_header(self.credentials)}
        return {}

    def answer(self, challenge: str | None, scope: str, session: requests.Session,
               sent: str | None = None, verify=True) -> None:
        """Handle a 401 to a request that carried `sent` as its Authorization header: prepare
        headers for the retry, or raise AuthError. Threads race here, so a 401 to a request
        sent before another thread set up credentials is not a refusal."""
        if not challenge:
            raise AuthError(f"{self.host}: authentication required, but the registry gave no challenge")
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self.credentials:
                raise AuthError(f"{self.host}: authentication required: run `zreg login {self.host}` "
                                "or set ZREG_USERNAME/ZREG_PASSWORD")
            if sent == _basic_header(self.credentials):
                raise AuthError(f"{self.host}: credentials for {self.credentials[0]!r} were refused")
            with self._lock:
                self._basic = True
            return
        if scheme != "bearer" or "realm" not in params:
            raise AuthError(f"{self.host}: unsupported authentication challenge {scheme!r}")
        query = {"service": params.get("service", "")}
        wanted = params.get("scope") or scope
        if wanted:
            query["scope"] = wanted
        headers = {"Authorization": _basic_header(self.credentials)} if self.credentials else {}
        try:
            resp = session.get(params["realm"], params=query, headers=headers, timeout=30, verify=verify)
        except requests.RequestException as e:
            raise AuthError(f"{self.host}: token service {params['realm']} unreachable ({e})") from None
        if resp.status_code in (401, 403):
            who = f"credentials for {self.credentials[0]!r}" if self.credentials else "anonymous access"
            raise AuthError(f"{self.host}: {who} refused by the token service")
        if resp.status_code != 200:
            raise AuthError(f"{self.host}: token service answered {resp.status_code}")
        body = resp.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise AuthError(f"{self.host}: token service gave no token")
        expiry = time.monotonic() + max(30, int(body.get("expires_in", 300)) - 15)
        if sent == f"Bearer {token}":
            raise AuthError(f"{self.host}: the registry refused the token for {scope!r}")
        with self._lock:
            self._tokens[scope] = (token, expiry)


def _basic_header(credentials: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
