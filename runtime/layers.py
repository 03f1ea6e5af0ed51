"""Blocks shared by the model parts. Parameters are placeholders until `weights.assign` sets
the stored arrays; MLX is lazy, so a placeholder that is never used is never allocated.

Every layer computes in the dtype of its input (the backend's compute dtype) and casts its
stored weights to it at use: a bfloat16 or float32 weight stays as stored, the cast is a
transient of one layer's size (and free when the dtypes already agree).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import ops
from .weights import MXFP8_GROUP


class Linear(nn.Module):
    """y = x W^T + b, with W float (any stored dtype) or mxfp8 (`weight` packed uint32 + `scales`)."""

    # "quantized": mx.quantized_matmul (the GPU path); "dequantize": dequantize this one weight at
    # use and run a BLAS matmul (the CPU path: MLX's CPU mxfp8 kernel is ~100x slower than BLAS).
    fp8_matmul = "quantized"

    def __init__(self, in_dims: int, out_dims: int, bias: bool = True):
        super().__init__()
        self.weight = mx.zeros((out_dims, in_dims))
        if bias:
            self.bias = mx.zeros((out_dims,))

    def __call__(self, x: mx.array) -> mx.array:
        w, transient = self.weight, False
        if "scales" in self:
            if Linear.fp8_matmul == "quantized":
                y = mx.quantized_matmul(x, w, self.scales, transpose=True, group_size=MXFP8_GROUP,
                                        bits=8, mode="mxfp8")
            else:
                w = mx.dequantize(w, self.scales, group_size=MXFP8_GROUP, bits=8, mode="mxfp8", dtype=x.dtype)
                y, transient = x @ w.T, True
        else:
            transient = w.dtype != x.dtype
            y = x @ w.astype(x.dtype).T
        if "bias" in self:
            y = y + self.bias.astype(x.dtype)
        if transient:
            # Evaluate now, so this layer's cast/dequantized copy is freed before the next one is
            # made: left to the lazy graph, MLX may build many of them before using any.
            mx.eval(y)
        return y


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return ops.rms_norm(x, self.weight, self.eps)


def param_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """name -> shape of every placeholder parameter (what the store must hold)."""
    from mlx.utils import tree_flatten

    return {name: tuple(array.shape) for name, array in tree_flatten(module.parameters())}


def linear_weights(module: nn.Module) -> set[str]:
    """Names of the weights of every Linear in the tree: the tensors that may be stored FP8."""
    return {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, Linear)}
