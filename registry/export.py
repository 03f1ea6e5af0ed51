"""Rebuild a diffusers folder from a stored model (`zreg export`).

Tensors go back into the .safetensors files they came from (the config blob records each
file's tensors in order and its __metadata__), copied byte for byte from the blobs with
copy_file_range; other files are copied as stored. The folder is built under a temp name
beside the destination and renamed into place when complete.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from .errors import FormatError, ZregError
from .names import ModelName, is_path_segment
from .safetensors_format import build_header
from .store import Store, fsync_dir
from .tensorblob import read_blob_tensor



def _relative_path(layer_name: str) -> Path:
    parts = layer_name.split("/")
    if not all(is_path_segment(p) for p in parts):
        raise FormatError(f"layer name {layer_name!r} is not a safe relative path")
    return Path(*parts)


def _copy_blob_range(src: Path, offset: int, count: int, dst_fd: int) -> None:
    with open(src, "rb") as f:
        src_fd = f.fileno()
        while count:
            n = os.copy_file_range(src_fd, dst_fd, count, offset)
            if n == 0:
                raise FormatError(f"{src}: blob shorter than its header says")
            offset += n
            count -= n


def export_model(store: Store, name: ModelName | str, dest: Path) -> Path:
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ZregError(f"{dest}: already exists and is not an empty folder")
    name, manifest, _ = store.resolve(name)
    config = store.config(manifest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = dest.parent / f".{dest.name}.zreg-export-{secrets.token_hex(4)}"
    work.mkdir()
    try:
        tensors = {layer.name: layer for layer in manifest.tensor_layers()}
        written = set()
        for layer in manifest.layers:
            if layer.is_tensor:
                continue
            target = work / _relative_path(layer.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(store.blobs.path(layer.digest), target)
        for comp_name, comp in config.components.items():
            for file_name, weight_file in comp.weight_files.items():
                layers = [tensors[f"{comp_name}/{t}"] for t in weight_file.tensors]
                target = work / _relative_path(f"{comp_name}/{file_name}")
                target.parent.mkdir(parents=True, exist_ok=True)
                header = build_header([(t, layer.dtype, layer.shape)
                                       for t, layer in zip(weight_file.tensors, layers)],
                                      weight_file.metadata)
                with open(target, "wb") as out:
                    out.write(header)
                    out.flush()
                    for layer in layers:
                        blob_path = store.blobs.path(layer.digest)
                        blob = read_blob_tensor(blob_path, layer.name)
                        _copy_blob_range(blob_path, blob.data_offset, blob.nbytes, out.fileno())
                        written.add(layer.name)
                    os.fsync(out.fileno())
        missing = sorted(set(tensors) - written)
        if missing:
            raise ZregError(f"{name.short()}: {len(missing)} tensor(s) such as {missing[0]!r} belong to no "
                            "source file in the model config; cannot export this model as a diffusers folder")
        for folder in [work, *[p for p in work.rglob("*") if p.is_dir()]]:
            fsync_dir(folder)
        if dest.exists():
            dest.rmdir()
        os.rename(work, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dest
