"""Where the runtime computes: MLX's GPU (Metal on Apple silicon, CUDA with an mlx-cuda build and
an NVIDIA GPU) when there is one, else MLX's CPU backend. Chosen at run time:
`--device cpu|gpu|auto` beats `ZREG_DEVICE`, which beats auto-detection.

Compute dtype: float32 on the CPU (MLX's and torch's CPU bfloat16 matmuls do not use BLAS and run
~30x slower), bfloat16 on a GPU. `ZREG_DTYPE=float32|bfloat16` overrides (parity checks on a GPU).
Weights keep their stored dtype; `layers.Linear` casts them at use.

FP8 (mxfp8) linears: on a GPU `mx.quantized_matmul` (the weight stays FP8). MLX's CPU kernel for
it runs at ~1 GFLOP/s here against ~100 for a BLAS matmul, so on the CPU each FP8 linear is
dequantized at use, one layer at a time, into a transient the size of that one layer; the stored
weight stays FP8. Not every MLX GPU build has an mxfp8 quantized_matmul kernel (older mlx-cuda
releases raise "QuantizedMatmul has no CUDA implementation"), so the GPU choice is probed once
with a tiny product of the same form; where it fails the dequantize path is used and
`describe()` says why. `ZREG_FP8_MATMUL=quantized|dequantize` overrides (no probe).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from . import blas
from .errors import BadRequest, RuntimeFailure
from .weights import MXFP8_GROUP

DEVICES = ("auto", "cpu", "gpu")
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass(frozen=True)
class Backend:
    device: str            # "cpu" or "gpu"
    kind: str              # "cpu", "metal" or "cuda"
    compute_dtype: mx.Dtype
    fp8_matmul: str        # "quantized" or "dequantize"
    fp8_note: str = ""     # why the GPU runs FP8 linears dequantized, when the probe failed

    @property
    def mx_device(self) -> mx.Device:
        return mx.gpu if self.device == "gpu" else mx.cpu

    def activate(self) -> None:
        mx.set_default_device(self.mx_device)

    def describe(self) -> str:
        name = mx.device_info(self.mx_device).get("device_name", "")
        extra = f", BLAS: {blas.status()}" if self.kind == "cpu" else ""
        if self.fp8_note:
            extra += f"; FP8 linears dequantized at use: {self.fp8_note}"
        dtype = str(self.compute_dtype).split(".")[-1]
        return f"{self.kind} ({name}; MLX {mx.__version__}, compute {dtype}{extra})".replace("( ; ", "(")


def _gpu_kind() -> str | None:
    if not mx.is_available(mx.gpu):
        return None
    if hasattr(mx, "metal") and mx.metal.is_available():
        return "metal"
    return "cuda"


def select(requested: str | None = None) -> Backend:
    """The backend for this run; raises BadRequest for a device this machine does not have."""
    choice = (requested or os.environ.get("ZREG_DEVICE") or "auto").lower()
    if choice not in DEVICES:
        raise BadRequest(f"unknown device {choice!r}: use one of {', '.join(DEVICES)}")
    gpu = _gpu_kind()
    if choice == "gpu" and gpu is None:
        hint = ("install the CUDA backend: pip install 'mlx[cuda12]' (or cuda13)"
                if sys.platform.startswith("linux") else "MLX found no Metal device")
        raise BadRequest(f"--device gpu: MLX {mx.__version__} has no GPU backend here ({hint})")
    device = "gpu" if gpu and choice in ("auto", "gpu") else "cpu"
    dtype_name = os.environ.get("ZREG_DTYPE") or ("bfloat16" if device == "gpu" else "float32")
    if dtype_name not in _DTYPES:
        raise BadRequest(f"ZREG_DTYPE={dtype_name!r}: use one of {', '.join(_DTYPES)}")
    fp8, note = os.environ.get("ZREG_FP8_MATMUL") or None, ""
    if fp8 is None and device == "cpu":
        fp8 = "dequantize"
    elif fp8 is None:
        note = quantized_matmul_failure(mx.gpu, _DTYPES[dtype_name])
        fp8 = "dequantize" if note else "quantized"
    if fp8 not in ("quantized", "dequantize"):
        raise BadRequest(f"ZREG_FP8_MATMUL={fp8!r}: use quantized or dequantize")
    return Backend(device=device, kind=gpu if device == "gpu" else "cpu",
                   compute_dtype=_DTYPES[dtype_name], fp8_matmul=fp8, fp8_note=note)


_PROBED: dict[str, str] = {}


def quantized_matmul_failure(device: mx.Device, dtype: mx.Dtype) -> str:
    """"" if an mxfp8 `mx.quantized_matmul` of the form layers.Linear uses runs on `device` with
    `dtype` activations, else what went wrong (probed once each: a 4x64 by 64x64 product)."""
    key = f"{device} {dtype}"
    if key not in _PROBED:
        try:
            with mx.stream(device):
                w, scales = mx.quantize(mx.ones((64, 64)), group_size=MXFP8_GROUP, bits=8, mode="mxfp8")
                y = mx.quantized_matmul(mx.ones((4, 64), dtype), w, scales, transpose=True,
                                        group_size=MXFP8_GROUP, bits=8, mode="mxfp8")
                got = y[0, 0].item()
            _PROBED[key] = "" if got == 64.0 else f"mx.quantized_matmul (mxfp8) gave {got}, not 64"
        except (RuntimeError, ValueError) as e:
            _PROBED[key] = f"mx.quantized_matmul (mxfp8): {(str(e) or type(e).__name__).splitlines()[0]}"
    return _PROBED[key]


# ---- memory the device has -------------------------------------------------------------------


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), if one is set."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def parse_bytes(text: str) -> int:
    """"8GB", "512MB", "1.5G", "1048576" -> bytes (powers of 1000, as `zreg` prints them)."""
    units = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
    t = text.strip().upper()
    number = t.rstrip("KMGTB")
    try:
        return int(float(number) * units[t[len(number):]])
    except (ValueError, KeyError):
        raise BadRequest(f"ZREG_MEMORY_LIMIT={text!r}: expected a size such as 8GB or 512MB") from None


def memory_available(backend: Backend) -> tuple[int, str]:
    """(bytes this run may use, where the number comes from). ZREG_MEMORY_LIMIT caps it."""
    found = _device_memory(backend)
    limit = os.environ.get("ZREG_MEMORY_LIMIT")
    if limit and parse_bytes(limit) < found[0]:
        return parse_bytes(limit), "ZREG_MEMORY_LIMIT"
    return found


def _device_memory(backend: Backend) -> tuple[int, str]:
    if backend.device == "gpu":
        info = mx.device_info(mx.gpu)
        for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
            if info.get(key):
                return int(info[key]), f"MLX device_info {key}"
    free = [(n, w) for n, w in ((_meminfo_available(), "MemAvailable"), (_cgroup_room(), "cgroup limit"))
            if n is not None]
    if free:
        return min(free)
    if sys.platform == "darwin":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    raise RuntimeFailure("cannot tell how much memory is available on this machine")
