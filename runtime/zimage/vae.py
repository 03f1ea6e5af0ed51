"""The FLUX AutoencoderKL decoder (diffusers `AutoencoderKL` with `Decoder`), NHWC as MLX wants.

Decode: z / scaling_factor + shift_factor -> decoder -> clamp((x + 1) / 2, 0, 1). The encoder's
tensors are in the store too; text-to-image never runs them, so they are checked by name and
shape (`encoder_shapes`) and never loaded.

Memory: MLX's CPU conv2d unfolds its input (im2col, 9x for 3x3), so a full-resolution conv of
the real VAE at 1024x1024 would need ~5 GB for one layer; `ops.conv3x3` works in bands of rows
(and upsamples per band). `decode_tiled` decodes large images in overlapping tiles exactly as
diffusers' `AutoencoderKL.tiled_decode` does. Conv weights are converted once at load to MLX's
layout in the compute dtype (float32 on the CPU: twice the stored bf16 size, 336 MB for the
real VAE).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import UnsupportedModel
from .. import ops
from ..layers import Linear

GROUPNORM_EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    latent_channels: int
    in_channels: int
    out_channels: int
    scaling_factor: float
    shift_factor: float
    sample_size: int
    mid_block_add_attention: bool

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        n = len(d.get("block_out_channels", ()))
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise UnsupportedModel(f"vae {d.get('_class_name')!r} is not supported (AutoencoderKL is)")
        if d.get("up_block_types", ["UpDecoderBlock2D"] * n) != ["UpDecoderBlock2D"] * n:
            raise UnsupportedModel(f"vae up_block_types {d.get('up_block_types')} are not supported")
        if d.get("act_fn", "silu") != "silu" or d.get("use_post_quant_conv") or d.get("use_quant_conv"):
            raise UnsupportedModel("vae: only silu, without quant convs (the FLUX VAE), is supported")
        if d.get("latents_mean") or d.get("latents_std"):
            raise UnsupportedModel("vae: latents_mean/latents_std are not supported")
        return cls(block_out_channels=tuple(d["block_out_channels"]),
                   layers_per_block=d.get("layers_per_block", 2),
                   norm_num_groups=d.get("norm_num_groups", 32),
                   latent_channels=d.get("latent_channels", 16), in_channels=d.get("in_channels", 3),
                   out_channels=d.get("out_channels", 3), scaling_factor=d.get("scaling_factor", 0.3611),
                   shift_factor=d.get("shift_factor") or 0.0, sample_size=d.get("sample_size", 1024),
                   mid_block_add_attention=d.get("mid_block_add_attention", True))

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# ---- layers ------------------------------------------------------------------------------------


class Conv2d(nn.Module):
    """3x3 (padding 1) or 1x1 conv; `sanitize` stores the weight as MLX's [out, kh, kw, in]."""

    def __init__(self, c_in: int, c_out: int, k: int):
        super().__init__()
        self.weight = mx.zeros((c_out, k, k, c_in))
        self.bias = mx.zeros((c_out,))

    def __call__(self, x: mx.array, upsample: bool = False, residual: mx.array | None = None,
                 bias: mx.array | bool = True, norm: "GroupNorm | None" = None) -> mx.array:
        """conv(SiLU(norm(x)) if `norm` else x). `residual` is added to the output; `bias`: True for
        the layer's own, False for none, or an array to use instead. On the CPU the norm is applied
        band by band as the conv reads its input, and the residual in its output pass."""
        w = self.weight.astype(x.dtype)
        b = self.bias if bias is True else None if bias is False else bias
        if w.shape[1] == 1:  # a 1x1 conv is a matmul over channels (no unfolded copy)
            x = x if norm is None else norm(x, silu=True)
            y = (x.reshape(-1, x.shape[-1]) @ w.reshape(w.shape[0], -1).T).reshape(*x.shape[:3], -1)
            y = y if b is None else y + b.astype(x.dtype)
            return y if residual is None else y + residual
        b = mx.zeros((w.shape[0],), x.dtype) if b is None else b.astype(x.dtype)
        prenorm = None if norm is None else (norm.weight, norm.bias, norm.groups, GROUPNORM_EPS)
        return ops.conv3x3(x, w, b, upsample=upsample, residual=residual, prenorm=prenorm)


class GroupNorm(nn.Module):
    """torch's GroupNorm (contiguous channel groups, float32 statistics), optionally fused with
    the SiLU that follows it everywhere in the decoder."""

    def __init__(self, groups: int, channels: int):
        super().__init__()
        self.weight = mx.zeros((channels,))
        self.bias = mx.zeros((channels,))
        self.groups = groups

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        return ops.group_norm_silu(x, self.weight, self.bias, self.groups, GROUPNORM_EPS, silu)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, c_in)
        self.conv1 = Conv2d(c_in, c_out, 3)
        self.norm2 = GroupNorm(groups, c_out)
        self.conv2 = Conv2d(c_out, c_out, 3)
        if c_in != c_out:
            self.conv_shortcut = Conv2d(c_in, c_out, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(x, norm=self.norm1)
        mx.eval(h)  # one conv's temporaries at a time (the numpy path evaluates anyway)
        # The skip path is added in conv2's output pass (no separate full-size add); a 1x1
        # shortcut's bias joins conv2's.
        skip, bias = x, self.conv2.bias
        if "conv_shortcut" in self:
            skip = self.conv_shortcut(x, bias=False)
            bias = bias + self.conv_shortcut.bias
        return self.conv2(h, norm=self.norm2, residual=skip, bias=bias)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, c)
        self.to_q = Linear(c, c)
        self.to_k = Linear(c, c)
        self.to_v = Linear(c, c)
        self.to_out = [Linear(c, c)]

    def __call__(self, x: mx.array) -> mx.array:
        N, H, W, C = x.shape
        h = self.group_norm(x).reshape(N, 1, H * W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        o = ops.attention(q, k, v, scale=C ** -0.5)
        return x + self.to_out[0](o).reshape(N, H, W, C)


class MidBlock(nn.Module):
    """resnet, attention, resnet (run by `Decoder.sequence`)."""

    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)]
        if attention:
            self.attentions = [AttentionBlock(c, groups)]


class Upsampler(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = Conv2d(c, c, 3)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x, upsample=True)  # nearest-neighbour 2x, then the conv


class UpBlock(nn.Module):
    """resnets, then an upsampler except in the last block (run by `Decoder.sequence`)."""

    def __init__(self, c_in: int, c_out: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n)]
        if upsample:
            self.upsamplers = [Upsampler(c_out)]


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, boc[-1], 3)
        self.mid_block = MidBlock(boc[-1], g, cfg.mid_block_add_attention)
        rev = list(reversed(boc))
        self.up_blocks = [UpBlock(rev[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, i < len(rev) - 1)
                          for i, c in enumerate(rev)]
        self.conv_norm_out = GroupNorm(g, boc[0])
        self.conv_out = Conv2d(boc[0], cfg.out_channels, 3)

    def sequence(self) -> list:
        """Every layer in order, flat: run from one loop, only the current input stays alive
        (nested calls would keep each block's input until the block returns)."""
        mid = self.mid_block
        seq = [self.conv_in, mid.resnets[0]] + (mid.attentions if "attentions" in mid else []) + [mid.resnets[1]]
        for block in self.up_blocks:
            seq += block.resnets + (block.upsamplers if "upsamplers" in block else [])
        return seq + [lambda x: self.conv_out(x, norm=self.conv_norm_out)]

    def __call__(self, z: mx.array) -> mx.array:
        x = z
        for layer in self.sequence():
            x = layer(x)
            mx.eval(x)  # bound the lazy graph: one layer's temporaries at a time
        return x


class VAEDecoder(nn.Module):
    """Holds `decoder.*`; the stored names are `decoder.<...>` too."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg)

    def decode(self, latents: mx.array, dtype=mx.float32, tile: int | None = None) -> mx.array:
        """latents [1, C, h, w] (the pipeline's layout) -> image [1, H, W, 3] in [0, 1], float32.
        `tile` (latent pixels) decodes in overlapping tiles when the latent is larger."""
        z = latents.astype(mx.float32) / self.cfg.scaling_factor + self.cfg.shift_factor
        z = z.transpose(0, 2, 3, 1).astype(dtype)
        if tile and (z.shape[1] > tile or z.shape[2] > tile):
            x = decode_tiled(self.decoder, z, tile, self.cfg.scale_factor)
        else:
            x = self.decoder(z)
        return mx.clip(x.astype(mx.float32) * 0.5 + 0.5, 0.0, 1.0)


def decode_tiled(decoder: Decoder, z: mx.array, tile: int, scale: int, overlap: float = 0.25) -> mx.array:
    """diffusers' `AutoencoderKL.tiled_decode`: tiles of `tile` latent pixels with a 25% overlap,
    blended linearly into the tile above and to the left, then cropped."""
    stride = int(tile * (1 - overlap))
    tile_px = tile * scale
    blend = int(tile_px * overlap)
    limit = tile_px - blend
    rows = []
    for i in range(0, z.shape[1], stride):
        row = []
        for j in range(0, z.shape[2], stride):
            decoded = decoder(z[:, i: i + tile, j: j + tile])
            mx.eval(decoded)
            row.append(decoded)
        rows.append(row)
    out_rows = []
    for i, row in enumerate(rows):
        out = []
        for j, t in enumerate(row):
            if i > 0:
                t = _blend(rows[i - 1][j], t, blend, axis=1)
            if j > 0:
                t = _blend(row[j - 1], t, blend, axis=2)
            row[j] = t  # the reference blends in place, so later tiles see the blended one
            out.append(t[:, :limit, :limit])
        out_rows.append(mx.concatenate(out, axis=2))
    return mx.concatenate(out_rows, axis=1)


def _blend(a: mx.array, b: mx.array, extent: int, axis: int) -> mx.array:
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    w = (mx.arange(extent, dtype=mx.float32) / extent).astype(b.dtype)
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    w = w.reshape(shape)
    head_a = a[:, -extent:] if axis == 1 else a[:, :, -extent:]
    head_b = b[:, :extent] if axis == 1 else b[:, :, :extent]
    mixed = head_a * (1 - w) + head_b * w
    rest = b[:, extent:] if axis == 1 else b[:, :, extent:]
    return mx.concatenate([mixed, rest], axis=axis)


# ---- stored names ------------------------------------------------------------------------------


def sanitize(name: str, array: mx.array, dtype) -> mx.array:
    """Stored layout -> MLX layout: conv weights [out, in, kh, kw] -> [out, kh, kw, in], made
    contiguous in the compute dtype once, at load (a conv needs that layout at every use)."""
    if array.ndim != 4:
        return array
    return mx.contiguous(array.transpose(0, 2, 3, 1).astype(dtype))


def stored_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """MLX layout -> stored layout (for checking the store without reading it)."""
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape


def encoder_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Names and stored shapes of the encoder's tensors (present in the store, never loaded)."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(p, o, i, k):
        out[f"{p}.weight"], out[f"{p}.bias"] = (o, i, k, k), (o,)

    def norm(p, c):
        out[f"{p}.weight"], out[f"{p}.bias"] = (c,), (c,)

    def resnet(p, i, o):
        norm(f"{p}.norm1", i), conv(f"{p}.conv1", o, i, 3), norm(f"{p}.norm2", o), conv(f"{p}.conv2", o, o, 3)
        if i != o:
            conv(f"{p}.conv_shortcut", o, i, 1)

    boc = cfg.block_out_channels
    conv("encoder.conv_in", boc[0], cfg.in_channels, 3)
    c_out = boc[0]
    for i, c in enumerate(boc):
        c_in, c_out = c_out, c
        for j in range(cfg.layers_per_block):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", c_in if j == 0 else c_out, c_out)
        if i < len(boc) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c_out, c_out, 3)
    c = boc[-1]
    if cfg.mid_block_add_attention:
        norm("encoder.mid_block.attentions.0.group_norm", c)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            out[f"encoder.mid_block.attentions.0.{proj}.weight"] = (c, c)
            out[f"encoder.mid_block.attentions.0.{proj}.bias"] = (c,)
    resnet("encoder.mid_block.resnets.0", c, c), resnet("encoder.mid_block.resnets.1", c, c)
    norm("encoder.conv_norm_out", c)
    conv("encoder.conv_out", 2 * cfg.latent_channels, c, 3)
    return out
