"""Shared helpers of the runtime tests (imported by the other test_runtime_*.py files).

Models are written and imported once per test session and config, into a session store of
their own; tests that change a store make their own.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from zreg.fixtures.tiny_zimage import TinyConfig, write_tiny_zimage
from zreg.registry.manifest import CONFIG_MEDIA_TYPE, TENSOR_MEDIA_TYPE, Descriptor, Layer, Manifest
from zreg.registry.names import parse_name
from zreg.registry.store import Store
from zreg.registry.tensorblob import blob_header

from .conftest import run_zreg

PROMPT = "a red fox in the snow, golden hour"

# A small config whose text encoder outweighs its transformer (for the "freed before
# denoising" test) and whose VAE has real-sized channel counts at a small scale.
HEAVY_TEXT = TinyConfig(text_hidden_size=256, text_layers=4, text_heads=4, text_kv_heads=2, text_head_dim=64,
                        text_intermediate_size=2048, seed=3)
# Bigger than the fixture in every direction, still quick: the memory test's second model.
SMALL = TinyConfig(dim=384, n_layers=3, n_refiner_layers=1, n_heads=6, axes_dims=(16, 24, 24),
                   text_hidden_size=128, text_layers=3, text_heads=4, text_kv_heads=2, text_head_dim=32,
                   text_intermediate_size=384, vae_block_out_channels=(32, 64, 64, 64),
                   vae_layers_per_block=2, vae_norm_num_groups=16, transformer_shards=2, seed=4)
CONFIGS = {"default": TinyConfig(), "variant": TinyConfig.variant(), "heavy_text": HEAVY_TEXT, "small": SMALL}

_made: dict[str, tuple[Path, Store]] = {}


def model(tmp_path_factory, which: str = "default") -> tuple[Path, Store, str]:
    """(diffusers folder, session store holding it as `tiny`, name) for one of CONFIGS."""
    if which not in _made:
        root = tmp_path_factory.mktemp(f"runtime-{which}")
        folder = write_tiny_zimage(root / "fixture", CONFIGS[which])
        store = Store(root / "store")
        run_zreg("create", folder, "-n", "tiny", store=store)
        _made[which] = (folder, store)
    folder, store = _made[which]
    return folder, store, "tiny"


def open_model(store: Store, name: str = "tiny"):
    from zreg.runtime import open_model as open_

    return open_(store, name, "cpu")[0]


def noise_for(pipe, width: int, height: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(pipe.latent_shape(width, height), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def diffusers_pipeline(folder: Path):
    import torch
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_run(folder: Path, noise: np.ndarray, width: int, height: int, steps: int,
                  guidance: float = 0.0, negative: str | None = None, prompt: str = PROMPT):
    """(final latents float32, uint8 image) from diffusers' ZImagePipeline, fp32 on the CPU."""
    import torch

    pipe = diffusers_pipeline(folder)
    kw = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
              negative_prompt=negative)
    latents = pipe(prompt, latents=torch.from_numpy(noise), output_type="latent", **kw).images
    image = pipe(prompt, latents=torch.from_numpy(noise), output_type="np", **kw).images[0]
    return latents.numpy(), (image * 255).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def write_fp8_copy(store: Store, src: str, dst: str, components=("transformer", "text_encoder", "vae")) -> int:
    """Store `dst`: `src` with every Linear weight of `components` (2-D, inputs a multiple of 32,
    not embeddings/pad tokens) as mxfp8, quantized in memory with MLX: F8_E4M3 `.weight` (the
    uint32-packed weight's bytes, [out, in]) plus F8_E8M0 `.scales` [out, in/32]. Independent of
    `zreg quantize` (whose policy leaves some linears and the VAE alone). Returns the count."""
    import mlx.core as mx

    _, manifest, _ = store.resolve(src)
    config = store.config(manifest)
    layers, count = [], 0
    for layer in manifest.layers:
        if (layer.is_tensor and layer.component in components and layer.name.endswith(".weight")
                and len(layer.shape) == 2 and layer.shape[1] % 32 == 0
                and "embed_tokens" not in layer.name):
            w = next(iter(mx.load(str(store.blobs.path(layer.digest)), format="safetensors").values()))
            packed, scales = mx.quantize(w.astype(mx.float32), group_size=32, bits=8, mode="mxfp8")
            for name, dtype, shape, data in (
                    (layer.name, "F8_E4M3", layer.shape, np.array(packed).view(np.uint8)),
                    (layer.name[:-len("weight")] + "scales", "F8_E8M0", [layer.shape[0], layer.shape[1] // 32],
                     np.array(scales))):
                blob = blob_header(dtype, shape) + data.tobytes()
                digest, _ = store.blobs.put_bytes(blob)
                layers.append(Layer(mediaType=TENSOR_MEDIA_TYPE, digest=digest, size=len(blob), name=name,
                                    dtype=dtype, shape=list(shape)))
            count += 1
        else:
            layers.append(layer)
    layers.sort(key=lambda item: item.name.encode())
    for c in components:
        config.components[c].quantization = "mxfp8"
    config_bytes = config.to_bytes()
    digest, _ = store.blobs.put_bytes(config_bytes)
    store.blobs.sync()
    new = Manifest(schemaVersion=2, config=Descriptor(mediaType=CONFIG_MEDIA_TYPE, digest=digest,
                                                      size=len(config_bytes)), layers=layers)
    store.manifests.write_bytes(parse_name(dst), new.to_bytes())
    return count


def write_edited_copy(store: Store, src: str, dst: str, edit) -> None:
    """Store `dst`: `src`'s manifest with `edit(layers) -> layers` applied (for broken models)."""
    _, manifest, _ = store.resolve(src)
    layers = edit([layer.model_copy() for layer in manifest.layers])
    new = Manifest(schemaVersion=2, config=manifest.config, layers=layers)
    store.manifests.write_bytes(parse_name(dst), new.to_bytes())
