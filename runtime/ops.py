"""The few hot operations whose MLX CPU kernels are slow on x86, with a numpy path for them.

MLX's CPU backend vectorises only on Apple silicon (its SIMD layer has width 1 elsewhere) and
runs elementwise kernels on one thread, so on a Linux CPU `exp` runs at ~75 M/s against
~1.4 G/s for numpy's AVX-512 ufuncs, and attention's softmax or SiLU cost more than the
matmuls around them. On the CPU with float32, these functions therefore evaluate their (already
computed) inputs, view them as numpy arrays (zero-copy), compute there, and hand one array back
to MLX. Everywhere else (Metal, CUDA, half precision) they are the plain MLX expressions, and the
tests run both paths against each other. Matmuls stay in MLX (BLAS) except inside attention.

    attention        blocked softmax(q k^T) v; no full score matrix (MLX's CPU fallback makes all
                     heads' scores at once)
    silu, silu_mul   the SwiGLU gate
    rms_norm, residual_rms_norm   the blocks' norms fused with their adaLN scale / gated residual
    norm_rope        RMSNorm of q/k and the rotary embedding, fused, written in attention's layout
    group_norm_silu  the VAE's GroupNorm (+ SiLU)
    conv3x3          the VAE's convs as shifted BLAS matmuls summed in place, in bands; 2x
                     upsampling, the GroupNorm + SiLU before it and a residual after it folded in

Results go into fresh MLX buffers that numpy fills through a view (`_fresh`); inputs are never
written. Work is split over the cores with a thread pool (numpy releases the GIL).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import blas

ATTENTION_BLOCK = 512         # most query rows per attention block (numpy path)
CONV_BAND_BYTES = 16 << 20     # largest input band or accumulator of one conv (numpy path)
TEMP_CHUNK_ELEMENTS = 1 << 18  # numpy temporaries: 1 MB per thread at most
PARALLEL_MIN_ELEMENTS = 1 << 17  # smaller jobs run on the calling thread
EXP_SAFE = 64.0               # |scores| below this: softmax without the max shift (e^64 * 1e9 < fp32 max)

# Off with ZREG_NUMPY_KERNELS=0 (the parity tests run both settings).
_enabled = os.environ.get("ZREG_NUMPY_KERNELS", "1") != "0"


def set_numpy_kernels(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def numpy_kernels_on(device: str, dtype) -> bool:
    """Whether a run on `device` computing in `dtype` takes the numpy paths below."""
    return _enabled and device == "cpu" and dtype == mx.float32


def numpy_path(*arrays: mx.array) -> bool:
    return (_enabled and mx.default_device() == mx.cpu
            and all(a.dtype == mx.float32 for a in arrays))


def _split(n: int, elements: int) -> list[tuple[int, int]]:
    """Cut range(n) into one slice per core (numpy's ufuncs run on one thread and release the
    GIL); one slice when the whole job (`elements` values) is too small to be worth a thread
    hand-off (waking a pool thread on an idle core costs tens of microseconds)."""
    parts = max(1, min(n, _THREADS)) if elements >= PARALLEL_MIN_ELEMENTS else 1
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _parallel(fn, n: int, elements: int) -> None:
    slices = _split(n, elements)
    if len(slices) == 1:
        fn(*slices[0])
    else:
        list(_pool().map(lambda ab: fn(*ab), slices))


_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(_THREADS, thread_name_prefix="zreg-ops")
    return _POOL


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False) -> mx.array:
    """softmax(q k^T * scale [+ causal mask]) v for q [B, H, L, D], k and v [B, Hkv, S, D]
    (Hkv divides H: grouped-query attention).

    The numpy path is a blocked ("flash"-style) kernel: for each head and block of
    ATTENTION_BLOCK query rows, scores -> softmax -> times v in a small scratch that stays in
    cache, the blocks spread over the cores (numpy's BLAS set to one thread for this, see
    `_numpy_blas_one_thread`). No score matrix for all heads ever exists; the result is
    written into one fresh MLX buffer."""
    if not numpy_path(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)
    B, H, L, D = q.shape
    S, rep = k.shape[2], H // k.shape[1]
    # Heads made contiguous (numpy's matmul on the models' strided per-head views is ~1.6x
    # slower); the output is written as [B, L, H, D], what the caller reshapes to [B, L, H * D],
    # and returned transposed to [B, H, L, D].
    q, k, v = mx.contiguous(q), mx.contiguous(k), mx.contiguous(v)
    out, on = _fresh((B, L, H, v.shape[-1]))
    mx.eval(q, k, v)
    qn, kn, vn = np.asarray(q), np.asarray(k), np.asarray(v)
    # Equal blocks of at most ATTENTION_BLOCK rows: a short last block wastes a BLAS call's
    # set-up and unbalances the threads (1056 tokens: 3 x 352, not 4 x 256 + 32).
    block = -(-L // -(-L // ATTENTION_BLOCK))
    tasks = [(b, h, r) for b in range(B) for h in range(H) for r in range(0, L, block)]
    threads = _THREADS if _numpy_blas_one_thread() and B * H * L * S >= PARALLEL_MIN_ELEMENTS else 1
    scale = np.float32(scale)
    # Softmax is shift-invariant; the usual shift by the row maximum only keeps exp() in range.
    # By Cauchy-Schwarz no score of a block exceeds |scale| * max |q_i| * max |k_j|; where that
    # bound is under EXP_SAFE, exp() of the raw scores neither overflows nor underflows (nor
    # does their sum), and two of the softmax's five passes are skipped. (NaN/inf: bound fails.)
    k_norms = np.sqrt(np.einsum("bhsd,bhsd->bhs", kn, kn).max(axis=-1))

    def work(mine):
        scratch = np.empty((block, S), np.float32)
        result = np.empty((block, vn.shape[-1]), np.float32)
        for b, h, r in mine:
            rows = min(block, L - r)
            s, o, qb = scratch[:rows], result[:rows], qn[b, h, r:r + rows]
            np.matmul(qb, kn[b, h // rep].T, out=s)
            if scale != 1:  # (the transformer folds the scale into q: norm_rope's `scale`)
                s *= scale
            if causal:  # query i (of L, aligned to the end of S) sees keys 0 .. i + S - L
                s[np.triu(np.ones((rows, S), bool), k=r + S - L + 1)] = -np.inf
            bound = abs(scale) * np.sqrt(np.einsum("ld,ld->l", qb, qb).max()) * k_norms[b, h // rep]
            if not bound < EXP_SAFE:
                s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            denom = s.sum(axis=-1, keepdims=True)
            np.matmul(s, vn[b, h // rep], out=o)
            np.divide(o, denom, out=on[b, r:r + rows, h])

    if threads == 1:
        work(tasks)
    else:
        list(_pool().map(work, [tasks[i::threads] for i in range(threads)]))
    return out.transpose(0, 2, 1, 3)


_BLAS_ONE_THREAD = None


def _numpy_blas_one_thread() -> bool:
    """Set numpy's bundled OpenBLAS to one thread (once), so the attention blocks can run one
    per core without each spawning BLAS threads; True if that worked. Only numpy's copy is
    touched (it has its own symbol names); MLX's BLAS keeps its threads."""
    global _BLAS_ONE_THREAD
    if _BLAS_ONE_THREAD is None:
        _BLAS_ONE_THREAD = False
        import ctypes
        import glob

        libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*"))
        for path in libs:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
                if hasattr(lib, name):
                    getattr(lib, name)(1)
                    _BLAS_ONE_THREAD = True
                    break
    return _BLAS_ONE_THREAD


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    if not numpy_path(x):
        return nn.silu(x)
    return _silu_times(x, None)


def silu_mul(a: mx.array, b: mx.array) -> mx.array:
    """silu(a) * b (the SwiGLU gate)."""
    if not numpy_path(a, b) or a.shape != b.shape:
        return nn.silu(a) * b
    return _silu_times(a, b)


def _silu_times(a: mx.array, b: mx.array | None) -> mx.array:
    """a * b / (1 + e^-a) (b = 1 when None), written into a fresh buffer, rows split over cores."""
    mx.eval(a) if b is None else mx.eval(a, b)
    y, yn = _fresh(a.shape)
    width = a.shape[-1]
    an, yn = np.asarray(a).reshape(-1, width), yn.reshape(-1, width)
    bn = None if b is None else np.asarray(b).reshape(-1, width)

    def rows(i, j):
        step = _rows_per_chunk(width)  # small temporaries
        for r in range(i, j, step):
            z = min(j, r + step)
            if bn is None:
                yn[r:z] = an[r:z]
            else:
                np.multiply(an[r:z], bn[r:z], out=yn[r:z])
            _times_sigmoid(yn[r:z], an[r:z])

    _parallel(rows, an.shape[0], an.size)
    return y


def rms_norm(x: mx.array, weight: mx.array, eps: float, scale: mx.array | None = None) -> mx.array:
    """RMSNorm over the last axis times `weight`, times (1 + scale) if given: the transformer
    blocks' pre-norm with its adaLN scale (`scale` [B, 1, D], one row per batch entry)."""
    if not numpy_path(x):
        y = mx.fast.rms_norm(x, weight.astype(x.dtype), eps)
        return y if scale is None else y * (1.0 + scale)
    factor = _row_factors(weight, None if scale is None else 1.0 + scale, x.shape)
    return _normed_rows(x, None, factor, eps)


def residual_rms_norm(x: mx.array, y: mx.array, weight: mx.array, eps: float,
                      gate: mx.array | None = None) -> mx.array:
    """x + gate * RMSNorm(y) * weight (gate [B, 1, D], or 1): the blocks' gated post-norm residual."""
    if not numpy_path(x, y):
        n = mx.fast.rms_norm(y, weight.astype(y.dtype), eps)
        return x + (n if gate is None else gate * n)
    factor = _row_factors(weight, gate, y.shape)
    return _normed_rows(y, x, factor, eps)


def _row_factors(weight: mx.array, per_batch: mx.array | None, shape) -> np.ndarray:
    """weight (* per_batch) as float32 [B, D]: what each batch entry's normed rows are multiplied by."""
    B, D = shape[0], shape[-1]
    w = weight.astype(mx.float32)
    f = mx.broadcast_to(w, (B, D)) if per_batch is None else w * per_batch.astype(mx.float32).reshape(B, D)
    return np.array(f, dtype=np.float32)


def _normed_rows(y: mx.array, residual: mx.array | None, factor: np.ndarray, eps: float) -> mx.array:
    """(residual +) y / rms(y) * factor[b], row by row over the cores; one pass for the row sums of
    squares (a dot product per row), one or two elementwise passes."""
    mx.eval(y) if residual is None else mx.eval(y, residual)
    out, on = _fresh(y.shape)
    B, D = y.shape[0], y.shape[-1]
    yn, on = np.asarray(y).reshape(B, -1, D), on.reshape(B, -1, D)
    rn = None if residual is None else np.asarray(residual).reshape(B, -1, D)
    mean_of = np.float32(1.0 / D)

    def rows(i, j):
        step = _rows_per_chunk(D)
        for b in range(B):
            for r in range(i, j, step):
                z = min(j, r + step)
                t, o = yn[b, r:z], on[b, r:z]
                inv = np.einsum("ij,ij->i", t, t)[:, None]
                inv *= mean_of
                inv += np.float32(eps)
                np.sqrt(inv, out=inv)
                np.divide(t, inv, out=o)
                o *= factor[b]
                if rn is not None:
                    o += rn[b, r:z]

    _parallel(rows, yn.shape[1], yn.size)
    return out


def norm_rope(x: mx.array, weight: mx.array | None, eps: float, cos: mx.array, sin: mx.array,
              scale: float = 1.0) -> mx.array:
    """RMSNorm over the last axis (if `weight`), then rotary on interleaved pairs, in float32, for
    x [B, L, H, D] with cos, sin [L, D/2]; returns [B, H, L, D] (contiguous on the numpy path,
    which is the layout attention wants), times `scale` (attention's, folded into q)."""
    if not numpy_path(x):
        if scale != 1:
            cos, sin = cos * scale, sin * scale  # rotation is linear: scaling the tables scales the output
        if weight is not None:
            x = mx.fast.rms_norm(x, weight.astype(x.dtype), eps)
        dtype = x.dtype
        pairs = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
        re, im = pairs[..., 0], pairs[..., 1]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        out = mx.stack([re * c - im * s, re * s + im * c], axis=-1)
        return out.reshape(x.shape).astype(dtype).transpose(0, 2, 1, 3)
    # Interleaved pairs are complex64 numbers in memory, and the rotation is a complex product
    # with cos + i sin (numpy's SIMD complex multiply): contiguous passes, no strided halves.
    B, L, H, D = x.shape
    w = None if weight is None else weight.astype(mx.float32)
    mx.eval(x, cos, sin) if w is None else mx.eval(x, w, cos, sin)
    out, on = _fresh((B, H, L, D))
    xn, wn = np.asarray(x), None if w is None else np.asarray(w)
    rotation = np.empty(cos.shape, np.complex64)                              # [L, D/2]
    rotation.real, rotation.imag = np.asarray(cos), np.asarray(sin)
    if scale != 1:
        rotation *= np.float32(scale)  # rotation is linear: scaling it scales the output
    rotated = on.view(np.complex64)                                           # [B, H, L, D/2]
    mean_of = np.float32(1.0 / D)

    def rows(i, j):
        step = max(1, _rows_per_chunk(H * D))
        for b in range(B):
            for r in range(i, j, step):
                z = min(j, r + step)
                t = xn[b, r:z]                                                # [rows, H, D]
                if t.strides[-1] != t.itemsize:  # (a view with strided pairs: not complex numbers)
                    t = np.ascontiguousarray(t)
                if wn is not None:
                    rms = np.einsum("rhd,rhd->rh", t, t)[..., None]
                    rms *= mean_of
                    rms += np.float32(eps)
                    np.sqrt(rms, out=rms)
                    t = t / rms
                    t *= wn
                np.multiply(t.view(np.complex64), rotation[r:z, None, :],
                            out=rotated[b, :, r:z].transpose(1, 0, 2))

    _parallel(rows, L, xn.size)
    return out


def _rows_per_chunk(width: int) -> int:
    return max(1, TEMP_CHUNK_ELEMENTS // max(1, width))


def group_norm_silu(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float,
                    act: bool) -> mx.array:
    """GroupNorm (torch's channel grouping, statistics in float32) on NHWC x, then SiLU if `act`."""
    N, H, W, C = x.shape
    if not numpy_path(x):
        g = x.astype(mx.float32).reshape(N, H * W, groups, C // groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = mx.square(g - mean).mean(axis=(1, 3), keepdims=True)
        g = ((g - mean) * mx.rsqrt(var + eps)).reshape(N, H, W, C).astype(x.dtype)
        y = g * weight.astype(x.dtype) + bias.astype(x.dtype)
        return nn.silu(y) if act else y
    scale, shift = _group_norm_affine(x, weight, bias, groups, eps)
    y, yn = _fresh((N, H, W, C))
    xn, yn = np.asarray(x).reshape(N, H * W, C), yn.reshape(N, H * W, C)
    step = _rows_per_chunk(C)
    chunks = [(n, a, min(H * W, a + step)) for n in range(N) for a in range(0, H * W, step)]

    def write(i, j):
        for k in range(i, j):
            n, a, z = chunks[k]
            _scale_shift_silu(xn[n, a:z], scale[n], shift[n], act, out=yn[n, a:z])

    _parallel(write, len(chunks), xn.size)
    return y


def _group_norm_affine(x: mx.array, weight: mx.array, bias: mx.array, groups: int,
                       eps: float) -> tuple[np.ndarray, np.ndarray]:
    """GroupNorm of NHWC x as a per-channel affine: (scale, shift), float32 [N, C] each, with
    GroupNorm(x) = x * scale + shift; statistics two-pass in float32, summed in float64 (torch's)."""
    N, H, W, C = x.shape
    w, b = weight.astype(mx.float32), bias.astype(mx.float32)
    mx.eval(x, w, b)
    xn = np.asarray(x).reshape(N, H * W, C)
    cg, step = C // groups, _rows_per_chunk(C)
    chunks = [(n, a, min(H * W, a + step)) for n in range(N) for a in range(0, H * W, step)]

    def reduce(fn):  # per-chunk float32 column sums (contiguous rows: fast), added up in float64
        parts = np.zeros((len(chunks), C), np.float64)

        def work(i, j):
            for k in range(i, j):
                n, a, z = chunks[k]
                parts[k] = fn(n, xn[n, a:z]).sum(axis=0)
        _parallel(work, len(chunks), xn.size)
        per_n = np.stack([parts[[k for k, c in enumerate(chunks) if c[0] == n]].sum(axis=0) for n in range(N)])
        return per_n.reshape(N, groups, cg).sum(axis=2)

    def squared_deviation(n, rows):
        t = rows - m32[n]
        return np.square(t, out=t)

    count = H * W * cg
    mean = reduce(lambda n, rows: rows) / count                                # [N, groups]
    m32 = np.repeat(mean, cg, axis=1).astype(np.float32)                       # [N, C]
    var = reduce(squared_deviation) / count                                    # two-pass, as torch
    inv = 1.0 / np.sqrt(var + eps)
    wn, bn = np.asarray(w).reshape(groups, cg), np.asarray(b).reshape(groups, cg)
    # Per channel y = x * scale + shift: the group's statistics folded into the affine.
    scale = (inv[:, :, None] * wn).reshape(N, C).astype(np.float32)
    shift = (bn - (mean * inv)[:, :, None] * wn).reshape(N, C).astype(np.float32)
    return scale, shift


def _scale_shift_silu(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, act: bool,
                      out: np.ndarray) -> None:
    """out = x * scale + shift, then SiLU if `act` (out may be a strided view)."""
    np.multiply(x, scale, out=out)
    out += shift
    if act:
        _times_sigmoid(out, out)


def _times_sigmoid(out: np.ndarray, z: np.ndarray) -> None:
    """out *= sigmoid(z), as out / (1 + e^-z) (z may be out itself)."""
    t = np.negative(z)
    np.exp(t, out=t)
    t += np.float32(1)
    out /= t


def _fresh(shape) -> tuple[mx.array, np.ndarray]:
    """A new MLX float32 buffer and a writable numpy view of it (numpy fills it in place)."""
    a = mx.zeros(shape, mx.float32)
    mx.eval(a)
    view = np.asarray(a)
    if not (view.flags.c_contiguous and view.flags.writeable):  # never a broadcast constant
        a = mx.contiguous(a + 0.0)
        mx.eval(a)
        view = np.asarray(a)
    return a, view


def upsample2x(x: mx.array) -> mx.array:
    """Nearest-neighbour 2x of NHWC x."""
    N, H, W, C = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (N, H, 2, W, 2, C)).reshape(N, 2 * H, 2 * W, C)


def conv_band_rows(h: int, w: int, c_in: int, c_out: int) -> int:
    """Image rows per band of a numpy-path conv3x3: the padded input band and the accumulator each
    stay under CONV_BAND_BYTES (also used by the memory estimate)."""
    return max(1, min(h, CONV_BAND_BYTES // ((w + 2) * max(c_in, c_out) * 4)))


def conv3x3(x: mx.array, w: mx.array, b: mx.array, upsample: bool = False,
            residual: mx.array | None = None, prenorm: tuple | None = None) -> mx.array:
    """conv2d(upsample2x(x) if upsample else x, w, padding=1) + b (+ residual), NHWC, w [O, 3, 3, C].
    With prenorm = (weight, bias, groups, eps), x is first group_norm_silu(x, ..., act=True):
    on the numpy path applied to each band as it is copied in (no normalized copy of x is made).

    The numpy path never unfolds the input (MLX's CPU conv2d writes a 9x copy of it, and runs at
    a third of the BLAS speed): rows are done in bands; each band is zero-padded into one flat
    [rows * (W + 2), C] array, in which every tap (dy, dx) is the contiguous slice starting at
    dy * (W + 2) + dx, so the conv is nine BLAS matmuls accumulated in place (`blas.sgemm`, or
    MLX's addmm where there is no fast BLAS to call). The two junk columns per row are dropped
    while the band, plus bias (and residual), is written to the output.

    With `upsample`, the conv runs on the low-resolution input: output pixel (2r + i, 2c + j)
    only ever sees source rows {r - 1, r} (i = 0) or {r, r + 1} (i = 1), and likewise columns,
    so each of the four output phases is a 2x2 conv whose taps are sums of the 3x3 taps
    ("sub-pixel" form): 16 low-resolution taps instead of 9 at four times the size, and the
    upsampled tensor never exists."""
    if not numpy_path(x, w):
        x = x if prenorm is None else group_norm_silu(x, *prenorm, act=True)
        y = mx.conv2d(upsample2x(x) if upsample else x, w, padding=1) + b
        return y if residual is None else y + residual
    N, H, W, C = x.shape
    O = w.shape[0]
    taps = mx.contiguous(w.transpose(1, 2, 3, 0))  # [3, 3, C, O]
    if upsample:
        # rows (and columns) of the 3x3 kernel folded for output phase 0 and 1: [phase][offset]
        fold = [[(0,), (1, 2)], [(0, 1), (2,)]]
        plans = []
        for i in range(2):
            for j in range(2):
                phase_taps = []
                for oy, ys in enumerate(fold[i]):
                    for ox, xs in enumerate(fold[j]):
                        t = sum(taps[y, x] for y in ys for x in xs)
                        phase_taps.append((oy + i, ox + j, t))  # offsets in the padded band
                plans.append((i, j, phase_taps))
    else:
        plans = [(0, 0, [(dy, dx, taps[dy, dx]) for dy in range(3) for dx in range(3)])]
    f = 2 if upsample else 1
    rows = conv_band_rows(H, W, C, O)
    mx.eval(x, b, *[t for _, _, pt in plans for _, _, t in pt])
    if residual is not None:
        mx.eval(residual)
    scale, shift = (None, None) if prenorm is None else _group_norm_affine(x, *prenorm)
    gemm = blas.sgemm()
    out, on = _fresh((N, H * f, W * f, O))  # filled band by band below
    # One padded band and one accumulator, reused by every band (MLX buffers, so MLX's memory
    # count sees them; on the MLX path the evals below finish with them before a band is reused).
    flat, flat_n = _fresh(((rows + 3) * (W + 2), C))
    band = flat_n.reshape(rows + 3, W + 2, C)
    acc_n = _fresh((rows * (W + 2), O))[1] if gemm else None  # (the view keeps its buffer)
    xn, bn = np.asarray(x), np.asarray(b)
    rn = None if residual is None else np.asarray(residual)
    for n in range(N):
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            # Zero-padded input rows r0-1 .. r1 (+1 spare zero row so the last tap's slice fits);
            # the two padding columns are never written, so they stay zero.
            lo, hi = max(0, r0 - 1), min(H, r1 + 1)
            top, end = lo - (r0 - 1), hi - (r0 - 1)
            band[:top] = 0
            band[end:] = 0

            def fill(i, j, n=n, lo=lo, top=top):
                if scale is None:
                    band[top + i:top + j, 1:W + 1] = xn[n, lo + i:lo + j]
                    return
                step = max(1, _rows_per_chunk(W * C))
                for r in range(i, j, step):
                    z = min(j, r + step)
                    _scale_shift_silu(xn[n, lo + r:lo + z], scale[n], shift[n], True,
                                      out=band[top + r:top + z, 1:W + 1])

            _parallel(fill, hi - lo, (hi - lo) * W * C)
            count = (r1 - r0) * (W + 2)
            for i, j, phase_taps in plans:
                dst = on[n, r0 * f + i: r1 * f: f, j::f]
                skip = None if rn is None else rn[n, r0 * f + i: r1 * f: f, j::f]
                if gemm:
                    # The accumulator starts as residual + bias where there is a residual (one
                    # pass over the output fewer), and the taps accumulate onto it in place.
                    result = acc_n[:count]
                    grid = result.reshape(r1 - r0, W + 2, O)[:, :W]
                    if skip is not None:
                        np.add(skip, bn, out=grid)
                    for k, (dy, dx, t) in enumerate(phase_taps):
                        at = dy * (W + 2) + dx
                        beta = 0.0 if k == 0 and skip is None else 1.0
                        gemm(flat_n[at:at + count], np.asarray(t), result, beta)
                    if skip is None:
                        np.add(grid, bn, out=dst)
                    else:
                        np.copyto(dst, grid)
                    continue
                total = None
                for dy, dx, t in phase_taps:
                    a = flat[dy * (W + 2) + dx: dy * (W + 2) + dx + count]
                    total = a @ t if total is None else mx.addmm(total, a, t)
                mx.eval(total)
                np.add(np.asarray(total).reshape(r1 - r0, W + 2, O)[:, :W], bn, out=dst)
                if skip is not None:
                    dst += skip
    return out
