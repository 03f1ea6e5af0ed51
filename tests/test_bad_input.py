"""Every kind of bad input: a clear one-line error naming the file, a non-zero exit, no
manifest, and nothing already in the store changed."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from zreg.registry.errors import InvalidModel
from zreg.registry.importer import import_folder, scan_folder
from zreg.registry.names import parse_name

from .conftest import run_zreg
from .folders import make_model_folder, snapshot, write_raw_safetensors

SHARD1 = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
SHARD2 = "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"


def truncate(folder):
    path = folder / SHARD1
    path.write_bytes(path.read_bytes()[:-100])
    return SHARD1, "past the end"


def header_past_end(folder):
    path = folder / "vae/diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (10 ** 6).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return "vae/diffusion_pytorch_model.safetensors", "header length 1000000 runs past the end"


def overlapping(folder):
    write_raw_safetensors(folder / "vae/diffusion_pytorch_model.safetensors",
                          {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)
    return "vae/diffusion_pytorch_model.safetensors", "overlap"


def out_of_range(folder):
    write_raw_safetensors(folder / "vae/diffusion_pytorch_model.safetensors",
                          {"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, b"\0" * 24)
    return "vae/diffusion_pytorch_model.safetensors", "past the end"


def wrong_length(folder):
    write_raw_safetensors(folder / "vae/diffusion_pytorch_model.safetensors",
                          {"a": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 32]}}, b"\0" * 32)
    return "vae/diffusion_pytorch_model.safetensors", "needs 36"


def unknown_dtype(folder):
    write_raw_safetensors(folder / "vae/diffusion_pytorch_model.safetensors",
                          {"a": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4)
    return "vae/diffusion_pytorch_model.safetensors", "unknown dtype 'Q4_K'"


def duplicate_across_shards(folder):
    save_file({"x_pad_token": np.zeros((1, 64), np.float32),
               "layers.0.attention.to_q.weight": np.zeros((64, 64), np.float32)},
              folder / SHARD2)
    return SHARD2, "duplicate tensor name across shards"


def escaping_name(folder):
    write_raw_safetensors(folder / "vae/diffusion_pytorch_model.safetensors",
                          {"../../etc/passwd": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    return "vae/diffusion_pytorch_model.safetensors", "'../../etc/passwd' is not allowed"


def missing_shard(folder):
    (folder / SHARD2).unlink()
    return INDEX, "missing"


def index_misses_tensor(folder):
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"]["x_pad_token"]
    (folder / INDEX).write_text(json.dumps(index))
    return INDEX, "misses 1 tensor"


def index_wrong_shard(folder):
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["x_pad_token"] = SHARD1.split("/")[1]
    (folder / INDEX).write_text(json.dumps(index))
    return INDEX, "but it is in"


def index_lists_absent_tensor(folder):
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["ghost.weight"] = SHARD1.split("/")[1]
    (folder / INDEX).write_text(json.dumps(index))
    return INDEX, "no shard holds it"


def extra_shard(folder):
    save_file({"stray": np.zeros(2, np.float32)}, folder / "transformer/stray.safetensors")
    return INDEX, "not in the weight_map"


def bad_json_index(folder):
    (folder / "model_index.json").write_text("{not json")
    return "model_index.json", "not valid JSON"


def missing_component(folder):
    shutil.rmtree(folder / "vae")
    return "model_index.json", "folder vae/ is missing"


def not_a_model(folder):
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    (folder / "notes.txt").write_text("hi")
    return "", "not a model folder"


CASES = [truncate, header_past_end, overlapping, out_of_range, wrong_length, unknown_dtype,
         duplicate_across_shards, escaping_name, missing_shard, index_misses_tensor, index_wrong_shard,
         index_lists_absent_tensor, extra_shard, bad_json_index, missing_component, not_a_model]


@pytest.mark.parametrize("breaker", CASES, ids=lambda f: f.__name__)
def test_bad_input_is_refused_and_store_unchanged(store, tmp_path, breaker):
    good = make_model_folder(tmp_path / "good", seed=5)
    run_zreg("create", good, "-n", "existing", store=store)
    before = snapshot(store.root)
    folder = make_model_folder(tmp_path / "bad")
    rel, message = breaker(folder)
    proc = run_zreg("create", folder, "-n", "bad", store=store, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert str(folder / rel).rstrip("/") in lines[0] and message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert snapshot(store.root) == before
    assert not store.manifests.exists(parse_name("bad"))


def test_not_a_folder(store, tmp_path):
    proc = run_zreg("create", tmp_path / "nope", store=store, check=False)
    assert proc.returncode != 0 and "not a folder" in proc.stderr


def test_folder_vanishing_midway_leaves_no_manifest(store, tmp_path):
    folder = make_model_folder(tmp_path / "src")
    plan = scan_folder(folder)
    calls = []

    def vanish(nbytes):
        calls.append(nbytes)
        if len(calls) == 1:
            shutil.rmtree(folder)

    with pytest.raises(InvalidModel, match="vanished"):
        import_folder(store, plan, parse_name("gone"), on_bytes=vanish, workers=1)
    assert not store.manifests.exists(parse_name("gone"))
    assert list(store.blobs.temp_files()) == []
