"""Time `zreg create` on a synthetic Z-Image folder against a hash+copy floor.

    python benchmarks/bench_create.py [--folder DIR | --transformer-layers N --text-layers N | --full]
                                      [--reps 3] [--workdir DIR] [--create-cmd "..."] [--keep-folder]

Per repetition (medians reported):
  floor     `openssl sha256` over the folder's .safetensors files, then `cp` of them to a temp dir on the
            same filesystem; floor = hash seconds + copy seconds (any importer must read, hash and write
            every byte once). The `sync` after the copy is timed too and shown, but not in the floor.
  create    `zreg create FOLDER -n bench` as a child process into a fresh empty store (ZREG_MODELS),
            wall seconds and the child's peak RSS (os.wait4 rusage, ru_maxrss in KB on Linux, taken in
            a small launcher process; see LAUNCHER).
  recreate  the same command again into the same store (every blob already there).
The page cache is dropped before each timed step (needs root; the output says whether it worked), so
every step reads the source from disk the same way.

--create-cmd replaces the zreg command (for testing without zreg); {folder}, {store} and {name} in it are
substituted, and ZREG_MODELS points at the store either way. Exit 0 when every command succeeded.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_zimage  # noqa: E402

RATIO_TARGET = 1.3
RSS_TARGET_MB = 600


def drop_caches() -> bool:
    """sync, then drop clean pages so the next step reads from disk; False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# A tiny launcher process forks and execs the command and reports its wall time and rusage. Linux
# seeds a child's ru_maxrss with the RSS of the process it was forked from (the high-water mark is
# taken at exec), so forking straight from this process (~100 MB after generating data) would hide any
# child smaller than that; the launcher is a bare interpreter of ~10 MB (printed as the RSS baseline).
LAUNCHER = """
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(f"{time.perf_counter() - t0} {ru.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_timed(argv, cwd=None, env=None, log=None) -> tuple[float, int, int]:
    """Run argv as a child; return (wall seconds, peak RSS KB of it and its waited-for children, rc)."""
    fd, result = tempfile.mkstemp(prefix="zreg-bench-rusage-")
    os.close(fd)
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, result, *map(str, argv)],
                       cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
        seconds, maxrss, rc = open(result).read().split()
    finally:
        os.unlink(result)
        if log:
            out.close()
    return float(seconds), int(maxrss), int(rc)


def default_create_cmd() -> list[str]:
    """The venv's `zreg` console script if installed, else `python -m zreg.cli.main`."""
    script = Path(sys.executable).parent / "zreg"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "zreg.cli.main"]
    return head + ["create", "{folder}", "-n", "{name}"]


def tree_bytes(path: Path) -> tuple[int, int]:
    """(total file bytes, file count) under path."""
    total = count = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_size
            count += 1
    return total, count


def fail(msg: str, log: Path | None = None) -> None:
    print(f"error: {msg}", file=sys.stderr)
    if log and log.exists():
        print("--- last lines of the command's output ---", file=sys.stderr)
        print("\n".join(log.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr)
    raise SystemExit(1)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", help="reuse this diffusers folder instead of generating one (never deleted)")
    ap.add_argument("--transformer-layers", type=int)
    ap.add_argument("--text-layers", type=int)
    ap.add_argument("--full", action="store_true", help="generate the full-size folder (~33 GB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=tempfile.gettempdir(),
                    help="where temp dirs go; keep it on the folder's filesystem (default: %(default)s)")
    ap.add_argument("--create-cmd", help='replaces the zreg command, e.g. "python x.py {folder} {store}"')
    ap.add_argument("--name", default="bench")
    ap.add_argument("--keep-folder", action="store_true", help="keep the generated folder for --folder reuse")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="zreg-bench-", dir=args.workdir))
    generated = None
    try:
        # -- source folder --
        if args.folder:
            folder = Path(args.folder).resolve()
        else:
            folder = generated = work / "src"
            full = args.full
            tl = args.transformer_layers if args.transformer_layers is not None else (
                synthetic_zimage.N_LAYERS if full else synthetic_zimage.DEFAULT_TRANSFORMER_LAYERS)
            te = args.text_layers if args.text_layers is not None else (
                synthetic_zimage.TE_LAYERS if full else synthetic_zimage.DEFAULT_TEXT_LAYERS)
            print(f"generating synthetic Z-Image folder ({tl} transformer layers, {te} text layers) in {folder}")
            r = synthetic_zimage.build(folder, tl, te)
            print(f"  {r['bytes'] / 1e9:.2f} GB in {r['seconds']:.1f} s ({r['bytes'] / 1e6 / r['seconds']:.0f} MB/s)")
        files = sorted(p.relative_to(folder) for p in folder.rglob("*.safetensors"))
        if not files:
            fail(f"no .safetensors files under {folder}")
        src_bytes = sum((folder / f).stat().st_size for f in files)
        if os.stat(folder).st_dev != os.stat(work).st_dev:
            print(f"warning: {work} is on another filesystem than {folder}; the copy floor is not like-for-like")

        template = shlex.split(args.create_cmd) if args.create_cmd else default_create_cmd()
        dropped = drop_caches()
        print(f"source: {folder}  {len(files)} safetensors files, {src_bytes / 1e9:.3f} GB")
        print(f"create command: {' '.join(template)}")
        print(f"page cache drop before each step: {'yes' if dropped else 'NO (not root?): warm-cache numbers'}")
        _, base_rss, _ = run_timed(["true"])
        print(f"RSS baseline (`true` through the launcher; no child reads lower): {base_rss / 1024:.1f} MB")

        rows = []
        blob_ratio = blob_count = None
        for rep in range(1, args.reps + 1):
            row = {}
            # (a) floor: hash every byte, then copy every byte
            drop_caches()
            row["hash"], _, rc = run_timed(["openssl", "sha256", *map(str, files)], cwd=folder)
            if rc:
                fail("openssl sha256 failed")
            copy = work / "copy"
            copy.mkdir()
            drop_caches()
            row["cp"], _, rc = run_timed(["cp", "--parents", *map(str, files), str(copy)], cwd=folder)
            if rc:
                fail("cp failed")
            row["sync"], _, _ = run_timed(["sync"])
            shutil.rmtree(copy)
            row["floor"] = row["hash"] + row["cp"]

            # (b) create into a fresh store, then again into the same store
            store = work / f"store{rep}"
            store.mkdir()
            env = dict(os.environ, ZREG_MODELS=str(store))
            cmd = [a.format(folder=folder, store=store, name=args.name) for a in template]
            log = work / f"create{rep}.log"
            drop_caches()
            row["create"], rss, rc = run_timed(cmd, env=env, log=log)
            if rc:
                fail(f"create exited {rc}: {' '.join(cmd)}", log)
            row["rss"] = rss / 1024
            blobs = store / "blobs" if (store / "blobs").is_dir() else store
            size, blob_count = tree_bytes(blobs)
            blob_ratio = size / src_bytes
            drop_caches()
            row["recreate"], rss2, rc = run_timed(cmd, env=env, log=log)
            if rc:
                fail(f"second create exited {rc}: {' '.join(cmd)}", log)
            row["rss2"] = rss2 / 1024
            shutil.rmtree(store)                      # keeps disk use at source + one store
            rows.append(row)
            print(f"  rep {rep}: floor {row['floor']:.2f} s, create {row['create']:.2f} s, "
                  f"recreate {row['recreate']:.2f} s")

        # -- report --
        cols = ["hash", "cp", "floor", "sync", "create", "ratio", "MB/s", "rss", "recreate", "rss2"]
        head = ["hash s", "cp s", "floor s", "(sync s)", "create s", "create/floor", "create MB/s",
                "peak RSS MB", "recreate s", "recreate RSS MB"]
        for r in rows:
            r["ratio"] = r["create"] / r["floor"]
            r["MB/s"] = src_bytes / 1e6 / r["create"]
        med = {c: median([r[c] for r in rows]) for c in cols}
        print()
        print(f"bytes (source safetensors): {src_bytes}  ({src_bytes / 1e9:.3f} GB), reps: {len(rows)}")
        print("  ".join(f"{h:>12}" for h in ["", *head]))
        for i, r in enumerate(rows, 1):
            print("  ".join([f"{'rep ' + str(i):>12}", *(f"{r[c]:12.2f}" for c in cols)]))
        print("  ".join([f"{'median':>12}", *(f"{med[c]:12.2f}" for c in cols)]))
        print()
        print(f"blobs/ size / source bytes: {blob_ratio:.4f}  ({blob_count} files in blobs/)")
        print(f"create/floor {med['ratio']:.2f} (target <= {RATIO_TARGET}): "
              f"{'ok' if med['ratio'] <= RATIO_TARGET else 'MISSED'}")
        peak = max(r["rss"] for r in rows)
        print(f"peak RSS {peak:.0f} MB (target <= {RSS_TARGET_MB}): {'ok' if peak <= RSS_TARGET_MB else 'MISSED'}")
        print(f"page cache dropped before each step: {'yes' if dropped else 'no'}")
        if generated and args.keep_folder:
            print(f"kept the generated folder: {generated} (reuse with --folder)")
        return 0
    finally:
        if generated and args.keep_folder:
            # keep only the source folder; drop logs and stores
            for p in work.iterdir():
                if p != generated:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
