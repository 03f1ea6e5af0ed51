"""The tiny Z-Image fixture checked against the reference implementation (diffusers/transformers).

The fixture is zreg's demo model and the model every other test uses, so it must load in the
stock `ZImagePipeline` exactly as the published Tongyi-MAI/Z-Image-Turbo folder does, with
every tensor taken from the files (nothing left randomly initialised), and must be written
byte-identically every time.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
from safetensors import safe_open
from transformers import Qwen3Config, Qwen3ForCausalLM

from zreg.fixtures.tiny_zimage import (
    TinyConfig,
    text_encoder_specs,
    transformer_specs,
    vae_specs,
    write_tiny_zimage,
)

CONFIGS = {"default": TinyConfig(), "variant": TinyConfig.variant()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def fixture(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    return cfg, write_tiny_zimage(tmp_path_factory.mktemp(request.param) / "zimage", cfg)


def _digests(root: pathlib.Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="np") as st:
            assert st.metadata() == {"format": "pt"}
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _shard_names(stem: str, n: int) -> set[str]:
    if n == 1:
        return {f"{stem}.safetensors"}
    return {f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)} | {
        f"{stem}.safetensors.index.json"
    }


def test_folder_layout(fixture):
    cfg, root = fixture
    expected = {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/generation_config.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "transformer/config.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    }
    expected |= {f"transformer/{n}" for n in _shard_names("diffusion_pytorch_model", cfg.transformer_shards)}
    expected |= {f"text_encoder/{n}" for n in _shard_names("model", cfg.text_encoder_shards)}
    assert set(_digests(root)) == expected

    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]

    # Each index maps every tensor to the shard that holds it, and total_size is the data size.
    for folder, stem in (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model")):
        idx = json.loads((root / folder / f"{stem}.safetensors.index.json").read_text())
        held = {}
        for shard in set(idx["weight_map"].values()):
            with safe_open(root / folder / shard, framework="np") as st:
                held.update({k: shard for k in st.keys()})
        assert held == idx["weight_map"]
        assert idx["metadata"]["total_size"] == sum(t.nbytes for t in _tensors(root / folder).values())


def test_tensor_dtypes_and_keys(fixture):
    cfg, root = fixture
    transformer = _tensors(root / "transformer")
    assert set(transformer) == {k for k, _, _ in transformer_specs(cfg)}
    for name, t in transformer.items():
        assert t.dtype == np.float32, name
        # float32 storage, bf16 values: the low 16 bits are zero, as in the published weights.
        assert not np.any(t.view(np.uint32) & 0xFFFF), name

    text_encoder = _tensors(root / "text_encoder")
    assert set(text_encoder) == {k for k, _, _ in text_encoder_specs(cfg)}
    assert all(k.startswith("model.") for k in text_encoder)
    assert "lm_head.weight" not in text_encoder  # tied to the embedding
    assert {t.dtype.name for t in text_encoder.values()} == {"bfloat16"}

    vae = _tensors(root / "vae")
    assert set(vae) == {k for k, _, _ in vae_specs(cfg)}
    assert not any("quant_conv" in k for k in vae)
    assert {t.dtype.name for t in vae.values()} == {"bfloat16"}


def test_state_dicts_match_reference_models(fixture):
    # Models built from the written configs must have exactly the files' keys and shapes.
    cfg, root = fixture
    checks = [
        (ZImageTransformer2DModel.from_config(ZImageTransformer2DModel.load_config(root / "transformer")),
         root / "transformer", ()),
        (AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")), root / "vae", ()),
        (Qwen3ForCausalLM(Qwen3Config.from_pretrained(root / "text_encoder")), root / "text_encoder",
         ("lm_head.weight",)),
    ]
    for model, folder, skip in checks:
        reference = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in skip}
        files = {k: tuple(t.shape) for k, t in _tensors(folder).items()}
        assert files == reference, folder.name


def test_published_tensor_counts():
    published = TinyConfig.published()
    assert len(transformer_specs(published)) == 521
    assert len(text_encoder_specs(published)) == 398
    assert len(vae_specs(published)) == 244


def test_diffusers_pipeline_generates(fixture):
    cfg, root = fixture
    pipe = ZImagePipeline.from_pretrained(root, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    # Every parameter came from the files (a missing key would leave a random init behind).
    loaded = {
        "transformer": pipe.transformer.state_dict(),
        "vae": pipe.vae.state_dict(),
        "text_encoder": {f"model.{k}": v for k, v in pipe.text_encoder.state_dict().items()},
    }
    for folder, state in loaded.items():
        files = _tensors(root / folder)
        assert set(files) == set(state), folder
        for k, t in files.items():
            np.testing.assert_array_equal(state[k].numpy(), t.astype(np.float32), err_msg=k)

    rendered = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a red fox"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert rendered == "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert len(pipe.tokenizer) <= cfg.text_vocab_size

    image = pipe(
        "a red fox",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05  # not a constant image
    # Smallest size the 8x VAE and 2x2 patches allow: one latent patch.
    small = pipe("a red fox", height=16, width=16, num_inference_steps=1,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert small.shape == (1, 16, 16, 3) and np.isfinite(small).all()


def test_output_is_byte_identical(fixture, tmp_path):
    cfg, root = fixture
    again = write_tiny_zimage(tmp_path / "again", cfg)
    assert _digests(again) == _digests(root)


def test_refuses_non_empty_destination(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_tiny_zimage(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_safetensors_load_in_mlx(fixture):
    import mlx.core as mx
    _, root = fixture
    for f in sorted(root.rglob("*.safetensors")):
        with safe_open(f, framework="np") as st:
            keys = set(st.keys())
        assert set(mx.load(str(f))) == keys, f.name
