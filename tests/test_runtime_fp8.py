"""FP8 (mxfp8) models: they load as FP8 (resident weights about the file size), run through
`mx.quantized_matmul` or a per-layer dequantize, and give nearly the image of the source model.

PSNR of the FP8 image against the bf16/f32 model's from the same noise, measured on this
project's CPU (64x64 / 80x48, 3 steps): `zreg quantize fp8` (its default policy) 44.2 dB on the
fixture, 49.2 dB on the variant; every Linear of transformer, text encoder and VAE quantized
43.8 dB (variant). The bounds leave ~6 dB for other BLAS/CPU rounding.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from zreg.registry.names import parse_name
from zreg.runtime.errors import WeightMismatch
from zreg.runtime.zimage.pipeline import Request

from .conftest import run_zreg
from .runtime_support import PROMPT, model, noise_for, open_model, psnr, write_edited_copy, write_fp8_copy

PSNR_ZREG_QUANTIZE = 38.0   # measured 44.2 / 49.2 dB
PSNR_ALL_LINEARS = 38.0     # measured 43.8 dB

SIZES = {"default": (64, 64), "variant": (80, 48)}


def _images(store, names, which, fp8_matmul=None, monkeypatch=None):
    if fp8_matmul:
        monkeypatch.setenv("ZREG_FP8_MATMUL", fp8_matmul)
    width, height = SIZES[which]
    out = []
    for name in names:
        pipe = open_model(store, name)
        noise = noise_for(pipe, width, height)
        out.append(pipe.generate(Request(PROMPT, width=width, height=height, steps=3, noise=noise)))
    return out


@pytest.mark.parametrize("which", ["default", "variant"])
def test_zreg_quantize_fp8_psnr(tmp_path_factory, which):
    _, store, name = model(tmp_path_factory, which)
    if not store.manifests.exists(parse_name("tiny:fp8")):
        run_zreg("quantize", "fp8", name, "tiny:fp8", store=store)
    ref, fp8 = _images(store, [name, "tiny:fp8"], which)
    value = psnr(ref.image, fp8.image)
    print(f"PSNR zreg quantize fp8 ({which}): {value:.1f} dB")
    assert value > PSNR_ZREG_QUANTIZE


@pytest.mark.parametrize("fp8_matmul", ["quantized", "dequantize"])
def test_every_linear_fp8_both_matmul_paths(tmp_path_factory, monkeypatch, fp8_matmul):
    _, store, name = model(tmp_path_factory, "variant")
    if not store.manifests.exists(parse_name("tiny:all-fp8")):
        assert write_fp8_copy(store, name, "tiny:all-fp8") > 20
    ref, fp8 = _images(store, [name, "tiny:all-fp8"], "variant", fp8_matmul, monkeypatch)
    value = psnr(ref.image, fp8.image)
    print(f"PSNR every linear fp8, {fp8_matmul}: {value:.1f} dB")
    assert value > PSNR_ALL_LINEARS


def test_quantized_and_dequantized_paths_agree(tmp_path_factory, monkeypatch):
    _, store, name = model(tmp_path_factory, "default")
    write_fp8_copy(store, name, "tiny:agree-fp8")
    a = _images(store, ["tiny:agree-fp8"], "default", "quantized", monkeypatch)[0]
    b = _images(store, ["tiny:agree-fp8"], "default", "dequantize", monkeypatch)[0]
    assert np.abs(a.latents - b.latents).max() < 1e-3
    assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 2


def test_fp8_weights_stay_fp8_in_memory(tmp_path_factory):
    # Resident transformer weights are what the blobs hold: FP8 bytes + scales, not bf16/f32.
    _, store, name = model(tmp_path_factory, "variant")
    write_fp8_copy(store, name, "tiny:mem-fp8", components=("transformer",))
    for model_name in (name, "tiny:mem-fp8"):
        pipe = open_model(store, model_name)
        part = pipe.parts["transformer"]
        mx.clear_cache()
        before = mx.get_active_memory()
        transformer, _ = pipe.load_transformer()
        resident = mx.get_active_memory() - before
        data = sum(layer.size for layer in part.tensors.values())
        assert abs(resident - data) < 0.05 * data, (model_name, resident, data)
        quantized = [m for _, m in transformer.named_modules() if "scales" in m]
        if model_name == name:
            f32_bytes = data
            assert not quantized
        else:
            assert len(quantized) > 10
            assert all(m.weight.dtype == mx.uint32 and m.scales.dtype == mx.uint8 for m in quantized)
            assert resident < 0.4 * f32_bytes
        del transformer


def test_fp8_weight_without_scales_is_named(tmp_path_factory):
    _, store, name = model(tmp_path_factory, "default")
    write_fp8_copy(store, name, "tiny:with-scales", components=("transformer",))
    dropped = "transformer/layers.0.attention.to_q.scales"
    write_edited_copy(store, "tiny:with-scales", "tiny:no-scales",
                      lambda layers: [layer for layer in layers if layer.name != dropped])
    with pytest.raises(WeightMismatch, match="layers.0.attention.to_q.weight has no layers.0.attention.to_q.scales"):
        open_model(store, "tiny:no-scales")


def test_fp8_only_where_a_linear_is(tmp_path_factory):
    # An FP8 tensor that is not a Linear weight (here a norm) cannot run: named as such.
    _, store, name = model(tmp_path_factory, "default")

    def edit(layers):
        for layer in layers:
            if layer.name == "transformer/layers.0.attention_norm1.weight":
                layer.dtype = "F8_E4M3"
        return layers

    write_edited_copy(store, name, "tiny:fp8-norm", edit)
    with pytest.raises(WeightMismatch, match=r"unsupported dtype 1 tensor: layers.0.attention_norm1.weight \(F8_E4M3\)"):
        open_model(store, "tiny:fp8-norm")
