"""Push and pull over loopback against the CNCF registry, against a curl + OpenSSL floor.

    python benchmarks/bench_transfer.py [--transformer-layers N --text-layers N] [--reps 2]
                                        [--concurrency 8]

Setup: a synthetic Z-Image folder with real tensor shapes (synthetic_zimage.py) is imported
with `zreg create` (the folder is then deleted); two fresh `docker-registry` instances on free
loopback ports (one for the floor, one for zreg), each on its own data folder.

Per repetition (medians reported; page cache dropped before each step when possible):
  push floor  every blob uploaded by parallel `curl` (POST for a session, then one PUT with
              ?digest=), the same concurrency as zreg, into a fresh repository
  zreg push   `zreg push` of the model into a fresh repository of the other registry
  pull floor  every blob fetched by parallel `curl` to files, then `openssl sha256` over them
  zreg pull   `zreg pull` into an empty store
  re-push / re-pull of the unchanged model (target < 2 s)
Ratio = floor seconds / zreg seconds (target >= 0.8, i.e. zreg within 1.25x of the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_create  # noqa: E402
import synthetic_zimage as syn  # noqa: E402
from tests.peers import cncf_registry  # noqa: E402

from zreg.registry.store import Store  # noqa: E402

TARGET_RATIO = 0.8


def zreg(*args) -> list[str]:
    """The zreg command line (the create template minus its create arguments)."""
    return [*bench_create.default_create_cmd()[:-4], *args]


def timed(argv, store: Path | None = None, cwd=None) -> tuple[float, int]:
    env = dict(os.environ)
    if store is not None:
        env["ZREG_MODELS"] = str(store)
    seconds, maxrss, rc = bench_create.run_timed(argv, cwd=cwd, env=env)
    if rc:
        raise SystemExit(f"{' '.join(map(str, argv))} failed with {rc}")
    return seconds, maxrss


def parallel(commands: list[str], concurrency: int) -> float:
    """Run shell commands `concurrency` at a time; wall seconds."""
    script = "\n".join(commands)
    start = time.perf_counter()
    subprocess.run(["xargs", "-P", str(concurrency), "-d", "\n", "-I", "{}", "sh", "-c", "{}"],
                   input=script, text=True, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def curl_push(host: str, repo: str, blobs: list[tuple[str, int, Path]], concurrency: int) -> float:
    cmds = []
    for digest, _, path in blobs:
        cmds.append(
            f"loc=$(curl -sf -D - -o /dev/null -X POST http://{host}/v2/{repo}/blobs/uploads/ "
            f"| tr -d '\\r' | sed -n 's/^[Ll]ocation: //p'); "
            f"case $loc in http*) ;; *) loc=http://{host}$loc;; esac; "
            f"curl -sf -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' "
            f"--data-binary @{path} \"$loc&digest={digest}\"")
    return parallel(cmds, concurrency)


def curl_pull(host: str, repo: str, blobs: list[tuple[str, int, Path]], out: Path, concurrency: int) -> float:
    out.mkdir(parents=True)
    cmds = [f"curl -sf -o {out / digest[7:]} http://{host}/v2/{repo}/blobs/{digest}" for digest, _, _ in blobs]
    seconds = parallel(cmds, concurrency)
    start = time.perf_counter()
    files = sorted(p.name for p in out.iterdir())
    result = subprocess.run(["openssl", "sha256", "-r", *files], cwd=out, capture_output=True, text=True, check=True)
    bad = [line for line in result.stdout.splitlines() if line.split()[1].lstrip("*") != line.split()[0]]
    if bad:
        raise SystemExit(f"floor pull fetched corrupt blobs: {bad[:2]}")
    return seconds + time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transformer-layers", type=int, default=syn.DEFAULT_TRANSFORMER_LAYERS)
    ap.add_argument("--text-layers", type=int, default=syn.DEFAULT_TEXT_LAYERS)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="zreg-bench-t-", dir="/tmp"))
    try:
        folder = work / "src"
        syn.build(folder, args.transformer_layers, args.text_layers)
        store = work / "store"
        timed(zreg("create", str(folder), "-n", "bench"), store=store)
        shutil.rmtree(folder)
        _, manifest, _ = Store(store).resolve("bench")
        descs = list({d.digest: d for d in [manifest.config, *manifest.layers]}.values())
        blobs = [(d.digest, d.size, Store(store).blobs.path(d.digest)) for d in descs]
        total = sum(size for _, size, _ in blobs)
        print(f"model: {len(blobs)} blobs, {total / 1e9:.2f} GB; concurrency {args.concurrency}; "
              f"page cache dropped: {'yes' if bench_create.drop_caches() else 'no'}")
        rows = []
        with cncf_registry(work) as floor_host, cncf_registry(work) as zreg_host:
            for rep in range(args.reps):
                row = {}
                bench_create.drop_caches()
                row["push floor"] = curl_push(floor_host, f"floor/r{rep}", blobs, args.concurrency)
                name = f"{zreg_host}/zreg/r{rep}:latest"
                timed([*zreg("cp", "bench", name)], store=store)
                bench_create.drop_caches()
                row["zreg push"], row["push rss"] = timed([*zreg("push", "--concurrency", str(args.concurrency),
                                                                 name)], store=store)
                row["re-push"], _ = timed([*zreg("push", name)], store=store)
                bench_create.drop_caches()
                row["pull floor"] = curl_pull(zreg_host, f"zreg/r{rep}", blobs, work / f"floor-{rep}",
                                              args.concurrency)
                shutil.rmtree(work / f"floor-{rep}")
                pulled = work / f"pulled-{rep}"
                bench_create.drop_caches()
                row["zreg pull"], row["pull rss"] = timed([*zreg("pull", "--concurrency", str(args.concurrency),
                                                                 name)], store=pulled)
                row["re-pull"], _ = timed([*zreg("pull", name)], store=pulled)
                shutil.rmtree(pulled)
                # Forget this rep's name, or the next push would mount every blob from it.
                timed([*zreg("rm", "--keep-blobs", name)], store=store)
                rows.append(row)
                print(json.dumps({k: round(v, 2) for k, v in row.items()}))
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for op in ("push", "pull"):
            ratio = med[f"{op} floor"] / med[f"zreg {op}"]
            print(f"{op}: zreg {med[f'zreg {op}']:.2f} s ({total / med[f'zreg {op}'] / 1e6:.0f} MB/s), floor "
                  f"{med[f'{op} floor']:.2f} s ({total / med[f'{op} floor'] / 1e6:.0f} MB/s), ratio {ratio:.2f} "
                  f"(target >= {TARGET_RATIO}); re-{op} {med[f're-{op}']:.2f} s (target < 2); "
                  f"peak RSS {med[f'{op} rss'] / 1024:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
