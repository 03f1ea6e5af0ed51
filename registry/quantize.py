"""Quantization formats and the policy of what to quantize (format: docs/format.md §7).

fp8 is the OCP MX FP8 layout MLX calls `mxfp8`: E4M3 elements and one power-of-two E8M0 scale
per 32 consecutive elements of a row. We store the elements as `F8_E4M3` with the weight's own
shape and the scales as a sibling tensor `<module>.scales` (`F8_E8M0`, shape [rows, cols/32]),
the exact bytes `mx.quantize(w, group_size=32, bits=8, mode="mxfp8")` returns, so the runtime
multiplies with `mx.quantized_matmul` directly. The encoder is numpy, so the registry needs no
MLX and threads can run it in parallel; a test checks it against MLX bit for bit.

bf16 rounds float32 to bfloat16 (round to nearest even) and notes whether that lost anything.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from .errors import InvalidModel

FP8 = "fp8"
BF16 = "bf16"
MODES = (FP8, BF16)
MXFP8 = "mxfp8"            # the name recorded in the config blob
GROUP = 32
E4M3_MAX = 448.0
SCALES_SUFFIX = "scales"
FP8_COMPONENTS = ("transformer", "text_encoder")
FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}

# What fp8 leaves at source precision by default. Norms, biases, pad tokens and embeddings
# are tiny or precision-critical; the t/x/cap embedders, the adaLN modulation and the final
# layer are ~2% of the bytes and feed every token's scale and gate, so they stay as they are
# (docs/quantization.md has the measurements).
DEFAULT_FP8_SKIP = ("*norm*", "*.bias", "*pad_token*", "*embed*", "*adaLN_modulation*", "*final_layer*")


@dataclass
class Policy:
    mode: str
    skip: tuple[str, ...] = field(default=None)

    def __post_init__(self):
        if self.mode not in MODES:
            raise InvalidModel(f"unknown quantization mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.skip is None:
            self.skip = DEFAULT_FP8_SKIP if self.mode == FP8 else ()

    def record(self) -> str:
        return MXFP8 if self.mode == FP8 else BF16

    def action(self, layer_name: str, dtype: str, shape) -> str | None:
        """What to do with one tensor: FP8, BF16 or None (keep as is)."""
        if any(fnmatch.fnmatchcase(layer_name, pattern) for pattern in self.skip):
            return None
        if self.mode == BF16:
            return BF16 if dtype == "F32" else None
        component = layer_name.split("/", 1)[0]
        if (component in FP8_COMPONENTS and layer_name.endswith(".weight") and len(shape) == 2
                and dtype in FLOAT_DTYPES and shape[1] % GROUP == 0 and shape[1] > 0):
            return FP8
        return None


def scales_name(weight_name: str) -> str:
    """`x/layers.0.to_q.weight` -> `x/layers.0.to_q.scales` (MLX's QuantizedLinear naming)."""
    return weight_name[: -len("weight")] + SCALES_SUFFIX


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    return raw.view(FLOAT_DTYPES[dtype]).astype(np.float32, copy=False)


def encode_mxfp8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [r, c] (c % 32 == 0) -> (E4M3 bytes uint8 [r, c], E8M0 scales uint8 [r, c/32]).

    The scale is the smallest power of two that brings the block's largest magnitude within
    E4M3's range (2^ceil(log2(amax/448))), as MLX chooses it; all-zero blocks get scale 1.
    """
    blocks = rows.reshape(rows.shape[0], -1, GROUP)
    amax = np.abs(blocks).max(axis=-1)
    mantissa, exponent = np.frexp(amax / np.float32(E4M3_MAX))
    exponent = np.where(mantissa > 0.5, exponent, exponent - 1)   # ceil(log2(.)) exactly
    exponent = np.clip(np.where(amax > 0, exponent, 0), -127, 127)
    inverse = np.exp2(-exponent.astype(np.float32))               # exact: a power of two
    scaled = np.clip(blocks * inverse[..., None], -E4M3_MAX, E4M3_MAX)
    elements = scaled.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).reshape(rows.shape)
    return elements, (exponent + 127).astype(np.uint8)


def decode_mxfp8(elements: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of encode_mxfp8, in float32."""
    values = elements.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    blocks = values.reshape(values.shape[0], -1, GROUP)
    factor = np.exp2(scales.astype(np.float32) - 127)
    return (blocks * factor[..., None]).reshape(values.shape)


def encode_bf16(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """float32 -> bfloat16 bytes (round to nearest even), and whether it was exact."""
    exact = not (values.view(np.uint32) & 0xFFFF).any()
    return values.astype(ml_dtypes.bfloat16).view(np.uint16), exact


def check_finite(values: np.ndarray, where: str) -> None:
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values.ravel()))[0])
        raise InvalidModel(f"{where}: holds {values.ravel()[bad]} (NaN/Inf) at element {bad}; "
                           "refusing to quantize it")
