"""Small diffusers-style folders for tests, and raw safetensors writers for broken ones."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def write_raw_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> None:
    """Write a safetensors file from an explicit header dict, valid or not."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    n = len(text) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + text + data)


def make_model_folder(root: Path, seed: int = 0, text_encoder_seed: int | None = None) -> Path:
    """A three-component pipeline folder: a sharded transformer (with index), a text encoder
    (seeded separately, so two folders can share it) and a single-file VAE, plus the files the
    pipeline needs."""
    rng = np.random.default_rng(seed)
    te_rng = np.random.default_rng(1000 + (seed if text_encoder_seed is None else text_encoder_seed))
    (root / "transformer").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    (root / "vae").mkdir()
    (root / "tokenizer").mkdir()
    (root / "scheduler").mkdir()
    shard1 = {"layers.0.attention.to_q.weight": rng.standard_normal((64, 64)).astype(np.float32),
              "layers.0.attention.norm_q.weight": rng.standard_normal((16,)).astype(np.float32)}
    shard2 = {"all_final_layer.2-1.linear.weight": rng.standard_normal((64, 64)).astype(np.float32),
              "x_pad_token": rng.standard_normal((1, 64)).astype(np.float32)}
    save_file(shard1, root / "transformer/diffusion_pytorch_model-00001-of-00002.safetensors", {"format": "pt"})
    save_file(shard2, root / "transformer/diffusion_pytorch_model-00002-of-00002.safetensors", {"format": "pt"})
    weight_map = {k: "diffusion_pytorch_model-00001-of-00002.safetensors" for k in shard1}
    weight_map |= {k: "diffusion_pytorch_model-00002-of-00002.safetensors" for k in shard2}
    (root / "transformer/diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2))
    (root / "transformer/config.json").write_text(json.dumps({"dim": 64}))
    te = {"model.embed_tokens.weight": te_rng.standard_normal((100, 32)).astype(np.float16),
          "model.norm.weight": te_rng.standard_normal((32,)).astype(np.float16)}
    save_file(te, root / "text_encoder/model.safetensors", {"format": "pt"})
    (root / "text_encoder/config.json").write_text(json.dumps({"hidden_size": 32}))
    (root / "text_encoder/generation_config.json").write_text("{}")
    save_file({"decoder.conv_in.weight": rng.standard_normal((8, 16, 3, 3)).astype(np.float32)},
              root / "vae/diffusion_pytorch_model.safetensors")
    (root / "vae/config.json").write_text(json.dumps({"latent_channels": 16}))
    (root / "tokenizer/tokenizer.json").write_text("{}")
    (root / "tokenizer/merges.txt").write_text("#version: 0.2\na b\n")
    (root / "tokenizer/chat_template.jinja").write_text("{{ messages }}")
    (root / "scheduler/scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "ZImagePipeline", "_diffusers_version": "0.36.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, to prove nothing changed."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make_big_folder(root: Path, tensors: int = 24, mib_each: int = 16, seed: int = 0) -> Path:
    """A folder of a few hundred MB, so a create runs long enough to be interrupted."""
    rng = np.random.default_rng(seed)
    (root / "transformer").mkdir(parents=True)
    n = mib_each << 18  # float32 elements per tensor
    for shard in range(2):
        arrays = {f"layers.{shard}.{i}.weight": np.frombuffer(rng.bytes(n * 4), np.float32).reshape(-1, 1024)
                  for i in range(tensors // 2)}
        save_file(arrays, root / f"transformer/model-{shard}.safetensors")
    return root


def safetensors_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of every .safetensors file under folder, keyed `relative/path:tensor`."""
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                out[f"{path.relative_to(folder)}:{key}"] = f.get_tensor(key)
    return out
