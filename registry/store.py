"""The local store: a content-addressed blob store and a manifest store over one root.

Every write goes through here and is atomic and durable: a temp file in the same folder,
fsync, then a link/rename into place, then fsync of the folder. A blob that exists is never
rewritten. Writers (create, pull, quantize) hold the store lock shared and gc holds it
exclusive, so gc never removes a blob a running writer has just stored but not yet named in a
manifest.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .digest import check_digest
from .errors import ModelNotFound, StoreError
from .layout import PARTIAL_PREFIX, TEMP_PREFIX, Layout
from .manifest import Manifest, ModelConfig
from .names import ModelName, parse_name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobWriter:
    """Streams one blob into a locked temp file while hashing it; `commit` names it by digest."""

    def __init__(self, blobs: "BlobStore"):
        self._blobs = blobs
        blobs.dir.mkdir(parents=True, exist_ok=True)
        self.temp = blobs.dir / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self._fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # tells gc this temp file is alive
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        """Append bytes (or any contiguous buffer, e.g. a numpy array)."""
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += view.nbytes
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def seal(self, expected_digest: str | None = None) -> "SealedBlob":
        """fsync and close, but do not name the blob yet: used when a whole set of blobs must
        appear together or not at all. The caller holds the store lock, so gc leaves it be."""
        digest = "sha256:" + self._hash.hexdigest()
        try:
            if expected_digest is not None and digest != expected_digest:
                raise StoreError(f"digest mismatch: expected {expected_digest}, got {digest}")
            os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._fd = -1
        return SealedBlob(self._blobs, self.temp, digest, self.size)

    def commit(self, expected_digest: str | None = None) -> tuple[str, bool]:
        """fsync and move into place. Returns (digest, existed_already)."""
        sealed = self.seal(expected_digest)
        return sealed.digest, sealed.publish()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            try:
                os.unlink(self.temp)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()


class SealedBlob:
    """A complete, fsynced blob in a temp file, waiting to be named."""

    def __init__(self, blobs: "BlobStore", temp: Path, digest: str, size: int):
        self._blobs, self.temp, self.digest, self.size = blobs, temp, digest, size

    def publish(self) -> bool:
        """Link into place (atomic, never replaces an existing blob). Returns existed_already."""
        try:
            os.link(self.temp, self._blobs.path(self.digest))
            existed = False
        except FileExistsError:
            existed = True
        self.discard()
        return existed

    def discard(self) -> None:
        try:
            os.unlink(self.temp)
        except FileNotFoundError:
            pass


class BlobStore:
    def __init__(self, layout: Layout):
        self.layout = layout
        self.dir = layout.blobs

    def path(self, digest: str) -> Path:
        return self.layout.blob(digest)

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        with self.writer() as w:
            w.write(data)
            return w.commit()

    def read_bytes(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from {self.dir} (run `zreg verify`)") from None

    def sync(self) -> None:
        """Make the renames of committed blobs durable."""
        if self.dir.exists():
            fsync_dir(self.dir)

    def digests(self) -> Iterator[str]:
        if not self.dir.exists():
            return
        for entry in os.scandir(self.dir):
            digest = Layout.digest_of_blob_file(Path(entry.path))
            if digest:
                yield digest

    def temp_files(self) -> Iterator[Path]:
        """Blobs being written and downloads in progress (never read as blobs)."""
        if not self.dir.exists():
            return
        for entry in os.scandir(self.dir):
            if entry.name.startswith((TEMP_PREFIX, PARTIAL_PREFIX)):
                yield Path(entry.path)


def temp_is_stale(path: Path, min_age: float = 60.0) -> bool:
    """A temp file is stale when no writer holds its lock and it is not brand new."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        return time.time() - os.fstat(fd).st_mtime >= min_age
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
    fsync_dir(path.parent)


class ManifestStore:
    def __init__(self, layout: Layout):
        self.layout = layout

    def path(self, name: ModelName) -> Path:
        return self.layout.manifest(name)

    def read_bytes(self, name: ModelName) -> bytes:
        try:
            return self.path(name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFound(f"model {name.short()!r} not found in {self.layout.root}") from None

    def write_bytes(self, name: ModelName, data: bytes) -> None:
        write_atomic(self.path(name), data)

    def exists(self, name: ModelName) -> bool:
        return self.path(name).is_file()

    def delete(self, name: ModelName) -> None:
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise ModelNotFound(f"model {name.short()!r} not found in {self.layout.root}") from None
        fsync_dir(path.parent)
        # Drop folders left empty, as Ollama does, but never the manifests root.
        for parent in list(path.parents)[:3]:
            try:
                parent.rmdir()
            except OSError:
                break

    def names(self) -> list[ModelName]:
        """Every valid manifest path as a name; stray files are ignored."""
        root = self.layout.manifests
        found = []
        if not root.is_dir():
            return found
        for path in root.glob("*/*/*/*"):
            if not path.is_file() or path.name.startswith("."):
                continue
            host, namespace, model, tag = path.relative_to(root).parts
            try:
                name = parse_name(f"{host}/{namespace}/{model}:{tag}")
            except Exception:
                continue
            if (name.host, name.namespace, name.model, name.tag) == (host, namespace, model, tag):
                found.append(name)
        return sorted(found, key=str)


class Store:
    """The store at one root: `blobs`, `manifests` and the lock between writers and gc."""

    def __init__(self, root: Path | str | None = None):
        self.layout = Layout(root)
        self.root = self.layout.root
        self.blobs = BlobStore(self.layout)
        self.manifests = ManifestStore(self.layout)

    @contextmanager
    def lock(self, exclusive: bool = False, on_wait=None):
        """Writers take it shared, gc exclusive. `on_wait` is called once if we must wait."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.layout.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    on_wait()
                fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def resolve(self, name: ModelName | str) -> tuple[ModelName, Manifest, bytes]:
        if isinstance(name, str):
            name = parse_name(name)
        data = self.manifests.read_bytes(name)
        return name, Manifest.from_bytes(data, str(self.manifests.path(name))), data

    def config(self, manifest: Manifest) -> ModelConfig:
        check_digest(manifest.config.digest)
        return ModelConfig.from_bytes(self.blobs.read_bytes(manifest.config.digest),
                                      str(self.blobs.path(manifest.config.digest)))
