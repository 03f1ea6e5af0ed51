"""`zreg generate` (alias `run`), `zreg info` and the generate step of `zreg demo`: outputs,
reproducibility, reference parity through --noise, and one clear error per kind of bad input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zreg.cli.main import cli
from zreg.runtime.png import read_text

from .conftest import run_zreg
from .folders import make_model_folder
from .runtime_support import PROMPT, diffusers_run, model, write_edited_copy


def zreg(store, *args, env=None):
    """The CLI in-process (no MLX import per call), with the store and without a terminal."""
    runner = CliRunner()
    return runner.invoke(cli, [*map(str, args), "--models", str(store.root)], env=env or {},
                         catch_exceptions=False)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def test_generate_writes_png_with_parameters(tmp_path_factory, tmp_path):
    _, store, name = model(tmp_path_factory, "default")
    out = tmp_path / "fox.png"
    proc = run_zreg("generate", name, PROMPT, "--size", "48x32", "--steps", "2", "--seed", "7", "-o", out,
                    store=store)
    assert f"saved {out}" in proc.stdout
    assert "step 2/2" in proc.stderr and "s/step" in proc.stdout
    assert "cpu" in proc.stderr  # says which device ran
    with Image.open(out) as im:
        assert im.size == (48, 32) and im.mode == "RGB"
    text = read_text(out)
    assert text["prompt"] == PROMPT and text["seed"] == "7" and text["steps"] == "2"
    assert text["size"] == "48x32" and text["model"] == "tiny:latest"
    assert text["model_digest"] == "sha256:" + hashlib.sha256(store.resolve(name)[2]).hexdigest()


def test_same_arguments_same_image_and_run_alias(tmp_path_factory, tmp_path):
    _, store, name = model(tmp_path_factory, "variant")
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    zreg_args = [PROMPT, "--width", "80", "--height", "48", "--steps", "2", "--seed", "11"]
    assert zreg(store, "generate", name, *zreg_args, "-o", a).exit_code == 0
    assert zreg(store, "run", name, *zreg_args, "-o", b).exit_code == 0
    assert zreg(store, "generate", name, *zreg_args[:-1], "12", "-o", c).exit_code == 0
    assert (pixels(a) == pixels(b)).all()
    assert not (pixels(a) == pixels(c)).all()


def test_noise_file_reproduces_the_reference(tmp_path_factory, tmp_path):
    folder, store, name = model(tmp_path_factory, "default")
    noise = np.random.default_rng(9).standard_normal((1, 16, 8, 8), dtype=np.float32)
    np.save(tmp_path / "noise.npy", noise)
    out = tmp_path / "ref.png"
    result = zreg(store, "generate", name, PROMPT, "--size", "64x64", "--steps", "3",
                  "--noise", tmp_path / "noise.npy", "-o", out)
    assert result.exit_code == 0, result.output
    _, reference = diffusers_run(folder, noise, 64, 64, 3)
    assert np.abs(pixels(out).astype(int) - reference.astype(int)).max() <= 2
    assert "noise_sha256" in read_text(out)


def test_default_output_name(tmp_path_factory, tmp_path, monkeypatch):
    _, store, name = model(tmp_path_factory, "default")
    monkeypatch.chdir(tmp_path)
    assert zreg(store, "generate", name, "A Red Fox!", "--size", "32x32", "--steps", "1").exit_code == 0
    (made,) = list(tmp_path.glob("*.png"))
    assert made.name.startswith("a-red-fox-") and len(made.stem) == len("a-red-fox-20260101-120000")


@pytest.mark.parametrize("args,message", [
    (["tiny", PROMPT, "--size", "70x64"], "width 70 is not a positive multiple of 16"),
    (["tiny", PROMPT, "--size", "64x0"], "height 0 is not a positive multiple of 16"),
    (["tiny", PROMPT, "--size", "big"], "expected WIDTHxHEIGHT"),
    (["tiny", PROMPT, "--size", "64x64", "--width", "64"], "not both"),
    (["tiny", PROMPT, "--steps", "0"], "steps must be at least 1"),
    (["tiny", "   "], "the prompt is empty"),
    (["tiny", PROMPT, "--negative", "blurry"], "needs classifier-free guidance"),
    (["tiny", PROMPT, "--guidance", "-1"], "guidance must be >= 0"),
    (["nope", PROMPT], "not found"),
])
def test_bad_input_one_clear_error(tmp_path_factory, args, message):
    _, store, _ = model(tmp_path_factory, "default")
    result = zreg(store, "generate", *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("shape,dtype,message", [
    ((1, 16, 8, 4), np.float32, "noise has shape [1, 16, 8, 4], expected [1, 16, 8, 8] for 64x64"),
    ((1, 16, 8, 8), np.float64, "dtype float64, expected float32"),
])
def test_bad_noise(tmp_path_factory, tmp_path, shape, dtype, message):
    _, store, name = model(tmp_path_factory, "default")
    np.save(tmp_path / "n.npy", np.zeros(shape, dtype))
    result = zreg(store, "generate", name, PROMPT, "--size", "64x64", "--noise", tmp_path / "n.npy")
    assert result.exit_code == 2 and message in result.output


def test_not_an_image_model(store, tmp_path):
    import shutil

    # A folder with only a text encoder (no model_index.json): not an image pipeline.
    folder = make_model_folder(tmp_path / "plain")
    for sub in ("transformer", "vae", "tokenizer", "scheduler"):
        shutil.rmtree(folder / sub)
    (folder / "model_index.json").unlink()
    run_zreg("create", folder, "-n", "plain", store=store)
    result = zreg(store, "generate", "plain", PROMPT)
    assert result.exit_code != 0 and "is not a Z-Image model" in result.output
    # A Z-Image pipeline whose config cannot be right: said so, with the numbers.
    run_zreg("create", make_model_folder(tmp_path / "odd"), "-n", "odd", store=store)
    result = zreg(store, "generate", "odd", PROMPT)
    assert result.exit_code != 0 and "dim 64 is not a multiple of n_heads 30" in result.output


@pytest.mark.parametrize("edit,message", [
    (lambda ls: [x for x in ls if x.name != "transformer/layers.1.feed_forward.w2.weight"],
     "transformer tensors do not match its config.json: missing 1 tensor: layers.1.feed_forward.w2.weight"),
    (lambda ls: [x.model_copy(update={"shape": [3, 3]}) if x.name == "vae/decoder.conv_in.bias" else x for x in ls],
     "mis-shaped 1 tensor: decoder.conv_in.bias [3, 3] (expected [32])"),
    (lambda ls: ls + [x.model_copy(update={"name": "text_encoder/model.layers.9.mlp.up_proj.weight"})
                      for x in ls if x.name == "text_encoder/model.layers.0.mlp.up_proj.weight"],
     "unexpected 1 tensor: model.layers.9.mlp.up_proj.weight"),
])
def test_tensors_checked_against_config(tmp_path_factory, edit, message):
    _, store, name = model(tmp_path_factory, "default")
    write_edited_copy(store, name, "tiny:broken", lambda layers: sorted(edit(layers), key=lambda x: x.name))
    result = zreg(store, "generate", "tiny:broken", PROMPT, "--size", "32x32")
    assert result.exit_code != 0 and message in result.output


def test_refuses_when_it_does_not_fit(tmp_path_factory, tmp_path):
    _, store, name = model(tmp_path_factory, "default")
    result = zreg(store, "generate", name, PROMPT, "--size", "512x512", "-o", tmp_path / "x.png",
                  env={"ZREG_MEMORY_LIMIT": "50MB"})
    assert result.exit_code == 3
    assert "not enough memory" in result.output and "512x512" in result.output and "--low-memory" in result.output
    assert not (tmp_path / "x.png").exists()
    forced = zreg(store, "generate", name, PROMPT, "--size", "32x32", "--steps", "1", "--force",
                  "-o", tmp_path / "y.png", env={"ZREG_MEMORY_LIMIT": "1MB"})
    assert forced.exit_code == 0 and (tmp_path / "y.png").exists()


def test_device_choice(tmp_path_factory, tmp_path):
    import mlx.core as mx

    _, store, name = model(tmp_path_factory, "default")
    cpu = zreg(store, "generate", name, PROMPT, "--size", "32x32", "--steps", "1", "--device", "cpu",
               "-o", tmp_path / "c.png")
    assert cpu.exit_code == 0 and " on cpu " in cpu.output
    if not mx.is_available(mx.gpu):
        gpu = zreg(store, "generate", name, PROMPT, "--device", "gpu")
        assert gpu.exit_code == 2 and "no GPU backend" in gpu.output
        env = zreg(store, "generate", name, PROMPT, env={"ZREG_DEVICE": "gpu"})
        assert env.exit_code == 2 and "no GPU backend" in env.output


def test_info(store):
    result = zreg(store, "info")
    assert result.exit_code == 0
    for field in ("mlx ", "device ", "memory ", "store "):
        assert field in result.output
    assert str(store.root) in result.output and "available" in result.output


def test_demo_generates_images(tmp_path):
    from zreg.registry.store import Store

    store = Store(tmp_path / "models")
    proc = run_zreg("demo", "--workdir", tmp_path / "work", store=store)
    assert "images:" in proc.stdout
    for name in ("tiny-zimage.png", "tiny-zimage-fp8.png"):
        with Image.open(tmp_path / "work" / name) as im:
            assert im.size == (256, 256)
