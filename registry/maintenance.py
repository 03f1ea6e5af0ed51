"""Keeping the store healthy: `gc` (remove what nothing references) and `verify` (re-hash)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from .digest import sha256_file
from .errors import FormatError, StoreError, ZregError
from .manifest import Manifest
from .names import ModelName
from .store import Store, temp_is_stale
from .tensorblob import read_blob_tensor
from .uploads import UPLOAD_MAX_AGE, Uploads


def referenced_digests(store: Store, skip: ModelName | None = None) -> set[str]:
    """Blobs named by any manifest (but `skip`). A manifest we cannot read stops the caller:
    deleting blobs without knowing what is referenced could lose data."""
    refs: set[str] = set()
    for name in store.manifests.names():
        if name == skip:
            continue
        path = store.manifests.path(name)
        try:
            refs |= Manifest.from_bytes(path.read_bytes(), str(path)).blob_digests()
        except FormatError as e:
            raise StoreError(f"{e}; refusing to delete blobs while a manifest is unreadable") from None
    return refs


@dataclass
class GcResult:
    blobs: int = 0
    bytes: int = 0
    temps: int = 0       # stale temp files and abandoned partial downloads
    uploads: int = 0     # `zreg serve` upload sessions idle for longer than UPLOAD_MAX_AGE


def collect_garbage(store: Store, dry_run: bool = False, on_wait=None, temp_min_age: float = 60.0) -> GcResult:
    """Delete unreferenced blobs and stale temp files, holding the store lock exclusively."""
    result = GcResult()
    with store.lock(exclusive=True, on_wait=on_wait):
        refs = referenced_digests(store)
        for digest in list(store.blobs.digests()):
            if digest in refs:
                continue
            path = store.blobs.path(digest)
            result.blobs += 1
            result.bytes += path.stat().st_size
            if not dry_run:
                path.unlink()
        for temp in list(store.blobs.temp_files()):
            if temp_is_stale(temp, temp_min_age):
                result.temps += 1
                if not dry_run:
                    temp.unlink(missing_ok=True)
        if not dry_run:
            store.blobs.sync()
            result.uploads = Uploads(store).purge(UPLOAD_MAX_AGE)
    return result


def remove_model(store: Store, name: ModelName, prune: bool = True, on_wait=None) -> GcResult:
    """Delete a manifest and, unless told not to, the blobs only it referenced."""
    result = GcResult()
    with store.lock(exclusive=True, on_wait=on_wait):
        name, manifest, _ = store.resolve(name)
        store.manifests.delete(name)
        if prune:
            others = referenced_digests(store)
            for digest in manifest.blob_digests() - others:
                path = store.blobs.path(digest)
                try:
                    result.bytes += path.stat().st_size
                    path.unlink()
                    result.blobs += 1
                except FileNotFoundError:
                    pass
            store.blobs.sync()
    return result


@dataclass
class VerifyReport:
    models: int = 0
    blobs: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def verify_store(store: Store, names: list[ModelName] | None = None,
                 on_bytes: Callable[[int], None] = lambda n: None, workers: int = 2) -> VerifyReport:
    """Check models (all by default) and, when checking everything, every blob in blobs/.

    Every referenced blob must exist with the layer's size and digest; every tensor blob's
    header must hold one tensor with the layer's dtype and shape. Each blob is hashed once.
    """
    report = VerifyReport()
    whole_store = names is None
    names = store.manifests.names() if whole_store else names
    expect: dict[str, int] = {}          # digest -> size the manifests say
    tensor_layers = []                    # (model, layer) to check headers
    for name in names:
        report.models += 1
        try:
            name, manifest, _ = store.resolve(name)
        except ZregError as e:
            report.problems.append(str(e))
            continue
        for desc in [manifest.config, *manifest.layers]:
            if expect.setdefault(desc.digest, desc.size) != desc.size:
                report.problems.append(f"{name.short()}: blob {desc.digest} listed with two sizes")
        tensor_layers += [(name, layer) for layer in manifest.tensor_layers()]
        try:
            store.config(manifest)
        except ZregError as e:
            report.problems.append(f"{name.short()}: config blob: {e}")
    to_hash = set(expect)
    if whole_store:
        to_hash |= set(store.blobs.digests())

    def check(digest: str) -> list[str]:
        path = store.blobs.path(digest)
        if not path.exists():
            return [f"blob {digest} is missing ({path})"]
        actual, size = sha256_file(path)
        on_bytes(size)
        found = []
        if digest in expect and size != expect[digest]:
            found.append(f"blob {digest}: {size} bytes, manifest says {expect[digest]}")
        if actual != digest:
            found.append(f"blob {digest}: content hashes to {actual} (corrupted)")
        return found

    with ThreadPoolExecutor(workers) as pool:
        for found in pool.map(check, sorted(to_hash)):
            report.problems += found
    report.blobs = len(to_hash)
    report.bytes = sum(os.path.getsize(store.blobs.path(d)) for d in to_hash if store.blobs.has(d))
    for name, layer in tensor_layers:
        path = store.blobs.path(layer.digest)
        if not path.exists():
            continue
        try:
            blob = read_blob_tensor(path, layer.name)
        except ZregError as e:
            report.problems.append(f"{name.short()}: layer {layer.name}: {e}")
            continue
        if layer.dtype is not None and blob.dtype != layer.dtype:
            report.problems.append(f"{name.short()}: layer {layer.name}: blob holds {blob.dtype}, layer says {layer.dtype}")
        if layer.shape is not None and list(blob.shape) != list(layer.shape):
            report.problems.append(f"{name.short()}: layer {layer.name}: blob shape {list(blob.shape)}, layer says {layer.shape}")
    report.problems.sort()
    return report
