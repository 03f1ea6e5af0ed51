"""Z-Image's diffusion transformer (diffusers `ZImageTransformer2DModel`, text-to-image path).

Parameter names are the stored ones, so no renames. shared/notes/zimage.md has the facts; the
comments below say where the reference does something easy to get wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import BadRequest, UnsupportedModel
from .. import ops
from ..layers import Linear, RMSNorm

ADALN_EMBED_DIM = 256   # adaLN input width is min(dim, 256)
T_EMBED_FREQ_DIM = 256  # sinusoidal timestep features
T_EMBED_MID = 1024      # hard-coded upstream, whatever dim is
SEQ_MULTI_OF = 32       # both token streams are padded to a multiple of this
PATCH, F_PATCH = 2, 1   # the pipeline always calls the transformer with patch_size=2, f_patch_size=1


@dataclass(frozen=True)
class TransformerConfig:
    dim: int
    n_layers: int
    n_refiner_layers: int
    n_heads: int
    in_channels: int
    cap_feat_dim: int
    norm_eps: float
    qk_norm: bool
    rope_theta: float
    t_scale: float
    axes_dims: tuple[int, ...]
    axes_lens: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        if d.get("siglip_feat_dim") is not None:
            raise UnsupportedModel("transformer/config.json sets siglip_feat_dim (Z-Image Omni), which "
                                   "zreg does not run")
        if PATCH not in d.get("all_patch_size", [PATCH]) or F_PATCH not in d.get("all_f_patch_size", [F_PATCH]):
            raise UnsupportedModel(f"transformer/config.json has no {PATCH}-{F_PATCH} patch embedder "
                                   f"(all_patch_size {d.get('all_patch_size')}, all_f_patch_size "
                                   f"{d.get('all_f_patch_size')})")
        cfg = cls(dim=d.get("dim", 3840), n_layers=d.get("n_layers", 30),
                  n_refiner_layers=d.get("n_refiner_layers", 2), n_heads=d.get("n_heads", 30),
                  in_channels=d.get("in_channels", 16), cap_feat_dim=d.get("cap_feat_dim", 2560),
                  norm_eps=d.get("norm_eps", 1e-5), qk_norm=d.get("qk_norm", True),
                  rope_theta=d.get("rope_theta", 256.0), t_scale=d.get("t_scale", 1000.0),
                  axes_dims=tuple(d.get("axes_dims", (32, 48, 48))),
                  axes_lens=tuple(d.get("axes_lens", (1024, 512, 512))))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        # Loud at construction, like the reference's asserts but with the numbers.
        if self.dim % self.n_heads:
            raise UnsupportedModel(f"transformer: dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if sum(self.axes_dims) != self.head_dim or any(a % 2 for a in self.axes_dims):
            raise UnsupportedModel(f"transformer: axes_dims {list(self.axes_dims)} must be even and sum "
                                   f"to dim/n_heads = {self.head_dim}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise UnsupportedModel("transformer: axes_dims and axes_lens need three entries")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return int(self.dim / 3 * 8)  # the reference's float expression, so the same rounding

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def patch_dim(self) -> int:
        return F_PATCH * PATCH * PATCH * self.in_channels


# ---- rotary embedding -------------------------------------------------------------------------


def rope_angles(cfg: TransformerConfig, positions: np.ndarray) -> tuple[mx.array, mx.array]:
    """cos, sin [L, head_dim/2] for integer (frame, h, w) positions [L, 3].

    As the reference: per axis, freqs = 1/theta^(arange(0,d,2)/d) and position*freq in float64,
    then float32 before the polar form; the three axis tables side by side.
    """
    cols = []
    for axis, d in enumerate(cfg.axes_dims):
        freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        cols.append(np.outer(positions[:, axis].astype(np.float64), freqs).astype(np.float32))
    angles = np.concatenate(cols, axis=1)
    return mx.array(np.cos(angles)), mx.array(np.sin(angles))


# ---- blocks ------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.dim
        self.n_heads = cfg.n_heads
        self.to_q = Linear(d, d, bias=False)
        self.to_k = Linear(d, d, bias=False)
        self.to_v = Linear(d, d, bias=False)
        self.to_out = [Linear(d, d, bias=False)]
        if cfg.qk_norm:
            self.norm_q = RMSNorm(cfg.head_dim, eps=1e-5)  # fixed 1e-5 upstream, not norm_eps
            self.norm_k = RMSNorm(cfg.head_dim, eps=1e-5)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
        B, L, D = x.shape
        qk_norm = "norm_q" in self
        # RMSNorm on q and k (per head), then RoPE: one fused op, out as [B, H, L, head_dim].
        # The attention scale is folded into q here, so the kernel need not scale the scores.
        scale = (D // self.n_heads) ** -0.5
        q = ops.norm_rope(self.to_q(x).reshape(B, L, self.n_heads, -1),
                          self.norm_q.weight if qk_norm else None, self.norm_q.eps if qk_norm else 0.0, *rope,
                          scale=scale)
        k = ops.norm_rope(self.to_k(x).reshape(B, L, self.n_heads, -1),
                          self.norm_k.weight if qk_norm else None, self.norm_k.eps if qk_norm else 0.0, *rope)
        v = self.to_v(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        o = ops.attention(q, k, v, scale=1.0)
        return self.to_out[0](o.transpose(0, 2, 1, 3).reshape(B, L, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(ops.silu_mul(self.w1(x), self.w3(x)))


class Block(nn.Module):
    """One transformer block; `modulation` blocks take scale/gate from the timestep (no shift
    term; gates are tanh'd; scales are 1 + s)."""

    def __init__(self, cfg: TransformerConfig, modulation: bool):
        super().__init__()
        d = cfg.dim
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(d, cfg.ffn_hidden)
        self.attention_norm1 = RMSNorm(d, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(d, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(d, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(d, cfg.norm_eps)
        if modulation:
            self.adaLN_modulation = [Linear(cfg.adaln_dim, 4 * d)]  # no SiLU before it

    def __call__(self, x: mx.array, rope, adaln: mx.array | None = None) -> mx.array:
        # norm1(x) * (1 + scale) and x + gate * norm2(y) as fused ops (ops.rms_norm,
        # ops.residual_rms_norm): the same arithmetic as the reference, in fewer passes.
        scale_msa = gate_msa = scale_mlp = gate_mlp = None
        if "adaLN_modulation" in self:
            mod = self.adaLN_modulation[0](adaln)[:, None, :]
            scale_msa, gate_msa, scale_mlp, gate_mlp = mx.split(mod, 4, axis=-1)
            gate_msa, gate_mlp = mx.tanh(gate_msa), mx.tanh(gate_mlp)
        a1, a2, f1, f2 = self.attention_norm1, self.attention_norm2, self.ffn_norm1, self.ffn_norm2
        attn = self.attention(ops.rms_norm(x, a1.weight, a1.eps, scale=scale_msa), rope)
        x = ops.residual_rms_norm(x, attn, a2.weight, a2.eps, gate=gate_msa)
        ffn = self.feed_forward(ops.rms_norm(x, f1.weight, f1.eps, scale=scale_mlp))
        return ops.residual_rms_norm(x, ffn, f2.weight, f2.eps, gate=gate_mlp)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dims: int):
        super().__init__()
        self.mlp = [Linear(T_EMBED_FREQ_DIM, T_EMBED_MID), nn.SiLU(), Linear(T_EMBED_MID, out_dims)]

    def __call__(self, t: mx.array, dtype) -> mx.array:
        half = T_EMBED_FREQ_DIM // 2
        freqs = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / half)
        args = t[:, None].astype(mx.float32) * freqs[None]
        emb = mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)  # cos first, then sin
        h = self.mlp[0](emb.astype(dtype))
        return self.mlp[2](nn.silu(h))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dims: int, adaln_dim: int):
        super().__init__()
        self.linear = Linear(dim, out_dims)
        self.adaLN_modulation = [nn.SiLU(), Linear(adaln_dim, dim)]

    def __call__(self, x: mx.array, adaln: mx.array) -> mx.array:
        scale = 1.0 + self.adaLN_modulation[1](nn.silu(adaln))
        x = mx.fast.layer_norm(x, None, None, 1e-6) * scale[:, None, :]
        return self.linear(x)


# ---- the model -------------------------------------------------------------------------------


def _run_block(prefix: str, block, fn):
    # Evaluate block by block: the peak is then one block's temporaries whatever the depth
    # (and memory.py can say what it is).
    out = fn()
    mx.eval(out)
    return out


def _pad_len(n: int) -> int:
    return (-n) % SEQ_MULTI_OF


class ZImageTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        d, key = cfg.dim, f"{PATCH}-{F_PATCH}"
        self.x_pad_token = mx.zeros((1, d))
        self.cap_pad_token = mx.zeros((1, d))
        self.all_x_embedder = {key: Linear(cfg.patch_dim, d)}
        self.all_final_layer = {key: FinalLayer(d, cfg.patch_dim, cfg.adaln_dim)}
        self.noise_refiner = [Block(cfg, modulation=True) for _ in range(cfg.n_refiner_layers)]
        self.context_refiner = [Block(cfg, modulation=False) for _ in range(cfg.n_refiner_layers)]
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_embedder = [RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), Linear(cfg.cap_feat_dim, d)]
        self.layers = [Block(cfg, modulation=True) for _ in range(cfg.n_layers)]

    # Parts the low-memory mode loads one at a time: (prefix, module) in the order they run.
    def parts(self) -> list[tuple[str, nn.Module]]:
        return ([(f"noise_refiner.{i}", b) for i, b in enumerate(self.noise_refiner)]
                + [(f"context_refiner.{i}", b) for i, b in enumerate(self.context_refiner)]
                + [(f"layers.{i}", b) for i, b in enumerate(self.layers)])

    def prepare(self, latent_hw: tuple[int, int], cap_len: int) -> "Layout":
        """Positions and rotary tables for one latent size and caption length (same every step)."""
        return Layout(self.cfg, latent_hw, cap_len)

    def __call__(self, latents: mx.array, t: mx.array, cap_feats: mx.array, layout: "Layout",
                 dtype=mx.float32, each_block=None) -> mx.array:
        """latents [1, C, H, W] float32, t [1] (= 1 - sigma), cap_feats [n, cap_feat_dim].
        Returns the model output [1, C, H, W] (the pipeline negates it). `each_block(prefix,
        block, run)` wraps every block call (the low-memory mode loads and frees weights there)."""
        key = f"{PATCH}-{F_PATCH}"
        run = each_block or _run_block
        adaln = self.t_embedder(t * self.cfg.t_scale, dtype)

        # Image tokens: patchify (channel fastest), embed, then learned pad tokens.
        C, (H, W) = self.cfg.in_channels, layout.latent_hw
        ht, wt = H // PATCH, W // PATCH
        x = latents[0].reshape(C, ht, PATCH, wt, PATCH).transpose(1, 3, 2, 4, 0).reshape(ht * wt, -1)
        x = self.all_x_embedder[key](x.astype(dtype))
        x = mx.concatenate([x, mx.repeat(self.x_pad_token.astype(dtype), layout.img_pad, axis=0)])[None]
        for i, block in enumerate(self.noise_refiner):
            x = run(f"noise_refiner.{i}", block, lambda b=block, x=x: b(x, layout.img_rope, adaln))

        # Caption tokens: RMSNorm + Linear, then learned pad tokens; unmodulated refiner.
        c = self.cap_embedder[1](self.cap_embedder[0](cap_feats.astype(dtype)))
        c = mx.concatenate([c, mx.repeat(self.cap_pad_token.astype(dtype), layout.cap_pad, axis=0)])[None]
        for i, block in enumerate(self.context_refiner):
            c = run(f"context_refiner.{i}", block, lambda b=block, c=c: b(c, layout.cap_rope))

        # Joint sequence, image first; pads are not masked (as upstream).
        u = mx.concatenate([x, c], axis=1)
        for i, block in enumerate(self.layers):
            u = run(f"layers.{i}", block, lambda b=block, u=u: b(u, layout.joint_rope, adaln))

        out = self.all_final_layer[key](u, adaln)[0, : ht * wt].astype(mx.float32)
        out = out.reshape(ht, wt, PATCH, PATCH, C).transpose(4, 0, 2, 1, 3).reshape(C, H, W)
        return out[None]


class Layout:
    """Token counts, position ids and rotary tables for (latent size, caption length).

    Caption positions are (1..Lc_padded, 0, 0), pads included (the reference builds the grid
    over the padded length); image positions (Lc_padded + 1, h, w); image pads (0, 0, 0).
    """

    def __init__(self, cfg: TransformerConfig, latent_hw: tuple[int, int], cap_len: int):
        H, W = latent_hw
        ht, wt = H // PATCH, W // PATCH
        self.latent_hw = latent_hw
        self.img_len, self.img_pad = ht * wt, _pad_len(ht * wt)
        self.cap_len, self.cap_pad = cap_len, _pad_len(cap_len)
        cap_total = cap_len + self.cap_pad
        cap_pos = np.zeros((cap_total, 3), np.int64)
        cap_pos[:, 0] = np.arange(1, cap_total + 1)
        hh, ww = np.meshgrid(np.arange(ht), np.arange(wt), indexing="ij")
        img_pos = np.zeros((self.img_len + self.img_pad, 3), np.int64)
        img_pos[: self.img_len] = np.stack([np.full(ht * wt, cap_total + 1), hh.ravel(), ww.ravel()], 1)
        for pos in (cap_pos, img_pos):
            for axis, n in enumerate(cfg.axes_lens):
                if pos[:, axis].max() >= n:
                    raise BadRequest(f"position {int(pos[:, axis].max())} on rotary axis {axis} is past "
                                     f"the model's axes_lens {n}: use a smaller size")
        self.cap_rope = rope_angles(cfg, cap_pos)
        self.img_rope = rope_angles(cfg, img_pos)
        self.joint_rope = tuple(mx.concatenate([a, b]) for a, b in zip(self.img_rope, self.cap_rope))
        self.tokens = self.img_len + self.img_pad + cap_total
