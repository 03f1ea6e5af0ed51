"""sha256 digests in the OCI form `sha256:<64 lowercase hex>`."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .errors import FormatError

_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
# Big enough that hashlib releases the GIL and syscalls are amortised; small enough for memory.
CHUNK = 8 << 20


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise FormatError(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>")
    return digest


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = CHUNK) -> tuple[str, int]:
    """Hash a whole file in chunks; returns (digest, size)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return "sha256:" + h.hexdigest(), size
