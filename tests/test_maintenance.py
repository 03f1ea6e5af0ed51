import json

import pytest

from zreg.registry.maintenance import collect_garbage, verify_store
from zreg.registry.names import parse_name
from zreg.registry.tensorblob import blob_header

from .conftest import run_zreg
from .folders import make_model_folder, snapshot


@pytest.fixture
def two_models(store, tmp_path):
    a = make_model_folder(tmp_path / "a", seed=1, text_encoder_seed=7)
    b = make_model_folder(tmp_path / "b", seed=2, text_encoder_seed=7)
    run_zreg("create", a, "-n", "a", store=store)
    run_zreg("create", b, "-n", "b", store=store)
    return store


def test_gc_never_deletes_a_referenced_blob(two_models):
    store = two_models
    orphan, _ = store.blobs.put_bytes(b"nobody references me")
    stale = store.blobs.dir / ".tmp-999-dead"
    stale.write_bytes(b"half a blob")
    live = store.blobs.writer()  # a writer still running holds its temp file's lock
    live.write(b"in progress")
    referenced = {d: store.blobs.path(d).read_bytes()
                  for name in ("a", "b") for d in store.resolve(name)[1].blob_digests()}
    try:
        result = collect_garbage(store, temp_min_age=0)
        assert (result.blobs, result.temps) == (1, 1)
        assert not store.blobs.has(orphan) and not stale.exists()
        assert live.temp.exists()
    finally:
        live.abort()
    assert {d: store.blobs.path(d).read_bytes() for d in referenced} == referenced
    assert verify_store(store).problems == []
    assert collect_garbage(store).blobs == 0


def test_gc_refuses_when_a_manifest_is_unreadable(two_models):
    store = two_models
    store.manifests.path(parse_name("b")).write_text("{broken")
    before = snapshot(store.root)
    proc = run_zreg("gc", store=store, check=False)
    assert proc.returncode != 0 and "refusing to delete" in proc.stderr
    assert snapshot(store.root) == before


def test_rm_frees_only_unshared_blobs(two_models):
    store = two_models
    _, ma, _ = store.resolve("a")
    _, mb, _ = store.resolve("b")
    out = run_zreg("rm", "a", store=store).stdout
    only_a = ma.blob_digests() - mb.blob_digests()
    assert f"({len(only_a)} blobs" in out
    assert all(not store.blobs.has(d) for d in only_a)
    assert all(store.blobs.has(d) for d in mb.blob_digests())
    assert verify_store(store).problems == []
    assert run_zreg("rm", "a", store=store, check=False).returncode != 0


def test_cp_copies_the_manifest_byte_for_byte(two_models):
    store = two_models
    run_zreg("cp", "a", "team/a-copy:v2", store=store)
    assert store.resolve("team/a-copy:v2")[2] == store.resolve("a")[2]
    assert "team/a-copy:v2" in run_zreg("list", store=store).stdout
    proc = run_zreg("cp", "a", "Bad Name", store=store, check=False)
    assert proc.returncode != 0 and "invalid model name" in proc.stderr


def test_verify_catches_a_flipped_byte(two_models):
    store = two_models
    layer = store.resolve("a")[1].tensor_layers()[0]
    path = store.blobs.path(layer.digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    proc = run_zreg("verify", "a", store=store, check=False)
    assert proc.returncode == 1
    assert f"blob {layer.digest}: content hashes to" in proc.stderr


def test_verify_catches_a_missing_blob_and_a_wrong_header(two_models):
    store = two_models
    _, manifest, _ = store.resolve("b")
    missing = manifest.tensor_layers()[0]
    store.blobs.path(missing.digest).unlink()
    # A blob whose header disagrees with its layer: rewrite the manifest to claim another shape.
    other = manifest.tensor_layers()[1]
    raw = json.loads(store.manifests.path(parse_name("b")).read_bytes())
    for layer in raw["layers"]:
        if layer["name"] == other.name:
            layer["shape"] = [999]
    store.manifests.write_bytes(parse_name("b"), json.dumps(raw).encode())
    proc = run_zreg("verify", store=store, check=False)
    assert proc.returncode == 1
    assert f"blob {missing.digest} is missing" in proc.stderr
    assert f"layer {other.name}: blob shape" in proc.stderr
    assert "verify FAILED" in proc.stdout


def test_verify_whole_store_hashes_unreferenced_blobs_too(two_models):
    store = two_models
    digest, _ = store.blobs.put_bytes(blob_header("U8", (3,)) + b"abc")
    path = store.blobs.path(digest)
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    assert any(digest in p for p in verify_store(store).problems)
    assert verify_store(store, [parse_name("a")]).problems == []


def test_verify_clean_store(two_models):
    out = run_zreg("verify", store=two_models).stdout
    assert "verify ok: 2 models" in out


def test_unknown_model_errors(store):
    for args in (["show", "nope"], ["rm", "nope"], ["verify", "nope"], ["export", "nope", "/tmp/x-never"]):
        proc = run_zreg(*args, store=store, check=False)
        assert proc.returncode != 0 and "'nope:latest' not found" in proc.stderr, args


def test_gc_removes_abandoned_partial_downloads_but_not_live_ones(two_models):
    import fcntl

    store = two_models
    digest = "sha256:" + "ab" * 32
    dead = store.layout.partial(digest)
    dead.write_bytes(b"half a download")
    live = store.layout.partial("sha256:" + "cd" * 32)
    live.write_bytes(b"being downloaded")
    with open(live, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        assert collect_garbage(store, temp_min_age=0).temps == 1
        assert live.exists() and not dead.exists()
