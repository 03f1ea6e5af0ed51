
import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from zreg.registry.errors import InvalidModel
from zreg.registry.quantize import (DEFAULT_FP8_SKIP, Policy, decode_mxfp8, encode_bf16, encode_mxfp8,
                                    scales_name)

from .conftest import run_zreg
from .folders import make_model_folder, snapshot


def awkward_rows(rng) -> np.ndarray:
    """Rows spanning 2^-60..2^60 in magnitude, with zero blocks, tiny and huge blocks."""
    rows = rng.standard_normal((512, 128)).astype(np.float32)
    rows *= np.exp2(rng.integers(-60, 60, (512, 1))).astype(np.float32)
    rows[0, :32] = 0
    rows[1, :] = 1e-30
    rows[2, :32] = 3e38
    rows[3, 32:64] = 448.0
    rows[4, :32] = -3.99
    rows[5, 5] = 1e6            # one outlier in a block of small values
    return rows


def test_encoder_matches_mlx_bit_for_bit():
    rows = awkward_rows(np.random.default_rng(0))
    elements, scales = encode_mxfp8(rows)
    packed, mlx_scales = mx.quantize(mx.array(rows), group_size=32, bits=8, mode="mxfp8")[:2]
    assert np.array_equal(np.array(packed).view(np.uint8).reshape(rows.shape), elements)
    assert np.array_equal(np.array(mlx_scales), scales)
    # And MLX's own dequantize reads our bytes back to the same values as our decoder.
    ours = decode_mxfp8(elements, scales)
    theirs = np.array(mx.dequantize(mx.array(elements).view(mx.uint32), mx.array(scales), group_size=32,
                                    bits=8, mode="mxfp8").astype(mx.float32))
    finite = np.isfinite(ours)
    assert np.array_equal(ours[finite], theirs[finite])


def test_dequantize_is_within_the_e4m3_rounding_bound():
    rows = awkward_rows(np.random.default_rng(1))
    elements, scales = encode_mxfp8(rows)
    back = decode_mxfp8(elements, scales)
    scale = np.repeat(np.exp2(scales.astype(np.float64) - 127), 32, axis=1)
    x = rows.astype(np.float64)
    # Half a unit in the last place of a 3-bit mantissa, or half the smallest subnormal step.
    bound = np.maximum(np.abs(x) * 2.0 ** -4, scale * 2.0 ** -10)
    assert (np.abs(back - x) <= bound).all()
    assert np.array_equal(back[0, :32], np.zeros(32))


def test_bf16_conversion_reports_loss():
    exact = (np.arange(64, dtype=np.float32) * 0.5)
    converted, lossless = encode_bf16(exact)
    assert lossless and np.array_equal(converted.view(ml_dtypes.bfloat16).astype(np.float32), exact)
    _, lossless = encode_bf16(np.array([1 + 2 ** -20], np.float32))
    assert not lossless


@pytest.mark.parametrize("name, dtype, shape, expected", [
    ("transformer/layers.0.attention.to_q.weight", "F32", (64, 64), "fp8"),
    ("text_encoder/model.layers.0.mlp.down_proj.weight", "BF16", (32, 64), "fp8"),
    ("transformer/layers.0.attention.norm_q.weight", "F32", (64, 64), None),
    ("transformer/layers.0.adaLN_modulation.0.weight", "F32", (256, 64), None),
    ("transformer/t_embedder.mlp.0.weight", "F32", (1024, 256), None),
    ("transformer/all_final_layer.2-1.linear.weight", "F32", (64, 64), None),
    ("text_encoder/model.embed_tokens.weight", "BF16", (512, 32), None),
    ("transformer/layers.0.feed_forward.w1.bias", "F32", (64,), None),
    ("transformer/x_pad_token", "F32", (1, 64), None),
    ("vae/decoder.conv_in.weight", "F32", (64, 64), None),
    ("transformer/odd.weight", "F32", (8, 48), None),   # input not a multiple of 32: skipped
    ("transformer/int.weight", "I32", (8, 64), None),
])
def test_fp8_policy(name, dtype, shape, expected):
    assert Policy("fp8").action(name, dtype, shape) == expected


def test_policy_rejects_unknown_mode_and_skip_overrides():
    with pytest.raises(InvalidModel, match="unknown quantization mode 'int4'"):
        Policy("int4")
    policy = Policy("fp8", ("transformer/layers.0.*",))
    assert policy.action("transformer/layers.0.attention.to_q.weight", "F32", (64, 64)) is None
    assert policy.action("transformer/layers.1.adaLN_modulation.0.weight", "F32", (256, 64)) == "fp8"
    assert Policy("bf16").action("vae/x.weight", "F32", (3, 3)) == "bf16"
    assert Policy("bf16").action("vae/x.weight", "BF16", (3, 3)) is None
    assert DEFAULT_FP8_SKIP == Policy("fp8").skip


def load_blob(store, layer):
    return mx.load(str(store.blobs.path(layer.digest)), format="safetensors")["data"]


def test_quantized_layers_compute_what_the_original_did(store, tiny_zimage):
    run_zreg("create", tiny_zimage, "-n", "tiny", store=store)
    run_zreg("quantize", "fp8", "tiny", store=store)
    _, src, _ = store.resolve("tiny")
    _, q, _ = store.resolve("tiny:fp8")
    original = {layer.name: layer for layer in src.tensor_layers()}
    quantized = {layer.name: layer for layer in q.tensor_layers()}
    weights = [n for n, layer in quantized.items() if layer.dtype == "F8_E4M3"]
    assert len(weights) > 20
    rng = np.random.default_rng(0)
    worst = 1.0
    for name in weights:
        scales = quantized[scales_name(name)]
        assert scales.dtype == "F8_E8M0" and scales.shape == [quantized[name].shape[0], quantized[name].shape[1] // 32]
        w = load_blob(store, quantized[name])           # F8_E4M3 loads as uint8
        s = load_blob(store, scales)
        w_ref = load_blob(store, original[name]).astype(mx.float32)
        x = mx.array(rng.standard_normal((16, w.shape[1])).astype(np.float32))
        y = mx.quantized_matmul(x, w.view(mx.uint32), s, transpose=True, group_size=32, bits=8, mode="mxfp8")
        y_ref = x @ w_ref.T
        cos = (mx.sum(y * y_ref) / (mx.linalg.norm(y) * mx.linalg.norm(y_ref))).item()
        worst = min(worst, cos)
    assert worst >= 0.999, worst
    with safe_open(str(store.blobs.path(quantized[weights[0]].digest)), framework="pt") as f:
        assert f.get_tensor("data").dtype == torch.float8_e4m3fn  # other readers see float8_e4m3fn


def test_quantize_shares_kept_blobs_with_the_source(store, tiny_zimage):
    run_zreg("create", tiny_zimage, "-n", "tiny", store=store)
    before = set(store.blobs.digests())
    out = run_zreg("quantize", "fp8", "tiny", store=store).stdout
    _, src, _ = store.resolve("tiny")
    _, q, _ = store.resolve("tiny:fp8")
    kept = [layer for layer in q.layers if layer.dtype not in ("F8_E4M3", "F8_E8M0")]
    src_by_name = {layer.name: layer.digest for layer in src.layers}
    assert all(src_by_name[layer.name] == layer.digest for layer in kept)
    added = set(store.blobs.digests()) - before
    converted = {layer.digest for layer in q.layers if layer.dtype in ("F8_E4M3", "F8_E8M0")}
    assert added == converted | {q.config.digest}
    assert f"{len(converted)} new blobs" in out   # the config blob is not a layer
    config = store.config(q)
    assert config.components["transformer"].quantization == "mxfp8"
    assert config.components["text_encoder"].quantization == "mxfp8"
    assert config.components["vae"].quantization is None
    assert config.parameter_count == store.config(src).parameter_count


def test_create_quantize_equals_create_then_quantize(store, tiny_zimage):
    run_zreg("create", tiny_zimage, "-n", "tiny", store=store)
    run_zreg("quantize", "fp8", "tiny", "two-step", store=store)
    run_zreg("create", tiny_zimage, "-n", "one-pass", "--quantize", "fp8", store=store)
    assert store.resolve("two-step")[2] == store.resolve("one-pass")[2]
    assert "verify ok: 3 models" in run_zreg("verify", store=store).stdout


def test_bf16_is_lossless_on_the_fixture_and_says_so(store, tiny_zimage, tmp_path):
    out = run_zreg("create", tiny_zimage, "-n", "tiny", "--quantize", "bf16", store=store).stdout
    assert "lossless" in out and "lossy" not in out
    _, manifest, _ = store.resolve("tiny")
    assert {layer.dtype for layer in manifest.tensor_layers()} == {"BF16"}
    assert store.config(manifest).components["transformer"].lossless is True
    folder = make_model_folder(tmp_path / "lossy")        # arbitrary float32 values
    out = run_zreg("create", folder, "-n", "lossy", "--quantize", "bf16", store=store).stdout
    assert "lossy (values changed)" in out


def test_nan_is_refused_before_any_blob_is_written(store, tmp_path):
    good = make_model_folder(tmp_path / "good", seed=3)
    run_zreg("create", good, "-n", "good", store=store)
    folder = make_model_folder(tmp_path / "nan")
    weights = {"layers.0.attention.to_q.weight": np.ones((64, 64), np.float32),
               "layers.0.attention.norm_q.weight": np.ones((16,), np.float32)}
    weights["layers.0.attention.to_q.weight"][40, 7] = np.inf
    save_file(weights, folder / "transformer/diffusion_pytorch_model-00001-of-00002.safetensors")
    before = snapshot(store.root)
    proc = run_zreg("create", folder, "-n", "nan", "--quantize", "fp8", store=store, check=False)
    assert proc.returncode != 0
    assert "transformer/layers.0.attention.to_q.weight" in proc.stderr and "NaN/Inf" in proc.stderr
    assert snapshot(store.root) == before
    # The same from the store: import as is, then quantize.
    run_zreg("create", folder, "-n", "nan", store=store)
    before = snapshot(store.root)
    proc = run_zreg("quantize", "fp8", "nan", store=store, check=False)
    assert proc.returncode != 0 and "NaN/Inf" in proc.stderr
    assert snapshot(store.root) == before


def test_already_quantized_and_bad_mode_are_refused(store, tiny_zimage):
    run_zreg("create", tiny_zimage, "-n", "tiny", "--quantize", "fp8", store=store)
    before = snapshot(store.root)
    proc = run_zreg("quantize", "bf16", "tiny", store=store, check=False)
    assert proc.returncode != 0 and "already quantized" in proc.stderr
    proc = run_zreg("quantize", "int4", "tiny", store=store, check=False)
    assert proc.returncode != 0 and "int4" in proc.stderr
    assert snapshot(store.root) == before


def test_odd_rows_are_skipped_not_crashed(store, tmp_path):
    folder = make_model_folder(tmp_path / "odd")
    save_file({"layers.0.attention.to_q.weight": np.ones((64, 48), np.float32),
               "layers.0.attention.norm_q.weight": np.ones((16,), np.float32)},
              folder / "transformer/diffusion_pytorch_model-00001-of-00002.safetensors")
    run_zreg("create", folder, "-n", "odd", "--quantize", "fp8", store=store)
    layers = {layer.name: layer for layer in store.resolve("odd")[1].tensor_layers()}
    assert layers["transformer/layers.0.attention.to_q.weight"].dtype == "F32"
    assert layers["transformer/all_final_layer.2-1.linear.weight"].dtype == "F32"  # default skip


def test_quantize_skip_option(store, tiny_zimage):
    run_zreg("create", tiny_zimage, "-n", "tiny", store=store)
    run_zreg("quantize", "fp8", "tiny", "all", "--quantize-skip", "*norm*", store=store)
    layers = {layer.name: layer for layer in store.resolve("all")[1].tensor_layers()}
    assert layers["transformer/layers.0.adaLN_modulation.0.weight"].dtype == "F8_E4M3"
    assert layers["transformer/layers.0.attention.norm_q.weight"].dtype == "F32"


def test_export_of_a_quantized_model_says_why_not(store, tiny_zimage, tmp_path):
    run_zreg("create", tiny_zimage, "-n", "tiny", "--quantize", "fp8", store=store)
    proc = run_zreg("export", "tiny", tmp_path / "out", store=store, check=False)
    assert proc.returncode != 0 and "cannot export" in proc.stderr
    assert not (tmp_path / "out").exists()
