"""htpasswd files in the bcrypt form the CNCF registry reads: one `user:$2y$...` line per user,
as `htpasswd -Bbn USER PASSWORD` writes them (`$2a$`/`$2b$` work too). Other hash kinds (MD5
`$apr1$`, `{SHA}`, crypt) are skipped, as the CNCF registry does.

bcrypt is slow on purpose (tens of ms a check) and a client sends credentials with every
request, so a successful check is remembered in memory as an HMAC under a per-process random
key; failures are always checked in full. The file is re-read when it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

import bcrypt

from .errors import ZregError

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
# Checked against for unknown users, so that a wrong user costs the same time as a wrong password.
_DUMMY_HASH = bcrypt.hashpw(b"zreg-unknown-user", bcrypt.gensalt(4))


class HtpasswdError(ZregError):
    exit_code = 2


class Htpasswd:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.skipped: list[str] = []    # users whose hash is not bcrypt
        self._users: dict[str, bytes] = {}
        self._stamp: tuple | None = None
        self._key = secrets.token_bytes(32)
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()
        self._reload()
        if not self._users:
            raise HtpasswdError(f"{self.path}: no bcrypt entries (write them with `htpasswd -Bbn USER PASSWORD`)")

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            if self._stamp is None:
                raise HtpasswdError(f"{self.path}: cannot read the htpasswd file: {e}") from None
            return  # keep the users we had if the file is briefly unreadable (being replaced)
        users, skipped = {}, []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or ":" not in line:
                continue
            user, hashed = line.split(":", 1)
            if hashed.startswith(_BCRYPT_PREFIXES):
                users[user] = hashed.encode()
            else:
                skipped.append(user)
        with self._lock:
            self._users, self.skipped, self._stamp = users, skipped, stamp
            self._verified.clear()

    def verify(self, user: str, password: str) -> bool:
        self._reload()
        hashed = self._users.get(user)
        secret = password.encode("utf-8")
        if hashed is None:
            bcrypt.checkpw(secret, _DUMMY_HASH)
            return False
        token = hmac.new(self._key, b"\0".join([user.encode(), hashed, secret]), hashlib.sha256).digest()
        if token in self._verified:
            return True
        try:
            ok = bcrypt.checkpw(secret, hashed)
        except ValueError:  # a malformed hash in the file
            return False
        if ok:
            with self._lock:
                self._verified.add(token)
        return ok
