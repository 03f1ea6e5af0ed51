import json
import subprocess
import tarfile

import pytest

from zreg.registry.names import parse_name
from zreg.registry.store import Store

from .conftest import run_zreg
from .folders import make_model_folder, snapshot


@pytest.fixture
def saved(store, tiny_zimage, tmp_path):
    run_zreg("create", tiny_zimage, "-n", "team/tiny:v1", store=store)
    return store


@pytest.mark.parametrize("suffix", [".tar", ".tar.zst"])
def test_save_then_load_gives_the_identical_model(saved, tmp_path, suffix):
    archive = tmp_path / f"model{suffix}"
    run_zreg("save", "team/tiny:v1", "-o", archive, store=saved)
    other = Store(tmp_path / "other")
    out = run_zreg("load", archive, store=other).stdout
    assert "loaded team/tiny:v1" in out
    assert other.resolve("team/tiny:v1")[2] == saved.resolve("team/tiny:v1")[2]
    assert "verify ok: 1 models" in run_zreg("verify", store=other).stdout
    # A second load finds every blob already there.
    out = run_zreg("load", archive, "-n", "copy", store=other).stdout
    assert "0 blobs stored" in out
    assert other.resolve("copy")[2] == saved.resolve("team/tiny:v1")[2]


def test_zst_is_smaller_and_saving_is_deterministic(saved, tmp_path):
    run_zreg("save", "team/tiny:v1", "-o", tmp_path / "a.tar", store=saved)
    run_zreg("save", "team/tiny:v1", "-o", tmp_path / "b.tar", store=saved)
    run_zreg("save", "team/tiny:v1", "-o", tmp_path / "a.tar.zst", store=saved)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert (tmp_path / "a.tar.zst").stat().st_size < (tmp_path / "a.tar").stat().st_size
    with tarfile.open(tmp_path / "a.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["oci-layout", "index.json"] and all(n.startswith("blobs/sha256/") for n in names[2:])


def test_skopeo_reads_the_archive(saved, tmp_path):
    archive = tmp_path / "model.tar"
    run_zreg("save", "team/tiny:v1", "-o", archive, store=saved)
    proc = subprocess.run(["skopeo", "inspect", "--raw", f"oci-archive:{archive}:v1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    proc = subprocess.run(["skopeo", "copy", f"oci-archive:{archive}:v1", f"oci:{tmp_path / 'layout'}:v1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_corrupt_archive_loads_nothing(saved, tmp_path):
    archive = tmp_path / "model.tar"
    run_zreg("save", "team/tiny:v1", "-o", archive, store=saved)
    data = bytearray(archive.read_bytes())
    # Flip a byte inside the largest blob's data.
    with tarfile.open(archive) as tar:
        member = max(tar.getmembers(), key=lambda m: m.size)
    data[member.offset_data + member.size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    other = Store(tmp_path / "other")
    run_zreg("create", make_model_folder(tmp_path / "x"), "-n", "existing", store=other)
    before = snapshot(other.root)
    proc = run_zreg("load", archive, store=other, check=False)
    assert proc.returncode != 0 and "is corrupt" in proc.stderr and member.name.split("/")[-1] in proc.stderr
    assert not other.manifests.exists(parse_name("team/tiny:v1"))
    assert "verify ok" in run_zreg("verify", store=other).stdout
    assert {k: v for k, v in snapshot(other.root).items() if not k.startswith("blobs/sha256-")} == \
        {k: v for k, v in before.items() if not k.startswith("blobs/sha256-")}


def test_load_of_a_missing_or_foreign_file(store, tmp_path):
    proc = run_zreg("load", tmp_path / "nope.tar", store=store, check=False)
    assert proc.returncode != 0 and "no such archive" in proc.stderr
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    proc = run_zreg("load", tmp_path / "junk.tar", store=store, check=False)
    assert proc.returncode != 0 and "junk.tar" in proc.stderr and "Traceback" not in proc.stderr
