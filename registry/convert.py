"""Write one source tensor into blobs: copied as is, or converted to fp8 / bf16.

A source is a byte range of a safetensors file (a shard being imported, or a blob already in
the store). Data is read in bounded chunks with preadv into a per-thread buffer, so memory
stays flat whatever the tensor size. Every output is returned sealed (complete and fsynced
but not yet named) so the caller decides when the blobs appear.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import InvalidModel
from .manifest import TENSOR_MEDIA_TYPE, Layer
from .quantize import BF16, FP8, GROUP, check_finite, encode_bf16, encode_mxfp8, scales_name, to_float32
from .safetensors_format import DTYPE_SIZES
from .store import BlobWriter, SealedBlob, Store
from .tensorblob import blob_header


@dataclass
class TensorSource:
    name: str                  # layer name, `component/tensor`
    path: Path
    begin: int                 # absolute offset of the tensor's bytes in `path`
    dtype: str
    shape: tuple[int, ...]
    layer: Optional[Layer] = None   # set when the source is already a blob in the store

    @property
    def nbytes(self) -> int:
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)


@dataclass
class Output:
    layer: Layer
    sealed: Optional[SealedBlob]     # None when an existing blob is reused as is
    lossless: Optional[bool] = None  # for bf16: did rounding keep every value
    existed: bool = False            # the store had this blob already (set on publish)

    def publish(self) -> None:
        if self.sealed is not None:
            self.existed = self.sealed.publish()
            self.sealed = None

    def discard(self) -> None:
        if self.sealed is not None:
            self.sealed.discard()


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise InvalidModel(f"{path}: file vanished while importing") from None


def _chunks(fd: int, path: Path, begin: int, end: int, buf: bytearray, step: int,
            on_bytes: Callable[[int], None]):
    """Yield views of path[begin:end] in pieces of `step` bytes (the last may be shorter)."""
    view = memoryview(buf)
    offset = begin
    while offset < end:
        want = min(step, end - offset)
        got = 0
        while got < want:
            n = os.preadv(fd, [view[got:want]], offset + got)
            if n <= 0:
                raise InvalidModel(f"{path}: file shrank while importing (no data at byte "
                                   f"{offset + got}, expected {end})")
            got += n
        on_bytes(want)
        yield view[:want]
        offset += want


def _layer(name: str, dtype: str, shape, sealed: SealedBlob) -> Layer:
    return Layer(mediaType=TENSOR_MEDIA_TYPE, digest=sealed.digest, size=sealed.size, name=name,
                 dtype=dtype, shape=list(shape))


def write_tensor(store: Store, src: TensorSource, action: str | None, buf: bytearray,
                 on_bytes: Callable[[int], None]) -> list[Output]:
    if action is None and src.layer is not None:
        on_bytes(src.nbytes)
        return [Output(src.layer, None, existed=True)]
    fd = _open(src.path)
    try:
        if action == FP8:
            return _write_fp8(store, fd, src, buf, on_bytes)
        if action == BF16:
            return [_write_bf16(store, fd, src, buf, on_bytes)]
        with store.blobs.writer() as w:
            w.write(blob_header(src.dtype, src.shape))
            for chunk in _chunks(fd, src.path, src.begin, src.begin + src.nbytes, buf, len(buf), on_bytes):
                w.write(chunk)
            return [_sealed_output(src.name, src.dtype, src.shape, w)]
    finally:
        os.close(fd)


def _sealed_output(name, dtype, shape, writer: BlobWriter, lossless=None) -> Output:
    sealed = writer.seal()
    return Output(_layer(name, dtype, shape, sealed), sealed, lossless)


def _write_fp8(store: Store, fd: int, src: TensorSource, buf: bytearray, on_bytes) -> list[Output]:
    rows, cols = src.shape
    row_bytes = cols * DTYPE_SIZES[src.dtype]
    step = max(1, len(buf) // row_bytes) * row_bytes
    scale_shape = (rows, cols // GROUP)
    with store.blobs.writer() as elements, store.blobs.writer() as scales:
        elements.write(blob_header("F8_E4M3", src.shape))
        scales.write(blob_header("F8_E8M0", scale_shape))
        done = 0
        for chunk in _chunks(fd, src.path, src.begin, src.begin + src.nbytes, buf, step, on_bytes):
            values = to_float32(np.frombuffer(chunk, np.uint8), src.dtype).reshape(-1, cols)
            check_finite(values, f"{src.name} (rows from {done})")
            q, s = encode_mxfp8(values)
            elements.write(q)
            scales.write(s)
            done += values.shape[0]
        return [_sealed_output(src.name, "F8_E4M3", src.shape, elements),
                _sealed_output(scales_name(src.name), "F8_E8M0", scale_shape, scales)]


def _write_bf16(store: Store, fd: int, src: TensorSource, buf: bytearray, on_bytes) -> Output:
    exact = True
    with store.blobs.writer() as w:
        w.write(blob_header("BF16", src.shape))
        step = len(buf) // 4 * 4
        for chunk in _chunks(fd, src.path, src.begin, src.begin + src.nbytes, buf, step, on_bytes):
            values = np.frombuffer(chunk, np.float32)
            check_finite(values, src.name)
            converted, chunk_exact = encode_bf16(values)
            exact &= chunk_exact
            w.write(converted)
        return _sealed_output(src.name, "BF16", src.shape, w, exact)
