"""Unit checks of runtime pieces: the numpy kernels against the plain MLX expressions (the GPU
path), the BLAS re-exec guard, PNG naming, memory-size parsing and the backend choice."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from zreg.runtime import backend, blas, heap, ops
from zreg.runtime.backend import parse_bytes, select
from zreg.runtime.errors import BadRequest
from zreg.runtime.png import default_output, slug


def both_paths(fn, *args, **kwargs):
    fast = fn(*args, **kwargs)
    ops.set_numpy_kernels(False)
    try:
        plain = fn(*args, **kwargs)
    finally:
        ops.set_numpy_kernels(True)
    return np.array(fast), np.array(plain)


@pytest.mark.parametrize("heads,kv_heads,q_len,kv_len,causal", [
    (4, 4, 37, 37, False), (4, 2, 37, 37, True), (3, 1, 50, 50, True), (1, 1, 64, 64, False),
    (2, 2, 20, 45, True)])  # fewer queries than keys: causal aligned to the end
@pytest.mark.parametrize("block", [ops.ATTENTION_BLOCK, 7])  # one block per head / many
# Scores bounded well under EXP_SAFE (softmax without the max shift) / up to ~500 (shift needed:
# e^500 overflows float32, so a wrong bound shows as inf/NaN).
@pytest.mark.parametrize("magnitude", [1, 8])
def test_attention(monkeypatch, heads, kv_heads, q_len, kv_len, causal, block, magnitude):
    monkeypatch.setattr(ops, "ATTENTION_BLOCK", block)
    rng = np.random.default_rng(0)
    q = mx.array(rng.standard_normal((1, heads, q_len, 16), dtype=np.float32) * magnitude)
    k = mx.array(rng.standard_normal((1, kv_heads, kv_len, 16), dtype=np.float32) * magnitude)
    v = mx.array(rng.standard_normal((1, kv_heads, kv_len, 16), dtype=np.float32))
    fast, plain = both_paths(ops.attention, q, k, v, 0.3, causal)
    assert np.isfinite(fast).all()
    # (scores of ~500 differ by ~1e-4 between two BLAS summation orders; softmax passes it on)
    np.testing.assert_allclose(fast, plain, atol=2e-6 if magnitude == 1 else 2e-4)


def test_attention_on_transposed_inputs():
    x = mx.array(np.random.default_rng(1).standard_normal((1, 40, 3, 8), dtype=np.float32))
    q = x.transpose(0, 2, 1, 3)  # a strided view, as the models pass it
    fast, plain = both_paths(ops.attention, q, q, q, 0.35)
    np.testing.assert_allclose(fast, plain, atol=2e-6)


def test_silu_and_silu_mul(monkeypatch):
    monkeypatch.setattr(ops, "TEMP_CHUNK_ELEMENTS", 100)  # many chunks
    rng = np.random.default_rng(2)
    a_np = rng.standard_normal((3, 70, 33), dtype=np.float32) * 4
    a, b = mx.array(a_np), mx.array(rng.standard_normal((3, 70, 33), dtype=np.float32))
    fast, plain = both_paths(ops.silu_mul, a, b)
    np.testing.assert_allclose(fast, plain, rtol=1e-6, atol=1e-6)
    fast, plain = both_paths(ops.silu, a)
    np.testing.assert_allclose(fast, plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.array(a), a_np)  # inputs untouched: results go to fresh buffers


@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_norm_rope(with_norm, layout, scale):
    rng = np.random.default_rng(5)
    x = mx.array(rng.standard_normal((1, 37, 16, 3), dtype=np.float32) * 2).swapaxes(2, 3)
    if layout == "contiguous":
        x = mx.contiguous(x)
    w = mx.array(rng.standard_normal(16, dtype=np.float32)) if with_norm else None
    angles = rng.standard_normal((37, 8), dtype=np.float32) * 3
    cos, sin = mx.array(np.cos(angles)), mx.array(np.sin(angles))
    fast, plain = both_paths(ops.norm_rope, x, w, 1e-5, cos, sin, scale)
    assert fast.shape == (1, 3, 37, 16)
    np.testing.assert_allclose(fast, plain, atol=2e-6)


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_rms_norms(monkeypatch, batch):
    monkeypatch.setattr(ops, "TEMP_CHUNK_ELEMENTS", 100)  # many chunks
    rng = np.random.default_rng(6)
    x = mx.array(rng.standard_normal((batch, 41, 24), dtype=np.float32) * 3)
    y = mx.array(rng.standard_normal((batch, 41, 24), dtype=np.float32) * 0.5 + 1)
    w = mx.array(rng.standard_normal(24, dtype=np.float32))
    per_batch = mx.array(rng.standard_normal((batch, 1, 24), dtype=np.float32))
    for scale in (None, per_batch):
        fast, plain = both_paths(ops.rms_norm, x, w, 1e-5, scale=scale)
        np.testing.assert_allclose(fast, plain, rtol=2e-6, atol=2e-6)
    for gate in (None, per_batch):
        fast, plain = both_paths(ops.residual_rms_norm, x, y, w, 1e-5, gate=gate)
        np.testing.assert_allclose(fast, plain, rtol=2e-6, atol=2e-6)
    # and against the formula, in float64
    xn, yn, wn, g = (np.array(a, np.float64) for a in (x, y, w, per_batch))
    expect = xn + g * yn / np.sqrt(np.mean(yn ** 2, axis=-1, keepdims=True) + 1e-5) * wn
    np.testing.assert_allclose(np.array(ops.residual_rms_norm(x, y, w, 1e-5, gate=per_batch)), expect,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", [False, True])
def test_group_norm_silu(act):
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((1, 9, 7, 32), dtype=np.float32) * 3 + 1)
    w = mx.array(rng.standard_normal(32, dtype=np.float32))
    b = mx.array(rng.standard_normal(32, dtype=np.float32))
    fast, plain = both_paths(ops.group_norm_silu, x, w, b, 8, 1e-6, act)
    np.testing.assert_allclose(fast, plain, atol=2e-5)


@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("band_bytes", [ops.CONV_BAND_BYTES, 20000])  # whole, and many bands
@pytest.mark.parametrize("gemm", ["blas", "mlx"])  # in-place cblas_sgemm / MLX addmm (no fast BLAS)
def test_conv3x3(monkeypatch, upsample, band_bytes, gemm):
    monkeypatch.setattr(ops, "CONV_BAND_BYTES", band_bytes)
    if gemm == "mlx":
        monkeypatch.setattr(ops.blas, "sgemm", lambda: None)
    else:
        assert blas.sgemm() is not None, "the test environment installs libopenblas0-pthread"
    rng = np.random.default_rng(4)
    x = mx.array(rng.standard_normal((2, 11, 13, 8), dtype=np.float32))
    w = mx.array(rng.standard_normal((6, 3, 3, 8), dtype=np.float32) * 0.2)
    b = mx.array(rng.standard_normal(6, dtype=np.float32))
    shape = (2, 22, 26, 6) if upsample else (2, 11, 13, 6)
    residual = mx.array(rng.standard_normal(shape, dtype=np.float32))
    fast, plain = both_paths(ops.conv3x3, x, w, b, upsample)
    assert fast.shape == shape
    np.testing.assert_allclose(fast, plain, atol=1e-5)
    with_residual, plain_with_residual = both_paths(ops.conv3x3, x, w, b, upsample, residual=residual)
    np.testing.assert_allclose(with_residual, plain + np.array(residual), atol=1e-5)
    np.testing.assert_allclose(plain_with_residual, plain + np.array(residual), atol=1e-5)


def test_sgemm_in_place():
    gemm = blas.sgemm()
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((40, 24), dtype=np.float32), rng.standard_normal((24, 16), dtype=np.float32)
    wide = np.ones((40, 30), np.float32)
    gemm(a, b, wide[:, 4:20], 1.0)  # accumulate into a strided block; the rest untouched
    np.testing.assert_allclose(wide[:, 4:20], a @ b + 1, rtol=1e-5, atol=1e-5)
    assert (wide[:, :4] == 1).all() and (wide[:, 20:] == 1).all()
    with pytest.raises(ValueError, match="contiguous rows"):
        gemm(a.T, b[:, :16], wide[:24, :16], 0.0)  # a transposed view: rows not contiguous
    with pytest.raises(ValueError, match="shapes"):
        gemm(a, b, wide[:, :10], 0.0)


def test_blas_reexec_only_for_the_cli(monkeypatch):
    # Inside pytest (not the zreg command) it never re-executes, whatever the BLAS.
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    called = []
    monkeypatch.setattr(blas.os, "execve", lambda *a: called.append(a))
    blas.reexec_with_fast_blas()
    assert not called
    assert isinstance(blas.status(), str) and blas.status()


def test_blas_preload_environment():
    env = blas.preload_env(Path("/lib/fast.so"), {"LD_PRELOAD": "/lib/other.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/lib/fast.so /lib/other.so" and env["PATH"] == "/bin"
    assert env["OPENBLAS_THREAD_TIMEOUT"] == "4"          # idle BLAS threads stop spinning soon
    assert blas.preload_env(Path("/lib/fast.so"), {"OPENBLAS_THREAD_TIMEOUT": "20"})["OPENBLAS_THREAD_TIMEOUT"] == "20"
    assert "OPENBLAS_THREAD_TIMEOUT" not in blas.preload_env(Path("/lib/fast.so"), {}, small_model=True)


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or heap._glibc() is None,
                    reason="resident memory is read from /proc with glibc's malloc")
def test_heap_keeps_freed_buffers_until_release():
    assert heap.retain()
    heap.release()
    before = _resident_bytes()
    blocks = [np.ones(4 << 20, np.float32) for _ in range(24)]  # 24 x 16 MB, under the mmap threshold
    assert _resident_bytes() - before > 300 << 20
    del blocks
    kept = _resident_bytes() - before
    assert kept > 300 << 20          # freed, but kept for the next operation (no page faults)
    heap.release()
    assert _resident_bytes() - before < 64 << 20     # given back after the run


def test_parse_bytes_and_device_choice(monkeypatch):
    assert parse_bytes("8GB") == 8_000_000_000 and parse_bytes("512mb") == 512_000_000
    assert parse_bytes("1048576") == 1048576
    with pytest.raises(BadRequest, match="ZREG_MEMORY_LIMIT"):
        parse_bytes("lots")
    assert select("cpu").device == "cpu" and select("cpu").compute_dtype == mx.float32
    with pytest.raises(BadRequest, match="unknown device 'tpu'"):
        select("tpu")
    monkeypatch.setenv("ZREG_DTYPE", "bfloat16")
    assert select("cpu").compute_dtype == mx.bfloat16


def test_fp8_matmul_probe(monkeypatch):
    """The GPU's FP8 path is probed: a build without an mxfp8 quantized_matmul kernel runs FP8
    linears dequantized and says why (the probe itself runs here on the CPU)."""
    monkeypatch.setattr(backend, "_PROBED", {})
    assert backend.quantized_matmul_failure(mx.cpu, mx.float32) == ""

    def missing(*args, **kwargs):
        raise RuntimeError("QuantizedMatmul has no CUDA implementation.")

    monkeypatch.setattr(backend, "_PROBED", {})
    monkeypatch.setattr(mx, "quantized_matmul", missing)
    failure = backend.quantized_matmul_failure(mx.cpu, mx.bfloat16)
    assert "no CUDA implementation" in failure

    # select() on a GPU build: the probe's answer picks the path; ZREG_FP8_MATMUL skips the probe
    monkeypatch.setattr(backend, "_gpu_kind", lambda: "cuda")
    monkeypatch.setattr(backend, "quantized_matmul_failure", lambda device, dtype: failure)
    chosen = select("gpu")
    assert (chosen.device, chosen.fp8_matmul) == ("gpu", "dequantize") and chosen.fp8_note == failure
    shown = backend.Backend("cpu", "cpu", mx.float32, "dequantize", failure).describe()
    assert "FP8 linears dequantized at use: mx.quantized_matmul (mxfp8): QuantizedMatmul has no CUDA" in shown
    monkeypatch.setattr(backend, "quantized_matmul_failure", lambda device, dtype: "")
    assert select("gpu").fp8_matmul == "quantized" and select("gpu").fp8_note == ""
    monkeypatch.setattr(backend, "quantized_matmul_failure", lambda device, dtype: pytest.fail("probed"))
    monkeypatch.setenv("ZREG_FP8_MATMUL", "quantized")
    assert select("gpu").fp8_matmul == "quantized"
    assert select("cpu").fp8_matmul == "quantized"  # the override holds on the CPU too
    monkeypatch.delenv("ZREG_FP8_MATMUL")
    assert select("cpu").fp8_matmul == "dequantize"


def test_output_names(tmp_path):
    assert slug("A red fox, in the SNOW!") == "a-red-fox-in-the-snow"
    assert slug("一只狐狸") == "image"
    first = default_output("a fox", tmp_path)
    first.write_bytes(b"x")
    second = default_output("a fox", tmp_path)
    assert second != first and second.name.startswith("a-fox-")
