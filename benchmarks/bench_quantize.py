"""fp8 quantization: size, quality and speed (numbers for the closing note, not a test).

    python benchmarks/bench_quantize.py [--folder DIR] [--reps 3] [--skip-speed]

1. Size: the real Z-Image-Turbo tensor list (benchmarks/synthetic_zimage.py) through the fp8
   policy: source bytes, fp8 bytes, ratio, projected full-model size.
2. Quality: realistic weights (Student-t, df 5, heavy tails) in real layer shapes: per-tensor
   relative RMS error and the cosine similarity of x @ W.T against the unquantized product.
3. Policy: the diffusers Z-Image transformer (tiny fixture, variant config) run with weights
   replaced by their fp8 round trip, for the default policy and for quantizing every linear
   (adaLN, t_embedder, embedders, final layer too): relative error of the output.
4. Speed: `zreg create --quantize fp8` vs plain `zreg create` of the same synthetic folder, in the
   same run, alternating, fresh store each time (page cache dropped when possible); peak RSS.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_create  # noqa: E402
import synthetic_zimage as syn  # noqa: E402

from zreg.registry.quantize import GROUP, Policy, decode_mxfp8, encode_mxfp8  # noqa: E402
from zreg.registry.tensorblob import blob_header  # noqa: E402

SPEED_TARGET = 1.5


def projected_sizes() -> None:
    policy = Policy("fp8")
    parts = [("transformer", "F32", syn.transformer_tensors()), ("text_encoder", "BF16", syn.text_encoder_tensors()),
             ("vae", "BF16", syn.vae_tensors())]
    src = fp8 = quantized = 0
    print("1. size (real Z-Image-Turbo shapes, per-tensor blobs with headers)")
    for comp, dtype, tensors in parts:
        c_src = c_fp8 = 0
        for name, shape in tensors:
            n = math.prod(shape)
            blob = len(blob_header(dtype, shape)) + n * syn.DTYPE_SIZE[dtype]
            c_src += blob
            if policy.action(f"{comp}/{name}", dtype, shape) == "fp8":
                quantized += 1
                c_fp8 += len(blob_header("F8_E4M3", shape)) + n
                c_fp8 += len(blob_header("F8_E8M0", (shape[0], shape[1] // GROUP))) + n // GROUP
            else:
                c_fp8 += blob
        print(f"   {comp:13s} source {c_src / 1e9:6.2f} GB   fp8 {c_fp8 / 1e9:6.2f} GB   ratio {c_fp8 / c_src:.3f}")
        src += c_src
        fp8 += c_fp8
    print(f"   {'whole model':13s} source {src / 1e9:6.2f} GB   fp8 {fp8 / 1e9:6.2f} GB   ratio {fp8 / src:.3f}"
          f"   ({quantized} tensors quantized; target <= 12 GB)")


def quality(rng) -> None:
    shapes = [("transformer attention", (3840, 3840)), ("transformer ffn w1/w3", (10240, 3840)),
              ("transformer ffn w2", (3840, 10240)), ("text q_proj", (4096, 2560)), ("text k/v", (1024, 2560)),
              ("text o_proj", (2560, 4096)), ("text mlp up/gate", (9728, 2560)), ("text mlp down", (2560, 9728))]
    rel, cos = [], []
    print("2. quality (Student-t df 5 weights, 512 sampled rows per shape, x ~ N(0,1), 64 tokens)")
    for label, (rows, cols) in shapes:
        for _ in range(3):
            w = (rng.standard_t(5, (512, cols)) * 0.02).astype(np.float32)
            back = decode_mxfp8(*encode_mxfp8(w))
            rel.append(float(np.linalg.norm(back - w) / np.linalg.norm(w)))
            x = rng.standard_normal((64, cols)).astype(np.float32)
            y, y_ref = x @ back.T, x @ w.T
            cos.append(float((y * y_ref).sum() / (np.linalg.norm(y) * np.linalg.norm(y_ref))))
        print(f"   {label:24s} [{rows}x{cols}] rel RMS {np.median(rel[-3:]):.4f}  cos {min(cos[-3:]):.6f}")
    q = np.quantile(rel, [0, 0.5, 1])
    print(f"   relative RMS error: min {q[0]:.4f} median {q[1]:.4f} max {q[2]:.4f}; "
          f"worst output cosine {min(cos):.6f} (bound >= 0.999)")


def policy_effect() -> None:
    import torch
    from diffusers import ZImageTransformer2DModel

    from zreg.fixtures.tiny_zimage import TinyConfig, write_tiny_zimage

    print("3. policy (diffusers transformer, fixture variant config: dim 288, 3 heads; 64x64, 16 caption tokens)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_zimage(Path(tmp) / "tiny", TinyConfig.variant())
        model = ZImageTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 1, 8, 8, generator=g)]
    cap = [torch.randn(16, model.config.cap_feat_dim, generator=g)]

    def run(policy: Policy | None) -> torch.Tensor:
        state = {}
        for key, value in original.items():
            action = policy.action(f"transformer/{key}", "F32", tuple(value.shape)) if policy else None
            if action == "fp8":
                e, s = encode_mxfp8(value.numpy())
                value = torch.from_numpy(decode_mxfp8(e, s))
            state[key] = value
        model.load_state_dict(state)
        outs = []
        with torch.no_grad():
            for t in (0.1, 0.5, 0.9):
                outs.append(model(x, torch.tensor([t]), cap, return_dict=False)[0][0])
        return torch.cat([o.flatten() for o in outs])

    ref = run(None)
    for label, policy in (("default skip list", Policy("fp8")),
                          ("every linear (adaLN, embedders, final too)", Policy("fp8", ("*norm*", "*.bias", "*pad_token*")))):
        out = run(policy)
        err = float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref))
        print(f"   {label:44s} output rel error {err:.4f}")


def speed(folder: Path, reps: int) -> None:
    cmd = bench_create.default_create_cmd()
    work = Path(tempfile.mkdtemp(prefix="zreg-bench-q-", dir=folder.parent))
    times = {"plain": [], "fp8": []}
    rss = {"plain": [], "fp8": []}
    sizes = {}
    dropped = False
    try:
        for rep in range(reps):
            for label, extra in (("plain", []), ("fp8", ["--quantize", "fp8"])):
                store = work / f"store-{label}-{rep}"
                argv = [a.format(folder=folder, name="bench") for a in cmd] + extra
                dropped = bench_create.drop_caches()
                seconds, maxrss, rc = bench_create.run_timed(argv, env={**os.environ, "ZREG_MODELS": str(store)})
                if rc:
                    raise SystemExit(f"{' '.join(argv)} failed with {rc}")
                times[label].append(seconds)
                rss[label].append(maxrss / 1024)
                sizes[label] = bench_create.tree_bytes(store / "blobs")[0]
                shutil.rmtree(store)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain, fp8 = statistics.median(times["plain"]), statistics.median(times["fp8"])
    print(f"4. speed ({bench_create.tree_bytes(folder)[0] / 1e9:.2f} GB synthetic folder, {reps} reps, medians, "
          f"page cache dropped: {'yes' if dropped else 'no'})")
    print(f"   create {plain:.2f} s   create --quantize fp8 {fp8:.2f} s   ratio {fp8 / plain:.2f} "
          f"(target <= {SPEED_TARGET})")
    print(f"   peak RSS: create {max(rss['plain']):.0f} MB, create --quantize {max(rss['fp8']):.0f} MB")
    print(f"   stored bytes: plain {sizes['plain'] / 1e9:.2f} GB, fp8 {sizes['fp8'] / 1e9:.2f} GB, "
          f"ratio {sizes['fp8'] / sizes['plain']:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, help="reuse a synthetic folder (see synthetic_zimage.py)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args(argv)
    projected_sizes()
    quality(np.random.default_rng(0))
    policy_effect()
    if args.skip_speed:
        return 0
    if args.folder:
        speed(args.folder, args.reps)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="zreg-bench-src-", dir="/tmp"))
    try:
        folder = tmp / "Z-Image-Turbo"
        syn.build(folder)
        speed(folder, args.reps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
