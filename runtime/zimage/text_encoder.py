"""Z-Image's text encoder: Qwen3 (transformers `Qwen3Model`), run the way the pipeline uses it.

The pipeline takes `hidden_states[-2]`: the output of the second-to-last decoder layer, before
the final norm. So the last layer and `norm` are checked against the config but never loaded.

The reference pads the prompt to 512 tokens and runs a causal + padding mask, then keeps the
real tokens. Pads come after the real tokens and attention is causal, so the real tokens never
see them: running the real tokens alone gives the same states (tested against transformers),
at a fraction of the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UnsupportedModel
from .. import ops
from ..layers import Linear, RMSNorm

# Stored key prefixes: the published folder has Qwen3ForCausalLM keys (`model.`), a
# `Qwen3Model.save_pretrained` folder has none. `lm_head.weight` (untied heads) is never used.
PREFIXES = ("model.", "")
UNUSED = ("lm_head.weight",)


@dataclass(frozen=True)
class TextEncoderConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int

    @classmethod
    def from_dict(cls, d: dict) -> "TextEncoderConfig":
        if d.get("model_type", "qwen3") != "qwen3":
            raise UnsupportedModel(f"text_encoder/config.json: model_type {d.get('model_type')!r}, "
                                   f"expected qwen3")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise UnsupportedModel(f"text_encoder: rope scaling {rope} is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"text_encoder: hidden_act {d.get('hidden_act')!r} is not supported")
        heads = d["num_attention_heads"]
        cfg = cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                  num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
                  num_key_value_heads=d.get("num_key_value_heads", heads),
                  head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                  rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                  rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 1e6))),
                  vocab_size=d["vocab_size"])
        if cfg.num_hidden_layers < 2:
            raise UnsupportedModel("text_encoder: the pipeline reads hidden_states[-2], so it needs >= 2 layers")
        if heads % cfg.num_key_value_heads:
            raise UnsupportedModel(f"text_encoder: {heads} heads is not a multiple of "
                                   f"{cfg.num_key_value_heads} kv heads")
        return cfg


def rope_cos_sin(cfg: TextEncoderConfig, n: int) -> tuple[mx.array, mx.array]:
    """Qwen's default RoPE tables [n, head_dim] for positions 0..n-1, in float32 as transformers
    computes them (inv_freq in float32, then position * inv_freq, halves concatenated)."""
    d = cfg.head_dim
    inv_freq = (1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d)))
    inv_freq = inv_freq.astype(np.float32)
    freqs = np.arange(n, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return mx.array(np.cos(emb)), mx.array(np.sin(emb))


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = Linear(h, self.n_heads * hd, bias=False)
        self.k_proj = Linear(h, self.n_kv * hd, bias=False)
        self.v_proj = Linear(h, self.n_kv * hd, bias=False)
        self.o_proj = Linear(self.n_heads * hd, h, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv, -1).transpose(0, 2, 1, 3)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = ops.attention(q, k, v, scale=q.shape[-1] ** -0.5, causal=True)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cos, sin) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def _run_layer(prefix: str, layer, fn):
    out = fn()
    mx.eval(out)  # layer by layer: one layer's temporaries at a time
    return out


class TextEncoder(nn.Module):
    """All layers and the norm exist as placeholders (so the store is checked against the whole
    config); only `embed_tokens` rows and layers 0..N-2 are ever loaded and run."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = {"weight": mx.zeros((cfg.vocab_size, cfg.hidden_size))}
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @staticmethod
    def used(name: str, cfg: TextEncoderConfig) -> bool:
        """Whether hidden_states[-2] depends on this (local) parameter name. The embedding table
        is read row by row from its blob instead (see `pipeline`), so it is not loaded whole."""
        if name.startswith("layers."):
            return int(name.split(".")[1]) < cfg.num_hidden_layers - 1
        return False

    def __call__(self, embeddings: mx.array, each_layer=None) -> mx.array:
        """embeddings [1, n, hidden] of the real tokens -> hidden_states[-2] [n, hidden].
        `each_layer(prefix, layer, run)` wraps every layer call (low-memory streaming)."""
        run = each_layer or _run_layer
        cos, sin = rope_cos_sin(self.cfg, embeddings.shape[1])
        cos, sin = cos.astype(embeddings.dtype), sin.astype(embeddings.dtype)
        x = embeddings
        for i, layer in enumerate(self.layers[: self.cfg.num_hidden_layers - 1]):
            x = run(f"layers.{i}", layer, lambda lay=layer, x=x: lay(x, cos, sin))
        return x[0]
