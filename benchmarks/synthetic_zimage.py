"""Write a synthetic Z-Image-Turbo diffusers folder: real tensor names, shapes and dtypes, fake data.

    python benchmarks/synthetic_zimage.py DEST [--transformer-layers N] [--text-layers N] [--full] [--seed S]

The layout follows the published Tongyi-MAI/Z-Image-Turbo folder (see shared/notes/zimage.md):

    DEST/model_index.json
    DEST/scheduler/scheduler_config.json
    DEST/tokenizer/{tokenizer.json,tokenizer_config.json,vocab.json,merges.txt}   (small placeholders)
    DEST/transformer/config.json, diffusion_pytorch_model-0000{1,2,3}-of-00003.safetensors + .index.json
                                                                            float32, 30 layers, 24.6 GB
    DEST/text_encoder/config.json, generation_config.json, model-0000{1,2,3}-of-00003.safetensors
                      + model.safetensors.index.json                        bfloat16 Qwen3, 36 layers, 8.05 GB
    DEST/vae/config.json, diffusion_pytorch_model.safetensors              bfloat16 FLUX AutoencoderKL, 168 MB

`--full` writes all layers (~33 GB). The default keeps every per-tensor shape but only 2 main transformer
layers (plus the 2+2 refiner blocks) and 2 text-encoder layers (~5.7 GB), which is enough to time an import.

Data: every tensor (and every 16 MB chunk of it) holds different bytes, so a content-addressed store
dedups nothing. One random base block is XORed with a per-chunk key (a counter spread over the bits that
keep a value finite), which costs one vectorised XOR per chunk, so generation runs at memory speed.
Values are finite bf16 numbers of magnitude 2^-7..2^-5; float32 tensors hold bf16 values (low 16 bits
zero), like the real transformer. Files are written by a streaming safetensors writer: memory stays at a
few tens of MB whatever the folder size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from zreg.registry.safetensors_format import build_header

# ---- model facts (shared/notes/zimage.md) -------------------------------------------------------------

DIM = 3840                      # transformer width
N_HEADS = 30
HEAD_DIM = DIM // N_HEADS       # 128
FFN = int(DIM / 3 * 8)          # 10240
ADALN = min(DIM, 256)           # adaLN embedding width
T_MID = 1024                    # timestep MLP mid width, hard-coded upstream
PATCH_IN = 2 * 2 * 1 * 16       # pH * pW * pF * in_channels = 64
N_LAYERS = 30
N_REFINER = 2

TE_HIDDEN = 2560
TE_INTER = 9728
TE_LAYERS = 36
TE_HEADS = 32
TE_KV_HEADS = 8
TE_HEAD_DIM = 128
TE_VOCAB = 151936

VAE_CHANNELS = [128, 256, 512, 512]
VAE_LAYERS_PER_BLOCK = 2
VAE_LATENT = 16

DEFAULT_TRANSFORMER_LAYERS = 2
DEFAULT_TEXT_LAYERS = 2

DTYPE_SIZE = {"F32": 4, "BF16": 2}


# ---- tensor lists: [(name, shape)] in state-dict order -------------------------------------------------

def transformer_tensors(n_layers: int = N_LAYERS, n_refiner: int = N_REFINER) -> list[tuple[str, tuple]]:
    """ZImageTransformer2DModel keys: 15 per modulated block, 13 per context-refiner block, 15 globals."""
    out: list[tuple[str, tuple]] = []

    def block(prefix: str, modulated: bool) -> None:
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            out.append((f"{prefix}.attention.{p}.weight", (DIM, DIM)))
        out.append((f"{prefix}.attention.norm_q.weight", (HEAD_DIM,)))
        out.append((f"{prefix}.attention.norm_k.weight", (HEAD_DIM,)))
        for p in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            out.append((f"{prefix}.{p}.weight", (DIM,)))
        out.append((f"{prefix}.feed_forward.w1.weight", (FFN, DIM)))
        out.append((f"{prefix}.feed_forward.w2.weight", (DIM, FFN)))
        out.append((f"{prefix}.feed_forward.w3.weight", (FFN, DIM)))
        if modulated:
            out.append((f"{prefix}.adaLN_modulation.0.weight", (4 * DIM, ADALN)))
            out.append((f"{prefix}.adaLN_modulation.0.bias", (4 * DIM,)))

    out += [
        ("all_x_embedder.2-1.weight", (DIM, PATCH_IN)),
        ("all_x_embedder.2-1.bias", (DIM,)),
        ("all_final_layer.2-1.linear.weight", (PATCH_IN, DIM)),
        ("all_final_layer.2-1.linear.bias", (PATCH_IN,)),
        ("all_final_layer.2-1.adaLN_modulation.1.weight", (DIM, ADALN)),
        ("all_final_layer.2-1.adaLN_modulation.1.bias", (DIM,)),
    ]
    for i in range(n_refiner):
        block(f"noise_refiner.{i}", modulated=True)
    for i in range(n_refiner):
        block(f"context_refiner.{i}", modulated=False)
    out += [
        ("t_embedder.mlp.0.weight", (T_MID, 256)),
        ("t_embedder.mlp.0.bias", (T_MID,)),
        ("t_embedder.mlp.2.weight", (ADALN, T_MID)),
        ("t_embedder.mlp.2.bias", (ADALN,)),
        ("cap_embedder.0.weight", (TE_HIDDEN,)),
        ("cap_embedder.1.weight", (DIM, TE_HIDDEN)),
        ("cap_embedder.1.bias", (DIM,)),
        ("x_pad_token", (1, DIM)),
        ("cap_pad_token", (1, DIM)),
    ]
    for i in range(n_layers):
        block(f"layers.{i}", modulated=True)
    return out


def text_encoder_tensors(n_layers: int = TE_LAYERS) -> list[tuple[str, tuple]]:
    """Qwen3ForCausalLM keys with the `model.` prefix; embeddings tied, so no lm_head (398 at 36 layers)."""
    q, kv = TE_HEADS * TE_HEAD_DIM, TE_KV_HEADS * TE_HEAD_DIM
    out: list[tuple[str, tuple]] = [("model.embed_tokens.weight", (TE_VOCAB, TE_HIDDEN))]
    for i in range(n_layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (TE_HIDDEN,)),
            (f"{p}.self_attn.q_proj.weight", (q, TE_HIDDEN)),
            (f"{p}.self_attn.k_proj.weight", (kv, TE_HIDDEN)),
            (f"{p}.self_attn.v_proj.weight", (kv, TE_HIDDEN)),
            (f"{p}.self_attn.o_proj.weight", (TE_HIDDEN, q)),
            (f"{p}.self_attn.q_norm.weight", (TE_HEAD_DIM,)),
            (f"{p}.self_attn.k_norm.weight", (TE_HEAD_DIM,)),
            (f"{p}.post_attention_layernorm.weight", (TE_HIDDEN,)),
            (f"{p}.mlp.gate_proj.weight", (TE_INTER, TE_HIDDEN)),
            (f"{p}.mlp.up_proj.weight", (TE_INTER, TE_HIDDEN)),
            (f"{p}.mlp.down_proj.weight", (TE_HIDDEN, TE_INTER)),
        ]
    out.append(("model.norm.weight", (TE_HIDDEN,)))
    return out


def vae_tensors() -> list[tuple[str, tuple]]:
    """diffusers AutoencoderKL keys for the FLUX config (no quant convs, mid-block attention): 244 tensors."""
    out: list[tuple[str, tuple]] = []

    def conv(p, cout, cin, k=3):
        out.extend([(f"{p}.weight", (cout, cin, k, k)), (f"{p}.bias", (cout,))])

    def norm(p, c):
        out.extend([(f"{p}.weight", (c,)), (f"{p}.bias", (c,))])

    def resnet(p, cin, cout):
        norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1", cout, cin)
        norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout)
        if cin != cout:
            conv(f"{p}.conv_shortcut", cout, cin, k=1)

    def mid(p, c):
        resnet(f"{p}.resnets.0", c, c)
        norm(f"{p}.attentions.0.group_norm", c)
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            out.extend([(f"{p}.attentions.0.{n}.weight", (c, c)), (f"{p}.attentions.0.{n}.bias", (c,))])
        resnet(f"{p}.resnets.1", c, c)

    ch = VAE_CHANNELS
    conv("encoder.conv_in", ch[0], 3)
    cin = ch[0]
    for i, c in enumerate(ch):
        for j in range(VAE_LAYERS_PER_BLOCK):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
        if i < len(ch) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c)
        cin = c
    mid("encoder.mid_block", ch[-1])
    norm("encoder.conv_norm_out", ch[-1])
    conv("encoder.conv_out", 2 * VAE_LATENT, ch[-1])

    conv("decoder.conv_in", ch[-1], VAE_LATENT)
    mid("decoder.mid_block", ch[-1])
    prev = ch[-1]
    for i, c in enumerate(reversed(ch)):
        for j in range(VAE_LAYERS_PER_BLOCK + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else c, c)
        if i < len(ch) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c)
        prev = c
    norm("decoder.conv_norm_out", ch[0])
    conv("decoder.conv_out", 3, ch[0])
    return out


def nbytes(dtype: str, shape) -> int:
    return math.prod(shape) * DTYPE_SIZE[dtype]


# ---- data source ---------------------------------------------------------------------------------------

class DataSource:
    """Hands out distinct bytes fast: base block XOR a per-chunk key.

    The key only touches the sign bit, the lowest exponent bit and the mantissa of each bf16 lane
    (mask 0x80FF), so every value stays finite and in 2^-7..2^-5; in float32 lanes the same bits sit in
    the high half and the low 16 bits stay zero. Keys come from a counter, so no two chunks are equal:
    a different key changes every 8-byte word of the block.
    """

    CHUNK = 16 << 20

    def __init__(self, seed: int = 0):
        raw = np.random.default_rng(seed).integers(0, 1 << 16, size=self.CHUNK // 2, dtype=np.uint16)
        bf16 = (raw & 0x80FF) | 0x3C00                         # exponent 120/121: small finite values
        self.base = {
            "BF16": bf16.view(np.uint64),
            "F32": (bf16[: self.CHUNK // 4].astype(np.uint32) << 16).view(np.uint64),
        }
        self.scratch = np.empty(self.CHUNK // 8, dtype=np.uint64)
        self.counter = 1

    def _key(self, dtype: str) -> np.uint64:
        c, key = self.counter, 0
        self.counter += 1
        lanes, width = (4, 16) if dtype == "BF16" else (2, 32)
        if c >= 1 << (9 * lanes):
            raise RuntimeError("chunk counter exhausted; use a larger CHUNK")
        for i in range(lanes):
            b = (c >> (9 * i)) & 0x1FF
            lane = ((b >> 8) << 15) | (b & 0xFF)                # sign bit + 8 low bits of the bf16 lane
            if width == 32:
                lane <<= 16                                     # bf16 value in the high half of a float32
            key |= lane << (width * i)
        return np.uint64(key)

    def write(self, f, dtype: str, n: int) -> None:
        """Write n fresh bytes of `dtype` values to f, one chunk at a time."""
        base = self.base[dtype]
        while n > 0:
            take = min(n, self.CHUNK)
            words = (take + 7) // 8
            np.bitwise_xor(base[:words], self._key(dtype), out=self.scratch[:words])
            f.write(memoryview(self.scratch[:words]).cast("B")[:take])
            n -= take


# ---- streaming safetensors writer ----------------------------------------------------------------------

def write_safetensors(path: Path, entries: list[tuple[str, str, tuple]], source: DataSource) -> int:
    """Stream one .safetensors file; returns its size. Entries are sorted by name, as safetensors does."""
    entries = sorted(entries, key=lambda e: e[0])
    with open(path, "wb", buffering=0) as f:
        f.write(build_header(entries, {"format": "pt"}))
        for _, dtype, shape in entries:
            source.write(f, dtype, nbytes(dtype, shape))
    return path.stat().st_size


def shard(tensors: list[tuple[str, tuple]], dtype: str, n_shards: int) -> list[list[tuple[str, str, tuple]]]:
    """Split in state-dict order into n contiguous, roughly equal-sized shards (none empty)."""
    sizes = [nbytes(dtype, s) for _, s in tensors]
    total, start = sum(sizes), 0
    groups: list[list] = [[] for _ in range(n_shards)]
    for (name, shape), size in zip(tensors, sizes):
        mid = start + size / 2                                  # midpoint decides, so big tensors balance
        groups[min(n_shards - 1, int(mid * n_shards / total))].append((name, dtype, shape))
        start += size
    return [g for g in groups if g]


def write_sharded(folder: Path, stem: str, index_name: str, tensors, dtype: str, source: DataSource,
                  n_shards: int = 3) -> int:
    """Write stem-0000i-of-0000n.safetensors files plus the HF index json; returns bytes written."""
    groups = shard(tensors, dtype, n_shards)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        fname = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / fname, group, source)
        total += sum(nbytes(dtype, s) for _, _, s in group)
        weight_map.update({name: fname for name, _, _ in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return sum((folder / f).stat().st_size for f in set(weight_map.values()))


# ---- config files --------------------------------------------------------------------------------------

def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_configs(dest: Path, transformer_layers: int, text_layers: int) -> None:
    dv = "0.36.0"
    _json(dest / "model_index.json", {
        "_class_name": "ZImagePipeline", "_diffusers_version": dv,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    _json(dest / "scheduler" / "scheduler_config.json", {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": dv,
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False,
    })
    _json(dest / "transformer" / "config.json", {
        "_class_name": "ZImageTransformer2DModel", "_diffusers_version": dv,
        "all_f_patch_size": [1], "all_patch_size": [2], "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512], "cap_feat_dim": TE_HIDDEN, "dim": DIM, "in_channels": 16,
        "n_heads": N_HEADS, "n_kv_heads": N_HEADS, "n_layers": transformer_layers,
        "n_refiner_layers": N_REFINER, "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0,
        "t_scale": 1000.0,
    })
    _json(dest / "text_encoder" / "config.json", {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": TE_HEAD_DIM, "hidden_act": "silu",
        "hidden_size": TE_HIDDEN, "initializer_range": 0.02, "intermediate_size": TE_INTER,
        "max_position_embeddings": 40960, "max_window_layers": text_layers, "model_type": "qwen3",
        "num_attention_heads": TE_HEADS, "num_hidden_layers": text_layers,
        "num_key_value_heads": TE_KV_HEADS, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
        "use_sliding_window": False, "vocab_size": TE_VOCAB,
    })
    _json(dest / "text_encoder" / "generation_config.json", {
        "bos_token_id": 151643, "eos_token_id": 151645, "transformers_version": "4.51.0",
    })
    _json(dest / "vae" / "config.json", {
        "_class_name": "AutoencoderKL", "_diffusers_version": dv, "act_fn": "silu",
        "block_out_channels": VAE_CHANNELS, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True, "in_channels": 3, "latent_channels": VAE_LATENT, "latents_mean": None,
        "latents_std": None, "layers_per_block": VAE_LAYERS_PER_BLOCK, "mid_block_add_attention": True,
        "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.3611,
        "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False, "use_quant_conv": False,
    })
    # Placeholders: the real tokenizer is ~11 MB of text; an importer only needs the files to exist.
    tok = dest / "tokenizer"
    _json(tok / "tokenizer.json", {"version": "1.0", "truncation": None, "padding": None,
                                   "added_tokens": [], "model": {"type": "BPE", "vocab": {}, "merges": []}})
    _json(tok / "tokenizer_config.json", {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072,
                                          "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    _json(tok / "vocab.json", {})
    (tok / "merges.txt").write_text("#version: 0.2\n")


# ---- the folder ----------------------------------------------------------------------------------------

def build(dest, transformer_layers: int = DEFAULT_TRANSFORMER_LAYERS,
          text_layers: int = DEFAULT_TEXT_LAYERS, seed: int = 0, log=print) -> dict:
    """Write the folder at dest (must be missing or empty). Returns {"bytes", "seconds", "files"}."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"{dest} exists and is not empty; pick a new folder")
    t0 = time.perf_counter()
    source = DataSource(seed)
    write_configs(dest, transformer_layers, text_layers)
    total = 0
    total += write_sharded(dest / "transformer", "diffusion_pytorch_model",
                           "diffusion_pytorch_model.safetensors.index.json",
                           transformer_tensors(transformer_layers), "F32", source)
    log(f"  transformer  {transformer_layers} layers  {total / 1e9:.2f} GB")
    te = write_sharded(dest / "text_encoder", "model", "model.safetensors.index.json",
                       text_encoder_tensors(text_layers), "BF16", source)
    total += te
    log(f"  text_encoder {text_layers} layers  {te / 1e9:.2f} GB")
    vae = write_safetensors(dest / "vae" / "diffusion_pytorch_model.safetensors",
                            [(n, "BF16", s) for n, s in vae_tensors()], source)
    total += vae
    log(f"  vae                     {vae / 1e9:.2f} GB")
    files = sorted(dest.rglob("*.safetensors"))
    return {"bytes": total, "seconds": time.perf_counter() - t0, "files": files}


def verify(dest) -> int:
    """Open every file with safetensors (numpy) and check names, shapes and a few values; returns tensors."""
    from safetensors import safe_open
    import ml_dtypes  # noqa: F401  (registers bfloat16 for numpy)

    dest, seen = Path(dest), 0
    for path in sorted(dest.rglob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                seen += 1
                if name.endswith("bias") or seen % 50 == 0:     # spot-check values without reading GBs
                    a = f.get_tensor(name)
                    assert np.isfinite(a.astype(np.float32)).all(), name
                    if a.dtype == np.float32:
                        assert not (a.view(np.uint32) & 0xFFFF).any(), f"{name}: not bf16-representable"
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest")
    ap.add_argument("--transformer-layers", type=int, help=f"main layers (default {DEFAULT_TRANSFORMER_LAYERS}; "
                                                           f"--full: {N_LAYERS})")
    ap.add_argument("--text-layers", type=int, help=f"text-encoder layers (default {DEFAULT_TEXT_LAYERS}; "
                                                    f"--full: {TE_LAYERS})")
    ap.add_argument("--full", action="store_true", help="all layers, ~33 GB like the published model")
    ap.add_argument("--seed", type=int, default=0, help="changes every byte (two seeds share no tensor)")
    ap.add_argument("--verify", action="store_true", help="open the files with safetensors afterwards")
    args = ap.parse_args(argv)
    tl = args.transformer_layers if args.transformer_layers is not None else (
        N_LAYERS if args.full else DEFAULT_TRANSFORMER_LAYERS)
    te = args.text_layers if args.text_layers is not None else (TE_LAYERS if args.full else DEFAULT_TEXT_LAYERS)
    r = build(args.dest, tl, te, args.seed)
    print(f"wrote {r['bytes'] / 1e9:.2f} GB in {len(r['files'])} files, {r['seconds']:.1f} s "
          f"({r['bytes'] / 1e6 / r['seconds']:.0f} MB/s)")
    if args.verify:
        print(f"verified {verify(args.dest)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
