"""The image API under load: requests per minute and p50/p95 latency at 1, 4 and 16 concurrent
clients, and the server's overhead over a direct in-process generate of the same request.

    python benchmarks/bench_api.py [--size 64x64] [--steps 8] [--requests 24]

A `zreg serve` subprocess on a free loopback port serves the embedded tiny model from a temp
store (its queue sized so no request is refused) for the load figures. The overhead figure is
measured in this process after that server has stopped: see `overhead`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.peers import free_port, wait_ready  # noqa: E402

from zreg.fixtures.tiny_zimage import write_tiny_zimage  # noqa: E402


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def load(url: str, body: dict, clients: int, total: int) -> dict:
    latencies, failures = [], []
    lock = threading.Lock()
    todo = iter(range(total))

    def client():
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            start = time.perf_counter()
            resp = requests.post(url, json=body, timeout=600)
            with lock:
                (latencies if resp.status_code == 200 else failures).append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"rpm": len(latencies) / wall * 60, "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
            "ok": len(latencies), "refused": len(failures)}


def overhead(models: str, body: dict, size: str, reps: int) -> None:
    """Served vs direct, in this one process, alternating: the served request goes over loopback
    HTTP to `zreg serve`'s own app (registry routes + image API, on a BackgroundServer thread);
    the direct one calls the runtime on another loaded copy of the model. Alternating and one
    process cancel the drift and the process-to-process spread this VM shows (+-10%), which a
    separate server process would add to the figure."""
    from zreg.registry.server import BackgroundServer, make_app
    from zreg.registry.store import Store
    from zreg.runtime.api import ImageStore, add_image_routes
    from zreg.runtime.backend import select
    from zreg.runtime.png import encode_png, generation_text
    from zreg.runtime.service import ModelService, open_pipeline
    from zreg.runtime.zimage.pipeline import Request

    width, height = map(int, size.split("x"))
    body = dict(body, size=size)
    store, backend = Store(models), select("cpu")
    pipeline = open_pipeline(store, "tiny", backend)
    request = Request(prompt=body["prompt"], width=width, height=height, steps=body["steps"], seed=body["seed"])
    app = make_app(store)
    with tempfile.TemporaryDirectory() as images:
        add_image_routes(app, ModelService(store, backend, max_queue=4), ImageStore(Path(images), 60))
        with BackgroundServer(app) as server, requests.Session() as session:
            url = server.url + "/v1/images/generations"
            served, plain, with_png = [], [], []
            for rep in range(reps + 2):  # two warm-up rounds
                start = time.perf_counter()
                session.post(url, json=body, timeout=600).raise_for_status()
                t_served = time.perf_counter() - start
                start = time.perf_counter()
                result = pipeline.generate(request)
                t_plain = time.perf_counter() - start
                encode_png(result.image, generation_text(result, "tiny", "sha256:x"))
                t_png = time.perf_counter() - start
                if rep >= 2:
                    served.append(t_served), plain.append(t_plain), with_png.append(t_png)
    s, d, dp = (statistics.median(v) for v in (served, plain, with_png))
    print(f"  {size}: served p50 {s * 1e3:.1f} ms; direct generate {d * 1e3:.1f} ms, +PNG {dp * 1e3:.1f} ms; "
          f"overhead {100 * (s / d - 1):.1f}% over generate, {100 * (s / dp - 1):.1f}% over generate+PNG "
          f"(target < 5%; {reps} alternating pairs)")


def same_blas_as_the_cli() -> None:
    """Re-run this script with the BLAS and BLAS-thread settings `zreg serve` picks for a store of
    tiny models, so the direct figure and the server multiply the same way."""
    from zreg.runtime import blas

    lib = blas.fast_blas()
    if lib and blas.bundled_reference_blas() and not blas.preloaded():
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], blas.preload_env(lib, small_model=True))


def main(argv=None) -> int:
    same_blas_as_the_cli()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--overhead-sizes", default="64x64,256x256,512x512",
                    help="sizes for the served-vs-direct comparison (comma-separated)")
    args = ap.parse_args(argv)
    body = {"model": "tiny", "prompt": "a lighthouse at dusk", "size": args.size, "steps": args.steps, "seed": 1}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, ZREG_MODELS=str(Path(tmp) / "models"))
        folder = write_tiny_zimage(Path(tmp) / "tiny")
        zreg = [sys.executable, "-m", "zreg.cli.main"]
        subprocess.run([*zreg, "create", str(folder), "-n", "tiny"], env=env, check=True, capture_output=True)
        port = free_port()
        server = subprocess.Popen([*zreg, "serve", "--addr", f"127.0.0.1:{port}", "--max-queue", "64",
                                   "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"http://127.0.0.1:{port}/v2/", timeout=60, proc=server)
            url = f"http://127.0.0.1:{port}/v1/images/generations"
            for _ in range(3):  # warm up: load the model, fill the page cache
                requests.post(url, json=body, timeout=600).raise_for_status()
            from zreg.runtime import blas
            print(f"tiny fixture, {args.size}, {args.steps} steps, {args.requests} requests per level, CPU, "
                  f"BLAS: {blas.status()}")
            rows = {}
            for clients in (1, 4, 16):
                rows[clients] = load(url, body, clients, args.requests)
                r = rows[clients]
                print(f"  {clients:2d} clients: {r['rpm']:7.1f} requests/min  p50 {r['p50']:.3f} s  "
                      f"p95 {r['p95']:.3f} s  ({r['ok']} ok, {r['refused']} refused)")
        finally:
            server.terminate()
            server.wait(timeout=30)
        for size in args.overhead_sizes.split(","):
            overhead(env["ZREG_MODELS"], body, size, args.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
