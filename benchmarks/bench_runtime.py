"""zreg generate vs diffusers' ZImagePipeline on the same random-weight model, in one run.

    python benchmarks/bench_runtime.py [--config mid|published-2] [--size 512x512] [--steps 4]
                                       [--reps 1] [--device cpu|gpu] [--workdir DIR]

The model is the embedded fixture's generator (zreg.fixtures.tiny_zimage) at a bigger config:
  mid          dim 1536, 8 layers (+2+2 refiner), 12 heads; Qwen3 1024 wide, 4 layers; the real VAE's
               widths (128/256/512/512, 2 layers per block). ~1.7 GB, float32 transformer, bf16 rest.
  published-2  the published Z-Image-Turbo layer shapes (dim 3840, 30 heads, Qwen3-4B widths, real
               VAE) with 2 main, 1+1 refiner and 2 text-encoder layers: for GPU runs (~5 GB).
It is written once into WORKDIR/<config>/fixture and imported with `zreg create` into
WORKDIR/<config>/store.

Each side runs as a fresh process through a small launcher (so its peak RSS is its own, see
benchmarks/bench_create.py), with the page cache warm for both:
  zreg       `zreg generate NAME PROMPT --size --steps --seed 0 -o ...` (the CLI, including its
             BLAS re-exec on Linux)
  diffusers  a script: import, `ZImagePipeline.from_pretrained(folder, dtype=float32)` (bf16 on
             CUDA), the same prompt, size and steps, save the PNG
Figures per side (median of --reps, the sides run alternately): seconds per denoising step (mean
of all steps, and of steps 2+), end-to-end wall seconds (process start to exit, PNG written),
command start to the first denoising step, peak RSS. zreg's line also gives its memory estimate
and MLX's measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from zreg.fixtures.tiny_zimage import TinyConfig, write_tiny_zimage

PROMPT = "a red fox sitting in the snow, golden hour, highly detailed photograph"

CONFIGS = {
    "mid": TinyConfig(dim=1536, n_layers=8, n_refiner_layers=2, n_heads=12, axes_dims=(32, 48, 48),
                      text_hidden_size=1024, text_layers=4, text_heads=8, text_kv_heads=4, text_head_dim=128,
                      text_intermediate_size=3072, vae_block_out_channels=(128, 256, 512, 512),
                      vae_layers_per_block=2, vae_norm_num_groups=32, transformer_shards=3,
                      text_encoder_shards=2, seed=7),
    "published-2": replace(TinyConfig.published(), n_layers=2, n_refiner_layers=1, text_layers=2,
                           transformer_shards=3, text_encoder_shards=2, seed=7),
}

# Forks and execs the command, timestamps every output line, reports wall time and the child's
# own peak RSS (os.wait4). A bare interpreter, so the child's ru_maxrss is not seeded by a big parent.
LAUNCHER = r"""
import json, os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
r, w = os.pipe()
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(w, 1); os.dup2(w, 2); os.close(r); os.close(w)
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
os.close(w)
lines = []
with os.fdopen(r, "rb", 0) as f:
    for line in iter(f.readline, b""):
        lines.append((time.perf_counter() - t0, line.decode(errors="replace").rstrip()))
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"wall": time.perf_counter() - t0, "maxrss_kb": ru.ru_maxrss,
               "rc": os.waitstatus_to_exitcode(status), "lines": lines}, f)
"""

DIFFUSERS = r"""
import sys, time
import torch
from diffusers import ZImagePipeline
folder, width, height, steps, out, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
dtype = torch.bfloat16 if device == "cuda" else torch.float32
pipe = ZImagePipeline.from_pretrained(folder, dtype=dtype).to(device)
pipe.set_progress_bar_config(disable=True)
forward, clock = pipe.transformer.forward, {}
def timed_forward(*a, **k):
    clock.setdefault("start", time.perf_counter())
    return forward(*a, **k)
pipe.transformer.forward = timed_forward
def on_step(p, i, t, kw):
    if device == "cuda":
        torch.cuda.synchronize()
    now = time.perf_counter()
    print(f"step {i + 1}/{steps}: {now - clock.get('last', clock['start']):.3f} s", flush=True)
    clock["last"] = now
    return kw
image = pipe(sys.argv[7], height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
             generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step).images[0]
image.save(out)
"""

STEP = re.compile(r"step (\d+)/(\d+): ([0-9.]+) s")


def run(argv, env=None) -> dict:
    fd, result = tempfile.mkstemp(prefix="zreg-bench-runtime-")
    os.close(fd)
    try:
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, result, *map(str, argv)], env=env, check=True)
        report = json.loads(Path(result).read_text())
    finally:
        os.unlink(result)
    if report["rc"] != 0:
        print("\n".join(line for _, line in report["lines"][-30:]), file=sys.stderr)
        raise SystemExit(f"error: {argv[0]} ... exited with {report['rc']}")
    steps = [(t, int(m.group(1)), float(m.group(3))) for t, line in report["lines"]
             if (m := STEP.search(line))]
    if not steps:
        raise SystemExit("error: no step lines in the output:\n" + "\n".join(x for _, x in report["lines"]))
    seconds = [s for _, _, s in steps]
    first_end, _, first = steps[0]
    report.update(step_s=seconds, first_step_at=first_end - first, mean_step=sum(seconds) / len(seconds),
                  mean_step_after_1=(sum(seconds[1:]) / len(seconds[1:])) if len(seconds) > 1 else seconds[0])
    return report


def warm(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "zreg-bench-runtime")
    ap.add_argument("--only", choices=["zreg", "diffusers"], help="run one side only")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))

    root = args.workdir / args.config
    folder, store = root / "fixture", root / "store"
    env = dict(os.environ, ZREG_MODELS=str(store))
    zreg = [str(Path(sys.executable).parent / "zreg")]
    if not (folder / "model_index.json").exists():
        print(f"writing the {args.config} model to {folder} ...", flush=True)
        write_tiny_zimage(folder, CONFIGS[args.config])
    if not list(store.glob("manifests/*/*/bench/*")):
        subprocess.run(zreg + ["create", folder, "-n", "bench"], env=env, check=True, stdout=subprocess.DEVNULL)
    warm(folder)
    warm(store)

    results: dict[str, list[dict]] = {"zreg": [], "diffusers": []}
    for rep in range(args.reps):
        out = root / f"out-{rep}"
        if args.only != "diffusers":
            results["zreg"].append(run(zreg + ["generate", "bench", PROMPT, "--size", args.size, "--steps",
                                               args.steps, "--seed", 0, "--device", args.device,
                                               "-o", f"{out}-zreg.png"], env))
        if args.only != "zreg":
            device = "cuda" if args.device == "gpu" else "cpu"
            results["diffusers"].append(run([sys.executable, "-c", DIFFUSERS, folder, width, height, args.steps,
                                             f"{out}-diffusers.png", device, PROMPT], env))

    figures = [("s/step, mean of all steps", "mean_step"), ("s/step, mean of steps 2+", "mean_step_after_1"),
               ("end to end, s", "wall"), ("command start -> step 1, s", "first_step_at"),
               ("peak RSS, MB", "maxrss_kb")]
    print(f"\n{args.config} model, {args.size}, {args.steps} steps, device {args.device}, median of {args.reps}")
    print(f"{'':30s} {'zreg':>10s} {'diffusers':>10s} {'zreg/diff':>10s}")
    for label, key in figures:
        mid = {side: statistics.median(r[key] for r in runs) for side, runs in results.items() if runs}
        if key == "maxrss_kb":
            mid = {side: v / 1000 for side, v in mid.items()}
        z, d = mid.get("zreg"), mid.get("diffusers")
        ratio = f"{z / d:10.2f}" if z is not None and d else f"{'-':>10s}"
        print(f"{label:30s} {z if z is not None else float('nan'):10.2f} "
              f"{d if d is not None else float('nan'):10.2f} {ratio}")
    for r in results["zreg"]:
        saved = [line for _, line in r["lines"] if line.startswith("saved ")]
        print("zreg:", saved[-1] if saved else "(no summary line)")
        print("zreg steps:", " ".join(f"{s:.2f}" for s in r["step_s"]))
    for r in results["diffusers"]:
        print("diffusers steps:", " ".join(f"{s:.2f}" for s in r["step_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
