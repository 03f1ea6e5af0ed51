"""The one-tensor blob: a minimal safetensors file holding one tensor under the key `data`.

    [8 bytes: header length, u64 LE][JSON {"data":{"dtype","shape","data_offsets":[0,n]}}
     padded with spaces to 8-byte alignment][n bytes: the tensor, copied unchanged]

Any safetensors reader (the `safetensors` package, `mx.load`) opens it as is. The key is `data`
rather than the tensor's name so identical bytes under different names share one blob; readers
also accept a blob whose single key is the tensor's own name (older Ollama blobs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError
from .safetensors_format import build_header, read_header

BLOB_KEY = "data"


def blob_header(dtype: str, shape) -> bytes:
    return build_header([(BLOB_KEY, dtype, shape)])


@dataclass(frozen=True)
class BlobTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    data_offset: int
    nbytes: int


def read_blob_tensor(path: Path, expected_name: str | None = None) -> BlobTensor:
    """Read and check a tensor blob's header (one tensor, covering the whole data buffer)."""
    where = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        tensors, _, data_start = read_header(f, size, where)
    if len(tensors) != 1:
        raise FormatError(f"{where}: a tensor blob holds exactly one tensor, found {len(tensors)}")
    (t,) = tensors
    if t.name != BLOB_KEY and (expected_name is None or t.name != expected_name.rsplit("/", 1)[-1]):
        raise FormatError(f"{where}: tensor key {t.name!r} is neither {BLOB_KEY!r} nor the tensor's name")
    if t.begin != data_start or t.end != size:
        raise FormatError(f"{where}: tensor data does not fill the blob ({t.begin}-{t.end} of {size} bytes)")
    return BlobTensor(t.name, t.dtype, t.shape, t.begin, t.nbytes)
