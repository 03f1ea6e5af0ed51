"""The runtime against the reference: diffusers' ZImagePipeline (and transformers' tokenizer and
Qwen3, diffusers' scheduler and VAE), fp32 on the CPU, from the same noise.

Bounds (the issue's): final latents within 1e-3, uint8 images within 2 levels. Measured on this
project's CPU (see docs/architecture.md): latents ~2e-5, images 0-1 levels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zreg.runtime import ops
from zreg.runtime.zimage.pipeline import Request

from .runtime_support import PROMPT, diffusers_pipeline, diffusers_run, model, noise_for, open_model

LATENT_TOL = 1e-3
IMAGE_TOL = 2

CASES = [
    # (config, width, height, steps, guidance, negative)
    ("default", 64, 64, 3, 0.0, None),
    ("variant", 80, 48, 3, 0.0, None),          # other widths/heads/layers, 3 shards, non-square
    ("variant", 48, 80, 2, 3.0, "blurry, dark"),  # classifier-free guidance with a negative prompt
]


@pytest.mark.parametrize("which,width,height,steps,guidance,negative", CASES)
def test_same_noise_same_latents_and_image(tmp_path_factory, which, width, height, steps, guidance, negative):
    folder, store, name = model(tmp_path_factory, which)
    pipe = open_model(store, name)
    noise = noise_for(pipe, width, height)
    result = pipe.generate(Request(PROMPT, width=width, height=height, steps=steps, noise=noise,
                                   guidance=guidance, negative=negative))
    ref_latents, ref_image = diffusers_run(folder, noise, width, height, steps, guidance, negative)
    assert result.latents.shape == ref_latents.shape == noise.shape
    assert np.abs(result.latents - ref_latents).max() < LATENT_TOL
    assert result.image.shape == ref_image.shape == (height, width, 3)
    assert np.abs(result.image.astype(int) - ref_image.astype(int)).max() <= IMAGE_TOL
    assert result.image.std() > 5  # a real image, not a constant


def test_plain_mlx_kernels_match_too(tmp_path_factory):
    # The numpy kernels (ops.py) are the CPU path; the plain MLX expressions are what a GPU
    # runs. Both must give the reference's answer.
    folder, store, name = model(tmp_path_factory, "variant")
    pipe = open_model(store, name)
    noise = noise_for(pipe, 80, 48)
    ops.set_numpy_kernels(False)
    try:
        result = pipe.generate(Request(PROMPT, width=80, height=48, steps=2, noise=noise))
    finally:
        ops.set_numpy_kernels(True)
    ref_latents, ref_image = diffusers_run(folder, noise, 80, 48, 2)
    assert np.abs(result.latents - ref_latents).max() < LATENT_TOL
    assert np.abs(result.image.astype(int) - ref_image.astype(int)).max() <= IMAGE_TOL


@pytest.mark.parametrize("which", ["default", "variant"])
def test_prompt_embeddings_match_hidden_states_minus_2(tmp_path_factory, which):
    folder, store, name = model(tmp_path_factory, which)
    pipe = open_model(store, name)
    ref = diffusers_pipeline(folder)
    prompts = [PROMPT, "", "一只红色的狐狸坐在雪地里", "It's a poster: \"HELLO\" <|im_end|> & more\n\ttabs"]
    ours = pipe.encode_prompts(prompts, dtype=pipe.backend.compute_dtype)
    with torch.no_grad():
        theirs, _ = ref.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    for a, b in zip(ours, theirs):
        assert tuple(a.shape) == tuple(b.shape)
        assert np.abs(np.array(a) - b.numpy()).max() < 1e-4


def test_token_ids_match_transformers(tmp_path_factory):
    folder, store, name = model(tmp_path_factory, "default")
    pipe = open_model(store, name)
    tokenizer = diffusers_pipeline(folder).tokenizer
    long = "a red fox " * 400  # past max_sequence_length: truncated like the reference
    for prompt in [PROMPT, "", "  spaces  ", "一只红色的狐狸", "emoji 🦊 and <|endoftext|>", long]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)
        assert pipe.tokenizer().format(prompt) == text
        ref = tokenizer(text, padding="max_length", max_length=512, truncation=True)
        real = [i for i, m in zip(ref.input_ids, ref.attention_mask) if m]
        assert pipe.tokenizer().encode(prompt) == real


SCHEDULES = [
    {"shift": 3.0, "use_dynamic_shifting": False},
    {"shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
    {"shift": 1.0, "use_dynamic_shifting": True, "time_shift_type": "linear"},
    {"shift": 6.0, "use_dynamic_shifting": False, "shift_terminal": 0.1},
]
STEPS = [(1, 16), (8, 4096), (50, 1024)]


# shift_terminal with one step is left out: diffusers divides 0 by 0 there, and zreg refuses
# it with a message (test_bad_schedule).
@pytest.mark.parametrize("config, steps, seq_len", [(c, s, n) for c in SCHEDULES for s, n in STEPS
                                                     if not (c.get("shift_terminal") and s == 1)])
def test_schedule_matches_diffusers(config, steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    from zreg.runtime.zimage.scheduler import SchedulerConfig, schedule

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)
    mu = calculate_shift(seq_len)
    ref.set_timesteps(sigmas=get_default_z_image_sigmas(steps), mu=mu)
    ours = schedule(SchedulerConfig.from_dict(config), steps, seq_len)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=0, atol=2e-7)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=0, atol=2e-4)


def test_tiled_decode_matches_diffusers(tmp_path_factory):
    # Large images decode in tiles; the tiling (overlap, blend, crop) is diffusers' own.
    import mlx.core as mx

    from zreg.runtime.zimage.pipeline import ZImage

    folder, store, name = model(tmp_path_factory, "default")
    pipe = open_model(store, name)
    vae = diffusers_pipeline(folder).vae
    latents = np.random.default_rng(1).standard_normal((1, 16, 12, 20), dtype=np.float32)
    tile = 8
    ZImage_decode = ZImage.decode
    import zreg.runtime.zimage.pipeline as pipeline_mod

    old = pipeline_mod.TILE_LATENT
    pipeline_mod.TILE_LATENT = tile
    try:
        ours = ZImage_decode(pipe, mx.array(latents), mx.float32)
    finally:
        pipeline_mod.TILE_LATENT = old
    vae.enable_tiling()
    vae.tile_latent_min_size, vae.tile_sample_min_size = tile, tile * 8
    try:
        with torch.no_grad():
            z = torch.from_numpy(latents) / vae.config.scaling_factor + vae.config.shift_factor
            ref = vae.decode(z).sample
    finally:
        vae.disable_tiling()
    ref = ((ref * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)[0].numpy() * 255).round().astype(np.uint8)
    assert ours.shape == ref.shape == (96, 160, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= IMAGE_TOL


def test_bad_schedule():
    from zreg.runtime.errors import BadRequest, UnsupportedModel
    from zreg.runtime.zimage.scheduler import SchedulerConfig, schedule

    with pytest.raises(BadRequest, match="at least 2 steps"):
        schedule(SchedulerConfig(shift=6.0, shift_terminal=0.1), 1, 16)
    with pytest.raises(UnsupportedModel, match="use_karras_sigmas"):
        SchedulerConfig.from_dict({"use_karras_sigmas": True})
    with pytest.raises(UnsupportedModel, match="DDIMScheduler"):
        SchedulerConfig.from_dict({"_class_name": "DDIMScheduler"})
