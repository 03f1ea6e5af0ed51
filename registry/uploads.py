"""Blob upload sessions for `zreg serve` (the OCI push protocol), as explicit objects on disk:

    uploads/<id>/data         the bytes received so far, in order
    uploads/<id>/state.json   {"repository": ..., "started": <unix time>}

A session outlives the request that started it (POST opens it, PATCHes append, PUT commits),
and the server may restart in between, so its state is on disk, not in memory. Commit =
verify the digest -> link the data file into blobs/ under its digest with the store's
`SealedBlob.publish` (atomic, never replaces an existing blob) -> delete the session; no byte
is copied twice. `purge` removes sessions idle for longer than an age, as the CNCF registry's
upload purger does. Nothing here knows HTTP: the server maps these exceptions to OCI codes.

The sha256 of a session is computed while chunks arrive and kept in memory by session id;
after a restart (or an out-of-band change) commit re-hashes the data file instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .digest import check_digest, sha256_file
from .errors import FormatError, StoreError, ZregError
from .store import BlobWriter, SealedBlob, Store


UPLOAD_MAX_AGE = 24 * 3600.0  # seconds an idle session is kept (the CNCF registry keeps a week)


class UploadUnknown(ZregError):
    """No such session (never started, committed, cancelled, purged, or another repository's)."""


class UploadRangeInvalid(ZregError):
    """A chunk that does not start where the session's data ends (out of order)."""


class UploadInvalid(ZregError):
    """A chunk whose body disagrees with its Content-Range."""


class DigestInvalid(ZregError):
    """A digest that is malformed, or that the uploaded bytes do not hash to."""


def valid_digest(value) -> str:
    """`value` if it is a sha256 digest (the only algorithm zreg stores), else DigestInvalid."""
    try:
        return check_digest(value)
    except FormatError:
        raise DigestInvalid(f"invalid digest {value!r}: expected sha256:<64 lowercase hex>") from None


@dataclass
class UploadSession:
    id: str
    repository: str
    folder: Path
    started: float

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def size(self) -> int:
        try:
            return self.data.stat().st_size
        except FileNotFoundError:
            raise UploadUnknown(f"upload {self.id} is gone") from None


class Appender:
    """Appends one request's chunk to a session. Use as a context manager."""

    def __init__(self, uploads: "Uploads", session: UploadSession, start: int | None):
        self._uploads = uploads
        self._session = session
        try:
            self._fd = os.open(session.data, os.O_WRONLY)
        except FileNotFoundError:
            raise UploadUnknown(f"upload {session.id} is gone") from None
        self.start = os.fstat(self._fd).st_size
        if start is not None and start != self.start:
            os.close(self._fd)
            raise UploadRangeInvalid(f"chunk starts at {start} but upload {session.id} holds "
                                     f"{self.start} bytes; send the chunk that starts there")
        os.lseek(self._fd, self.start, os.SEEK_SET)
        self.written = 0
        # Keep hashing where the last chunk stopped; if we lost track, commit re-hashes the file.
        cached = uploads._hashes.pop(session.id, None)
        if cached and cached[1] == self.start:
            self._hash = cached[0]
        else:
            self._hash = hashlib.sha256() if self.start == 0 else None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except BaseException:
            self._hash = None  # the file now holds part of this chunk: the running hash is off
            raise
        if self._hash is not None:
            self._hash.update(data)
        self.written += len(data)

    def rollback(self) -> None:
        """Drop this request's bytes (its body broke its own Content-Range)."""
        os.ftruncate(self._fd, self.start)
        self.written = 0
        self._hash = None

    def close(self) -> None:
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        if self._hash is not None:
            self._uploads._hashes[self._session.id] = (self._hash, self.start + self.written)

    def __enter__(self) -> "Appender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Uploads:
    """The upload sessions of one store."""

    def __init__(self, store: Store):
        self.store = store
        self.dir = store.layout.uploads
        self._hashes: dict[str, tuple[object, int]] = {}  # session id -> (sha256 so far, bytes hashed)

    def create(self, repository: str) -> UploadSession:
        session_id = uuid.uuid4().hex
        folder = self.store.layout.upload(session_id)
        folder.mkdir(parents=True)
        started = time.time()
        (folder / "state.json").write_text(json.dumps({"repository": repository, "started": started}))
        (folder / "data").touch()
        return UploadSession(session_id, repository, folder, started)

    def open(self, session_id: str, repository: str) -> UploadSession:
        """The session `session_id`, which must belong to `repository`."""
        try:
            folder = self.store.layout.upload(session_id)
            state = json.loads((folder / "state.json").read_text())
        except (StoreError, OSError, ValueError):
            raise UploadUnknown(f"no upload {session_id!r} in progress") from None
        if state.get("repository") != repository:
            raise UploadUnknown(f"upload {session_id} belongs to another repository")
        return UploadSession(session_id, repository, folder, float(state.get("started", 0)))

    def append(self, session: UploadSession, start: int | None = None) -> Appender:
        """An appender for one chunk; `start` (from Content-Range) must equal the current size."""
        return Appender(self, session, start)

    def commit(self, session: UploadSession, expected_digest: str) -> tuple[str, bool, int]:
        """Verify and move the data into blobs/. Returns (digest, blob existed already, size).
        A session whose bytes do not match is removed: its data can never become that blob."""
        valid_digest(expected_digest)
        with self.store.lock():  # shared: gc must not run between the link and the manifest PUT's check
            fd = os.open(session.data, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data must be durable before a name in blobs/ points at it
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            cached = self._hashes.pop(session.id, None)
            if cached and cached[1] == size:
                digest = "sha256:" + cached[0].hexdigest()
            else:
                digest, size = sha256_file(session.data)
            if digest != expected_digest:
                self.cancel(session)
                raise DigestInvalid(f"upload {session.id} holds {size} bytes with digest {digest}, "
                                     f"not {expected_digest}")
            self.store.blobs.dir.mkdir(parents=True, exist_ok=True)
            # The store's step for a complete, fsynced file: link into blobs/ (never replaces
            # an existing blob), then unlink the source name. No byte is copied.
            existed = SealedBlob(self.store.blobs, session.data, digest, size).publish()
            self.store.blobs.sync()
        self.cancel(session)
        return digest, existed, size

    def cancel(self, session: UploadSession) -> None:
        self._hashes.pop(session.id, None)
        shutil.rmtree(session.folder, ignore_errors=True)

    def purge(self, max_age: float, now: float | None = None) -> int:
        """Remove sessions with no activity for `max_age` seconds. Returns how many."""
        now = time.time() if now is None else now
        removed = 0
        if not self.dir.is_dir():
            return removed
        for entry in os.scandir(self.dir):
            path = Path(entry.path)
            if now - _last_activity(path) <= max_age:
                continue
            self._hashes.pop(entry.name, None)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        return removed


def _last_activity(folder: Path) -> float:
    """The newest mtime of a session folder and its files (a chunk written updates `data`)."""
    times = []
    for path in (folder, folder / "data", folder / "state.json"):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)


def commit_writer(store: Store, writer: BlobWriter, expected_digest: str) -> tuple[str, bool]:
    """Commit a single-request upload streamed into a BlobWriter; DigestInvalid if it differs."""
    valid_digest(expected_digest)
    with store.lock():
        try:
            result = writer.commit(expected_digest)
        except StoreError as e:  # commit's only StoreError is the digest check
            raise DigestInvalid(str(e)) from None
        store.blobs.sync()
    return result
