"""Which BLAS MLX's CPU backend calls, and the fix for the slow one. Imports no MLX.

The `mlx-cpu` wheel for Linux bundles the Netlib *reference* BLAS (mlx_cpu.libs/libblas-*.so),
which runs an fp32 matmul at ~3-4 GFLOP/s on this project's CPUs; Debian's OpenBLAS, preloaded
with LD_PRELOAD, runs the same product at ~85-140 GFLOP/s (shared/notes/mlx-linux-cpu.md).
A running process cannot swap its BLAS, so the CLI re-executes itself once, before MLX is
imported, with LD_PRELOAD set (`reexec_with_fast_blas`) and says so on stderr.

    ZREG_BLAS=bundled   keep MLX's bundled BLAS (no re-exec)
    ZREG_BLAS=/path.so  preload this BLAS instead of the first one found in FAST_BLAS
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

# Libraries that export the standard cblas_*/sgemm_ symbols and so can stand in for
# libblas.so.3 (scipy-openblas renames its symbols, so it cannot).
FAST_BLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",   # Debian/Ubuntu libopenblas0-pthread
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",                                # Fedora/RHEL openblas
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
)
INSTALL_HINT = "apt-get install libopenblas0-pthread"
_MARKER = "ZREG_BLAS_REEXEC"


def bundled_reference_blas() -> Path | None:
    """The reference BLAS shipped in the mlx-cpu wheel, if this MLX is that wheel."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = Path(list(spec.submodule_search_locations)[0]).parent / "mlx_cpu.libs"
    found = sorted(libs.glob("libblas*.so*")) if libs.is_dir() else []
    return found[0] if found else None


def fast_blas() -> Path | None:
    choice = os.environ.get("ZREG_BLAS", "")
    if choice == "bundled":
        return None
    candidates = (choice,) if choice else FAST_BLAS
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def preloaded() -> Path | None:
    """A known fast BLAS named in LD_PRELOAD (so it is the one MLX calls)."""
    for item in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if Path(item).is_file() and ("blas" in Path(item).name or "mkl" in Path(item).name):
            return Path(item)
    return None


def status() -> str:
    """One line: which BLAS MLX's CPU backend uses in this process."""
    if sys.platform == "darwin":
        return "Accelerate"
    pre = preloaded()
    if pre:
        return f"{pre} (LD_PRELOAD)"
    if bundled_reference_blas():
        hint = "" if fast_blas() else f"; {INSTALL_HINT} makes it ~30x faster"
        return f"MLX's bundled reference BLAS (slow{hint})"
    return "system BLAS"


def preload_env(lib: Path, environ=None, small_model: bool = False) -> dict:
    """The environment that runs a process with `lib` as MLX's BLAS.

    For real-size models also OPENBLAS_THREAD_TIMEOUT=4 (unless set): after each call
    OpenBLAS's idle threads spin with sched_yield for 2^28 cycles by default, and the numpy
    kernels that run between two matmuls (runtime/ops.py) share the cores with them. On the
    2-core test machine that was ~0.8 s of system time per denoising step of the mid-size model
    (3.2 s/step; 2.7 s with the short timeout). A small model is the other way round: its
    matmuls take microseconds, and the spinning threads keep the cores awake between them, so
    waking MLX's and the kernels' threads is quick (the tiny fixture ran 2x slower without it)."""
    env = dict(os.environ if environ is None else environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(lib), env.get("LD_PRELOAD", "")]))
    if not small_model:
        env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    return env


def _invoked_as_cli() -> bool:
    """True in the `zreg` command (script or `python -m zreg.cli.main`), never inside another
    program that calls the CLI in-process (a test runner must not be re-executed)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name in ("zreg.cli.main", "zreg")
    return Path(sys.argv[0]).name == "zreg"


SMALL_MODEL_BYTES = 256 << 20


@functools.cache
def sgemm() -> Callable | None:
    """`gemm(a, b, c, beta)`: c = a @ b + beta * c in place, for float32 numpy matrices whose rows
    are contiguous (any row stride), through the fast BLAS's cblas_sgemm (the preloaded one,
    MLX's own, when the CLI re-executed; else loaded beside MLX's). None where there is none.

    For accumulating in place (the VAE convs' nine taps): MLX's addmm copies its addend into a
    fresh output first, a single-threaded pass over the accumulator per tap."""
    lib = preloaded() or fast_blas()
    try:
        fn = ctypes.CDLL(str(lib)).cblas_sgemm if lib else None
    except (OSError, AttributeError):
        fn = None
    if fn is None:
        return None
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    fn.restype = None
    row_major, no_trans = 101, 111

    def gemm(a, b, c, beta: float) -> None:
        (m, k), n = a.shape, b.shape[1]
        for x in (a, b, c):  # a bad stride here would be memory corruption, not an exception
            if str(x.dtype) != "float32" or x.ndim != 2 or x.strides[1] != 4 or x.strides[0] % 4:
                raise ValueError(f"sgemm: need float32 matrices with contiguous rows, got {x.dtype} {x.strides}")
        if b.shape[0] != k or c.shape != (m, n) or not c.flags.writeable:
            raise ValueError(f"sgemm: shapes {a.shape} @ {b.shape} -> {c.shape}")
        lda, ldb, ldc = a.strides[0] // 4, b.strides[0] // 4, c.strides[0] // 4
        if lda < k or ldb < n or ldc < n:
            raise ValueError(f"sgemm: overlapping rows ({a.strides}, {b.strides}, {c.strides})")
        fn(row_major, no_trans, no_trans, m, n, k, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb,
           beta, c.ctypes.data, ldc)

    return gemm


def reexec_with_fast_blas(model_bytes: Callable[[], int | None] = lambda: None) -> None:
    """Re-execute this command with a fast BLAS preloaded, when that helps. Returns if not.

    Only when: Linux, MLX is the mlx-cpu wheel with its reference BLAS, a fast BLAS exists, it is
    not already preloaded, this is not already the re-executed process, and this process is the
    `zreg` command itself. Call it before the command does anything (MLX may be imported, but
    nothing may have run): the same arguments, environment and working folder carry over.
    `model_bytes()` (called only when re-executing: it may read the store) gives the size of
    the model the command runs, which picks the BLAS threads' idle policy (`preload_env`);
    None means unknown, taken as real-size.
    """
    if os.environ.pop(_MARKER, None):
        lib = preloaded()
        if lib:
            print(f"note: MLX's CPU matmuls use {lib} (preloaded; MLX's bundled reference BLAS is "
                  f"~30x slower). ZREG_BLAS=bundled turns this off.", file=sys.stderr)
        return
    if not sys.platform.startswith("linux") or preloaded() or not _invoked_as_cli():
        return
    lib = fast_blas()
    if lib is None or bundled_reference_blas() is None:
        return
    size = model_bytes()
    env = preload_env(lib, small_model=size is not None and size < SMALL_MODEL_BYTES)
    env[_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # keep going with the slow BLAS rather than fail
