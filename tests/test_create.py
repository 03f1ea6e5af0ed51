import json
import shutil
import subprocess

import numpy as np
from safetensors import safe_open

from zreg.registry.importer import import_folder, scan_folder
from zreg.registry.manifest import Manifest
from zreg.registry.names import parse_name
from zreg.registry.store import Store

from .conftest import run_zreg
from .folders import make_model_folder, safetensors_tensors


def source_tensors(folder):
    """Tensors keyed by layer name (`component/tensor`)."""
    return {f"{key.split('/')[0]}/{key.split(':', 1)[1]}": value
            for key, value in safetensors_tensors(folder).items()}


def test_every_tensor_round_trips_byte_identical(store, model_folder):
    run_zreg("create", model_folder, "-n", "m", store=store)
    _, manifest, _ = store.resolve("m")
    source = source_tensors(model_folder)
    tensors = manifest.tensor_layers()
    assert sorted(layer.name for layer in tensors) == sorted(source)
    for layer in tensors:
        path = store.blobs.path(layer.digest)
        with safe_open(str(path), framework="numpy") as f:
            assert list(f.keys()) == ["data"]
            blob = f.get_tensor("data")
        expected = source[layer.name]
        assert blob.dtype == expected.dtype and blob.tobytes() == expected.tobytes()
        assert layer.shape == list(expected.shape)
        assert layer.dtype == {"float32": "F32", "float16": "F16"}[str(expected.dtype)]


def test_manifest_lists_files_and_config(store, model_folder):
    run_zreg("create", model_folder, "-n", "m", store=store)
    _, manifest, _ = store.resolve("m")
    files = {layer.name: layer.mediaType for layer in manifest.layers if not layer.is_tensor}
    assert files == {
        "model_index.json": "application/vnd.ollama.image.json",
        "scheduler/scheduler_config.json": "application/vnd.ollama.image.json",
        "text_encoder/config.json": "application/vnd.ollama.image.json",
        "text_encoder/generation_config.json": "application/vnd.ollama.image.json",
        "tokenizer/chat_template.jinja": "application/vnd.zreg.image.file",
        "tokenizer/merges.txt": "application/vnd.zreg.image.file",
        "tokenizer/tokenizer.json": "application/vnd.ollama.image.json",
        "transformer/config.json": "application/vnd.ollama.image.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json": "application/vnd.ollama.image.json",
        "vae/config.json": "application/vnd.ollama.image.json",
    }
    for layer in manifest.layers:
        if not layer.is_tensor:
            assert store.blobs.path(layer.digest).read_bytes() == (model_folder / layer.name).read_bytes()
    assert manifest.schemaVersion == 2
    assert manifest.mediaType == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest.config.mediaType == "application/vnd.docker.container.image.v1+json"
    config = store.config(manifest)
    assert config.architecture == "ZImagePipeline" and config.capabilities == ["image"]
    assert config.components["transformer"].dtype == "F32"
    assert config.components["text_encoder"].dtype == "F16"
    assert config.components["transformer"].class_name == "ZImageTransformer2DModel"
    assert config.parameter_count == sum(int(np.prod(a.shape)) for a in source_tensors(model_folder).values())


def test_same_folder_same_digest(tmp_path, model_folder):
    digests = set()
    for i in range(2):
        store = Store(tmp_path / f"store{i}")
        result = import_folder(store, scan_folder(model_folder), parse_name("m"))
        digests.add(result.digest)
    # A copy of the folder elsewhere, files written in another order, gives the same manifest.
    copy = tmp_path / "copy"
    shutil.copytree(model_folder, copy)
    result = import_folder(Store(tmp_path / "store2"), scan_folder(copy), parse_name("other"))
    digests.add(result.digest)
    assert len(digests) == 1
    _, manifest, data = Store(tmp_path / "store0").resolve("m")
    names = [layer.name for layer in manifest.layers]
    assert names == sorted(names)
    assert Manifest.from_bytes(data, "m").to_bytes() == data


def blobs_du(store) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", "--apparent-size", str(store.layout.blobs)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_dedup_second_model_adds_only_new_blobs(store, tmp_path):
    a = make_model_folder(tmp_path / "a", seed=1, text_encoder_seed=7)
    b = make_model_folder(tmp_path / "b", seed=2, text_encoder_seed=7)  # same text encoder
    run_zreg("create", a, "-n", "a", store=store)
    count_a, du_a = len(list(store.blobs.digests())), blobs_du(store)
    out = run_zreg("create", b, "-n", "b", store=store).stdout
    _, ma, _ = store.resolve("a")
    _, mb, _ = store.resolve("b")
    shared = ma.blob_digests() & mb.blob_digests()
    te_layers = [layer for layer in mb.layers if layer.name.startswith("text_encoder/")]
    assert {layer.digest for layer in te_layers} <= shared
    new = mb.blob_digests() - ma.blob_digests()
    assert len(list(store.blobs.digests())) == count_a + len(new)
    new_bytes = sum(store.blobs.path(d).stat().st_size for d in new)
    assert blobs_du(store) - du_a == new_bytes
    assert f"{len(new)} new blobs" in out
    show = json.loads(run_zreg("show", "b", "--json", store=store).stdout)
    assert show["shared_bytes"] == sum(store.blobs.path(d).stat().st_size for d in shared)


def test_default_name_and_list(store, model_folder, tmp_path):
    folder = tmp_path / "Z-Image-Turbo"
    shutil.copytree(model_folder, folder)
    run_zreg("create", folder, store=store)
    out = run_zreg("list", store=store).stdout
    assert "z-image-turbo:latest" in out
    show = json.loads(run_zreg("show", "z-image-turbo", "--json", store=store).stdout)
    assert show["components"]["transformer"]["tensors"] == 4
    assert show["components"]["transformer"]["dtypes"] == {"F32": 4}
    assert show["architecture"] == "ZImagePipeline"


def test_folder_without_model_index_uses_known_components(store, model_folder):
    (model_folder / "model_index.json").unlink()
    run_zreg("create", model_folder, "-n", "noindex", store=store)
    _, manifest, _ = store.resolve("noindex")
    assert {layer.component for layer in manifest.tensor_layers()} == {"transformer", "text_encoder", "vae"}
    assert store.config(manifest).architecture is None
