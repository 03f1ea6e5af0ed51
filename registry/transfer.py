"""`zreg push` and `zreg pull`: move a model between the store and an OCI registry.

Pull: fetch the manifest (Docker v2 or zreg's OCI form), then every blob the store lacks, in
parallel. Each blob streams into `blobs/.partial-sha256-<hex>` (flock'd while written) while
being hashed; a connection that drops mid-blob is resumed with `Range` from the bytes on disk,
also in a later run after a crash. Only a blob whose size and sha256 match is linked into
place; the manifest is written last, so a model is never visible half-pulled.

Push: HEAD every blob and skip those present; mount from another repository of the same
registry when a local model from there has the blob; else upload (one PUT for small blobs,
PATCH chunks for large ones); the manifest last, byte for byte as stored.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import requests

from .client import OCI_MANIFEST, RegistryClient, TransferError
from .digest import sha256_bytes
from .errors import ZregError
from .manifest import MANIFEST_V2, Descriptor, Manifest
from .names import ModelName
from .ocimodel import from_oci, is_zreg_oci, to_oci
from .store import Store

CHUNK = 1 << 20
MONOLITHIC_MAX = 16 << 20        # blobs up to this size go in one PUT
UPLOAD_CHUNK = 256 << 20         # PATCH size for larger blobs (raised to OCI-Chunk-Min-Length)
BLOB_ATTEMPTS = 4                # whole-blob restarts after mid-stream failures
DEFAULT_CONCURRENCY = 8


@dataclass
class TransferResult:
    name: ModelName
    digest: str
    blobs: int = 0           # blobs the model references
    transferred: int = 0     # blobs moved over the network
    skipped: int = 0         # present already (or mounted)
    mounted: int = 0
    bytes: int = 0           # bytes moved over the network
    resumed_bytes: int = 0   # bytes reused from partial downloads


class Progress:
    """Callbacks a display hooks into; all may be called from worker threads."""

    def start(self, total_bytes: int, total_blobs: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def blob_done(self) -> None: ...


# ---- pull ---------------------------------------------------------------------------------------

def _disk_error(e: OSError, store: Store, digest: str) -> ZregError:
    if e.errno == errno.ENOSPC:
        return TransferError(f"disk full while writing blob {digest} into {store.blobs.dir}; the partial "
                             "data is kept: free space and run the same pull again to resume")
    return TransferError(f"cannot write blob {digest} into {store.blobs.dir}: {e.strerror}")


def fetch_blob(store: Store, client: RegistryClient, repository: str, desc: Descriptor,
               progress: Progress, stats: TransferResult, lock: threading.Lock) -> None:
    """Download one blob into the store, resuming a partial file, verifying size and digest."""
    store.blobs.dir.mkdir(parents=True, exist_ok=True)
    path = store.layout.partial(desc.digest)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another pull of the same blob waits here, then finds it done
        if store.blobs.has(desc.digest, desc.size):
            os.unlink(path)
            return
        hasher = hashlib.sha256()
        have = os.fstat(fd).st_size
        if have > desc.size:
            os.ftruncate(fd, 0)
            have = 0
        offset = 0
        while offset < have:  # re-hash what an earlier attempt left
            data = os.pread(fd, min(CHUNK, have - offset), offset)
            hasher.update(data)
            offset += len(data)
        resumed = have
        for attempt in range(BLOB_ATTEMPTS):
            try:
                resp = client.open_blob(repository, desc.digest, offset=have)
            except TransferError:
                if attempt == BLOB_ATTEMPTS - 1:
                    raise
                continue
            ranged = resp.status_code == 206 and resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")
            if have and not ranged:  # the registry ignored Range (or sent another): start over
                os.ftruncate(fd, 0)
                hasher = hashlib.sha256()
                resumed = have = 0
            try:
                for data in resp.iter_content(CHUNK):
                    if have + len(data) > desc.size:
                        raise TransferError(f"blob {desc.digest}: the registry sent more than {desc.size} bytes")
                    try:
                        os.pwrite(fd, data, have)
                    except OSError as e:
                        raise _disk_error(e, store, desc.digest) from None
                    hasher.update(data)
                    have += len(data)
                    progress.advance(len(data))
                    with lock:
                        stats.bytes += len(data)
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError):
                if attempt == BLOB_ATTEMPTS - 1:
                    raise TransferError(f"blob {desc.digest}: connection kept failing at byte {have}; run the "
                                        "same pull again to resume") from None
                continue  # resume from `have`
            finally:
                resp.close()
            if have == desc.size:
                break
        if have != desc.size:
            raise TransferError(f"blob {desc.digest}: got {have} of {desc.size} bytes; run the same pull again "
                                "to resume")
        actual = "sha256:" + hasher.hexdigest()
        if actual != desc.digest:
            os.ftruncate(fd, 0)  # corrupt data must not be resumed from
            raise TransferError(f"blob {desc.digest}: digest mismatch, the registry sent data hashing to "
                                f"{actual}; nothing was stored")
        os.fsync(fd)
        try:
            os.link(path, store.blobs.path(desc.digest))
        except FileExistsError:
            pass
        os.unlink(path)
        with lock:
            stats.transferred += 1
            stats.resumed_bytes += resumed
        progress.advance(resumed)
    finally:
        os.close(fd)
    progress.blob_done()


def pull_model(store: Store, name: ModelName, client: RegistryClient, concurrency: int = DEFAULT_CONCURRENCY,
               progress: Progress | None = None) -> TransferResult:
    progress = progress or Progress()
    remote, media_type = client.get_manifest(name.repository, name.tag)
    local = from_oci(remote) if is_zreg_oci(remote) else remote
    manifest = Manifest.from_bytes(local, f"{client.host}/{name.repository}:{name.tag}")
    stats = TransferResult(name, sha256_bytes(local))
    wanted = {d.digest: d for d in [manifest.config, *manifest.layers]}
    stats.blobs = len(wanted)
    missing = [d for d in wanted.values() if not store.blobs.has(d.digest, d.size)]
    stats.skipped = stats.blobs - len(missing)
    progress.start(sum(d.size for d in missing), len(missing))
    lock = threading.Lock()
    with store.lock():
        _run_parallel(concurrency, missing,
                      lambda d: fetch_blob(store, client, name.repository, d, progress, stats, lock))
        store.blobs.sync()
        store.manifests.write_bytes(name, local)
    return stats


def _run_parallel(concurrency: int, items, work: Callable) -> None:
    """Run work(item) on a pool; the first error cancels what has not started and is raised."""
    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="zreg-transfer") as pool:
        futures = [pool.submit(work, item) for item in items]
        error = None
        for future in futures:
            try:
                future.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                if error is None:
                    error = e
                    for other in futures:
                        other.cancel()
        if error is not None:
            raise error


# ---- push ---------------------------------------------------------------------------------------

class _FileSlice:
    """A read-only window of a file that requests can stream with a known length."""

    def __init__(self, path, offset: int, length: int, progress: Progress):
        self._f = open(path, "rb")
        self._f.seek(offset)
        self._left = length
        self._progress = progress

    def __len__(self):
        return self._left

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(max(n, 0))
        self._left -= len(data)
        self._progress.advance(len(data))
        if not data:
            self._f.close()
        return data


def _mount_sources(store: Store, name: ModelName) -> dict[str, str]:
    """digest -> another repository on the same registry that a local model says has it."""
    sources: dict[str, str] = {}
    for other in store.manifests.names():
        if other.host != name.host or other.repository == name.repository:
            continue
        try:
            _, manifest, _ = store.resolve(other)
        except ZregError:
            continue
        for digest in manifest.blob_digests():
            sources.setdefault(digest, other.repository)
    return sources


def push_blob(client: RegistryClient, repository: str, digest: str, size: int, path, data: bytes | None,
              mount_from: str | None, progress: Progress, stats: TransferResult, lock: threading.Lock) -> None:
    if client.blob_size(repository, digest) == size:
        with lock:
            stats.skipped += 1
        progress.advance(size)
        progress.blob_done()
        return
    if mount_from and client.mount(repository, digest, mount_from):
        with lock:
            stats.skipped += 1
            stats.mounted += 1
        progress.advance(size)
        progress.blob_done()
        return

    def body(offset: int, length: int):
        if data is not None:
            return lambda: data[offset:offset + length]
        return lambda: _FileSlice(path, offset, length, progress)

    last_error = None
    for _ in range(BLOB_ATTEMPTS):  # a failed upload restarts from a fresh session
        try:
            location, min_chunk = client.start_upload(repository)
            if size <= MONOLITHIC_MAX:
                client.finish_upload(repository, location, digest, body(0, size), size)
            else:
                step = max(UPLOAD_CHUNK, min_chunk)
                offset = 0
                while offset < size:
                    length = min(step, size - offset)
                    location = client.upload_chunk(repository, location, offset, length, body(offset, length))
                    offset += length
                client.finish_upload(repository, location, digest)
            break
        except (TransferError, OSError) as e:
            last_error = e
    else:
        raise TransferError(f"blob {digest}: upload failed after {BLOB_ATTEMPTS} tries: {last_error}")
    if data is not None:
        progress.advance(size)
    with lock:
        stats.transferred += 1
        stats.bytes += size
    progress.blob_done()


def push_model(store: Store, name: ModelName, client: RegistryClient, oci: bool = False,
               concurrency: int = DEFAULT_CONCURRENCY, progress: Progress | None = None) -> TransferResult:
    progress = progress or Progress()
    name, manifest, data = store.resolve(name)
    blobs = [(d.digest, d.size, store.blobs.path(d.digest), None) for d in [manifest.config, *manifest.layers]]
    blobs = list({b[0]: b for b in blobs}.values())
    for digest, size, path, _ in blobs:
        if not store.blobs.has(digest, size):
            raise TransferError(f"blob {digest} of {name.short()} is missing or damaged in the store "
                                "(run `zreg verify`)")
    upload_bytes, media_type = data, MANIFEST_V2
    if oci:
        upload_bytes, config_bytes = to_oci(data, store.config(manifest), name.repository, name.tag)
        blobs.append((sha256_bytes(config_bytes), len(config_bytes), None, config_bytes))
        media_type = OCI_MANIFEST
    stats = TransferResult(name, sha256_bytes(upload_bytes), blobs=len(blobs))
    sources = _mount_sources(store, name)
    progress.start(sum(b[1] for b in blobs), len(blobs))
    lock = threading.Lock()
    _run_parallel(concurrency, blobs, lambda b: push_blob(client, name.repository, b[0], b[1], b[2], b[3],
                                                          sources.get(b[0]), progress, stats, lock))
    digest = client.put_manifest(name.repository, name.tag, upload_bytes, media_type)
    if digest and digest != stats.digest:
        raise TransferError(f"{client.host} stored the manifest as {digest}, expected {stats.digest}")
    return stats
