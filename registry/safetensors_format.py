"""The safetensors container, read and written without loading tensor data.

A file is: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the data buffer; offsets are relative to the buffer. We validate everything a reader
could trip on (lengths past the end, overlapping ranges, byte counts that disagree with
shape x dtype, unknown dtypes, duplicate keys) before any byte of data is touched.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from .errors import FormatError
from .names import is_path_segment

# Bytes per element. Sub-byte types (F4, F6_*) are not supported yet.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
MAX_HEADER = 100 << 20  # the limit the safetensors library itself enforces
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def tensor_nbytes(dtype: str, shape) -> int:
    return DTYPE_SIZES[dtype] * math.prod(shape)


def check_tensor_name(name: str, where: str) -> None:
    if not is_path_segment(name):  # it becomes part of the layer name `component/tensor`
        raise FormatError(f"{where}: tensor name {name!r} is not allowed "
                          "(letters, digits, '_', '.', '-' only; no '/', '..' or leading '.')")


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise FormatError(f"duplicate key {key!r} in header")
        seen[key] = value
    return seen


def parse_header(head: bytes, file_size: int, where: str):
    """Validate a header. `head` holds at least the 8-byte length and the JSON.

    Returns (tensors sorted by offset, metadata dict or None, data_start).
    """
    if file_size < 8 or len(head) < 8:
        raise FormatError(f"{where}: truncated: {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER:
        raise FormatError(f"{where}: header length {n} exceeds the {MAX_HEADER}-byte limit")
    if 8 + n > file_size:
        raise FormatError(f"{where}: header length {n} runs past the end of the file ({file_size} bytes)")
    if len(head) < 8 + n:
        raise FormatError(f"{where}: header truncated")
    try:
        header = json.loads(head[8:8 + n].decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{where}: header is not a JSON object")
    metadata = header.pop(METADATA_KEY, None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise FormatError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = file_size - data_start
    tensors = []
    for name, entry in header.items():
        check_tensor_name(name, where)
        tensors.append(_tensor_info(name, entry, data_start, data_len, where))
    tensors.sort(key=lambda t: (t.begin, t.end))
    for prev, cur in zip(tensors, tensors[1:]):
        if cur.begin < prev.end:
            raise FormatError(f"{where}: tensors {prev.name!r} and {cur.name!r} overlap "
                              f"(data_offsets {prev.begin - data_start}-{prev.end - data_start} and "
                              f"{cur.begin - data_start}-{cur.end - data_start})")
    return tensors, metadata, data_start


def _tensor_info(name, entry, data_start, data_len, where) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: tensor {name!r}: entry is not an object")
    dtype = entry.get("dtype")
    if dtype not in DTYPE_SIZES:
        raise FormatError(f"{where}: tensor {name!r}: unknown dtype {dtype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise FormatError(f"{where}: tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise FormatError(f"{where}: tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise FormatError(f"{where}: tensor {name!r}: data_offsets {offsets} are out of order")
    if end > data_len:
        raise FormatError(f"{where}: tensor {name!r}: data_offsets {offsets} run past the end of the "
                          f"data ({data_len} bytes): file truncated?")
    expected = tensor_nbytes(dtype, shape)
    if end - begin != expected:
        raise FormatError(f"{where}: tensor {name!r}: {end - begin} bytes but shape {shape} x {dtype} "
                          f"needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def build_header(entries, metadata: dict | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out back to back in `entries`
    order: each entry is (name, dtype, shape). Compact JSON, space-padded so the data starts
    8-byte aligned."""
    header = {}
    if metadata:
        header[METADATA_KEY] = metadata
    offset = 0
    for name, dtype, shape in entries:
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def read_header(f, file_size: int, where: str):
    """Read and validate the header of an open binary file."""
    first = f.read(8)
    if len(first) < 8:
        raise FormatError(f"{where}: truncated: {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", first)
    if n > MAX_HEADER or 8 + n > file_size:
        return parse_header(first, file_size, where)  # raises with the right message
    return parse_header(first + f.read(n), file_size, where)
