import os
import signal
import subprocess
import sys
import time

from zreg.registry.maintenance import collect_garbage, verify_store
from zreg.registry.names import parse_name

from .conftest import run_zreg
from .folders import make_big_folder, make_model_folder


def start_create(folder, name, store):
    env = dict(os.environ, ZREG_MODELS=str(store.root))
    return subprocess.Popen([sys.executable, "-m", "zreg.cli.main", "create", str(folder), "-n", name],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_creates_do_not_corrupt_each_other(store, tmp_path):
    a = make_model_folder(tmp_path / "a", seed=1, text_encoder_seed=3)
    b = make_model_folder(tmp_path / "b", seed=2, text_encoder_seed=3)
    big = make_big_folder(tmp_path / "big", tensors=8, mib_each=4)
    procs = [start_create(a, "a", store), start_create(b, "b", store), start_create(a, "a2", store),
             start_create(big, "big", store), start_create(big, "big2", store)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    report = verify_store(store)
    assert report.problems == [] and report.models == 5
    assert store.resolve("a")[2] == store.resolve("a2")[2]
    assert store.resolve("big")[2] == store.resolve("big2")[2]
    assert list(store.blobs.temp_files()) == []


def test_kill_9_mid_create_then_verify_is_clean_and_rerun_completes(store, tmp_path):
    big = make_big_folder(tmp_path / "big")
    proc = start_create(big, "big", store)
    deadline = time.monotonic() + 60
    # Wait until some blobs are stored and another is being written, then kill hard.
    while time.monotonic() < deadline and proc.poll() is None:
        if store.blobs.dir.exists() and len(list(store.blobs.digests())) >= 2 and list(store.blobs.temp_files()):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "create finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not store.manifests.exists(parse_name("big"))
    assert verify_store(store).problems == []          # partial blobs are never visible as blobs
    assert list(store.blobs.temp_files())              # the interrupted temp file is still there
    run_zreg("create", big, "-n", "big", store=store)
    assert "verify ok: 1 models" in run_zreg("verify", store=store).stdout
    assert collect_garbage(store, temp_min_age=0).temps >= 1
    assert list(store.blobs.temp_files()) == []
    assert verify_store(store).problems == []
