"""Import a Hugging Face diffusers folder into the store (`zreg create`).

Two phases. `scan_folder` reads only headers and small JSON files and validates everything
(component list, index files against shards, every tensor's header) so bad input is refused
before the store is touched. `import_folder` then streams each tensor's byte range into its
own blob on a few threads (hashing and file I/O release the GIL), writes the config blob, and
writes the manifest last, so a model is never visible half-imported.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .digest import sha256_bytes
from .errors import FormatError, InvalidModel
from .manifest import (CONFIG_MEDIA_TYPE, FILE_MEDIA_TYPE, JSON_MEDIA_TYPE, MANIFEST_V2,
                       TENSOR_MEDIA_TYPE, Component, Descriptor, Layer, Manifest, ModelConfig,
                       WeightFile)
from .names import ModelName
from .safetensors_format import TensorInfo, read_header
from .store import Store
from .tensorblob import blob_header

MODEL_INDEX = "model_index.json"
# Used when there is no model_index.json.
KNOWN_COMPONENTS = ("transformer", "unet", "prior", "text_encoder", "text_encoder_2", "text_encoder_3",
                    "tokenizer", "tokenizer_2", "tokenizer_3", "vae", "scheduler", "image_encoder",
                    "feature_extractor")
# Other weight formats are not imported (safetensors only); they are reported as skipped.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".onnx", ".onnx_data", ".gguf", ".msgpack", ".h5",
                    ".pb", ".ot")
_COMPONENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_INDEX_SUFFIX = ".safetensors.index.json"
COPY_CHUNK = 8 << 20


@dataclass
class TensorSource:
    component: str
    path: Path
    info: TensorInfo

    @property
    def layer_name(self) -> str:
        return f"{self.component}/{self.info.name}"


@dataclass
class FileSource:
    layer_name: str
    path: Path
    size: int

    @property
    def media_type(self) -> str:
        return JSON_MEDIA_TYPE if self.path.suffix == ".json" else FILE_MEDIA_TYPE


@dataclass
class ImportPlan:
    folder: Path
    architecture: str | None
    components: dict[str, Component]
    tensors: list[TensorSource]
    files: list[FileSource]
    skipped: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors) + sum(f.size for f in self.files)


@dataclass
class ImportResult:
    name: ModelName
    digest: str
    manifest_size: int
    layers: int
    tensors: int
    new_blobs: int = 0
    new_bytes: int = 0
    reused_blobs: int = 0
    skipped: list[str] = field(default_factory=list)


def _bad(path: Path, message: str) -> InvalidModel:
    return InvalidModel(f"{path}: {message}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise _bad(path, "file vanished while reading") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"not valid JSON ({e})") from None


def _components(folder: Path) -> tuple[str | None, dict[str, tuple[str | None, str | None]]]:
    index_path = folder / MODEL_INDEX
    if index_path.is_file():
        index = _read_json(index_path)
        if not isinstance(index, dict):
            raise _bad(index_path, "not a JSON object")
        comps = {}
        for key, value in sorted(index.items()):
            if key.startswith("_") or not isinstance(value, list) or len(value) != 2:
                continue
            if value[0] is None and value[1] is None:
                continue  # an optional component the pipeline ships without
            if not _COMPONENT_NAME.fullmatch(key) or ".." in key:
                raise _bad(index_path, f"component name {key!r} is not a plain folder name")
            if not (folder / key).is_dir():
                raise _bad(index_path, f"lists component {key!r} but the folder {key}/ is missing")
            comps[key] = (value[0], value[1])
        architecture = index.get("_class_name")
        return architecture if isinstance(architecture, str) else None, comps
    comps = {name: (None, None) for name in KNOWN_COMPONENTS if (folder / name).is_dir()}
    if not comps:
        raise InvalidModel(f"{folder}: not a model folder (no {MODEL_INDEX} and none of the component "
                           f"folders {', '.join(KNOWN_COMPONENTS[:4])}, vae, ...)")
    return None, comps


def _scan_component(folder: Path, component: str, plan: ImportPlan) -> None:
    comp_dir = folder / component
    try:
        entries = sorted(comp_dir.iterdir())
    except FileNotFoundError:
        raise _bad(comp_dir, "folder vanished while reading") from None
    weights = [p for p in entries if p.is_file() and p.name.endswith(".safetensors")]
    indexes = [p for p in entries if p.is_file() and p.name.endswith(_INDEX_SUFFIX)]
    names: dict[str, Path] = {}
    weight_files: dict[str, WeightFile] = {}
    for path in weights:
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                tensors, metadata, _ = read_header(f, size, str(path))
        except FileNotFoundError:
            raise _bad(path, "file vanished while reading") from None
        except FormatError as e:
            raise InvalidModel(str(e)) from None
        for t in tensors:
            if t.name in names:
                raise _bad(path, f"tensor {t.name!r} is also in {names[t.name].name} "
                                 f"(duplicate tensor name across shards of {component}/)")
            names[t.name] = path
            plan.tensors.append(TensorSource(component, path, t))
        weight_files[path.name] = WeightFile(metadata=metadata, tensors=[t.name for t in tensors])
    if len(indexes) > 1:
        raise _bad(comp_dir, f"several index files ({', '.join(p.name for p in indexes)}): keep one")
    if indexes:
        _check_index(indexes[0], names, {p.name for p in weights})
    for path in entries:
        if path in weights:
            continue
        if path.name.startswith(".") or path.is_dir() or path.suffix in SKIPPED_SUFFIXES:
            plan.skipped.append(f"{component}/{path.name}")
            continue
        if path.is_file():
            plan.files.append(FileSource(f"{component}/{path.name}", path, path.stat().st_size))
    plan.components[component].weight_files = weight_files


def _check_index(index_path: Path, names: dict[str, Path], shard_names: set[str]) -> None:
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise _bad(index_path, "has no weight_map object")
    for tensor, shard in sorted(weight_map.items()):
        if not isinstance(shard, str) or "/" in shard or shard not in shard_names:
            raise _bad(index_path, f"weight_map sends {tensor!r} to shard {shard!r}, which is missing")
        if tensor not in names:
            raise _bad(index_path, f"weight_map lists {tensor!r} in {shard}, but no shard holds it")
        if names[tensor].name != shard:
            raise _bad(index_path, f"weight_map puts {tensor!r} in {shard}, but it is in {names[tensor].name}")
    unused = sorted(shard_names - set(weight_map.values()))
    if unused:
        raise _bad(index_path, f"shard {unused[0]} is in the folder but not in the weight_map")
    unlisted = sorted(set(names) - set(weight_map))
    if unlisted:
        raise _bad(index_path, f"weight_map misses {len(unlisted)} tensor(s) held by the shards, "
                               f"e.g. {unlisted[0]!r} in {names[unlisted[0]].name}")


def scan_folder(folder: Path | str) -> ImportPlan:
    """Validate a diffusers folder and list what to import. Reads headers only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidModel(f"{folder}: not a folder")
    architecture, comps = _components(folder)
    plan = ImportPlan(folder, architecture, {}, [], [])
    for component, (library, class_name) in comps.items():
        plan.components[component] = Component(library=library, class_name=class_name)
        _scan_component(folder, component, plan)
    index_path = folder / MODEL_INDEX
    if index_path.is_file():
        plan.files.append(FileSource(MODEL_INDEX, index_path, index_path.stat().st_size))
    if not plan.tensors:
        raise InvalidModel(f"{folder}: no .safetensors weights in {', '.join(comps) or 'any component'}")
    for component, comp in plan.components.items():
        tensors = [t.info for t in plan.tensors if t.component == component]
        bytes_by_dtype = Counter()
        for t in tensors:
            bytes_by_dtype[t.dtype] += t.nbytes
        comp.tensor_count = len(tensors)
        comp.parameter_count = sum(math.prod(t.shape) for t in tensors)
        comp.dtypes = dict(sorted(Counter(t.dtype for t in tensors).items()))
        comp.dtype = bytes_by_dtype.most_common(1)[0][0] if tensors else None
    return plan


def _copy_range(store: Store, path: Path, begin: int, end: int, header: bytes, buf: bytearray,
                on_bytes: Callable[[int], None]) -> tuple[str, int, bool]:
    """Stream header + path[begin:end] into a new blob; returns (digest, size, existed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise _bad(path, "file vanished while importing") from None
    try:
        with store.blobs.writer() as writer:
            if header:
                writer.write(header)
            view = memoryview(buf)
            offset = begin
            while offset < end:
                n = os.preadv(fd, [view[:min(len(buf), end - offset)]], offset)
                if n <= 0:
                    raise _bad(path, f"file shrank while importing (no data at byte {offset}, expected {end})")
                writer.write(view[:n])
                offset += n
                on_bytes(n)
            digest, existed = writer.commit()
            return digest, writer.size, existed
    finally:
        os.close(fd)


def import_folder(store: Store, plan: ImportPlan, name: ModelName,
                  on_bytes: Callable[[int], None] = lambda n: None,
                  workers: int | None = None) -> ImportResult:
    """Write every blob of `plan`, then the config blob, then the manifest."""
    workers = workers or min(4, max(2, os.cpu_count() or 2))
    result = ImportResult(name, "", 0, 0, len(plan.tensors), skipped=list(plan.skipped))
    local = threading.local()  # one copy buffer per worker thread

    def store_one(path: Path, begin: int, end: int, header: bytes):
        if not hasattr(local, "buf"):
            local.buf = bytearray(COPY_CHUNK)
        return _copy_range(store, path, begin, end, header, local.buf, on_bytes)

    def tensor_layer(t: TensorSource) -> Layer:
        header = blob_header(t.info.dtype, t.info.shape)
        digest, size, existed = store_one(t.path, t.info.begin, t.info.end, header)
        return Layer(mediaType=TENSOR_MEDIA_TYPE, digest=digest, size=size, name=t.layer_name,
                     dtype=t.info.dtype, shape=list(t.info.shape)), existed

    def file_layer(f: FileSource) -> Layer:
        digest, size, existed = store_one(f.path, 0, f.size, b"")
        if size != f.size:
            raise _bad(f.path, f"file changed while importing ({f.size} bytes, then {size})")
        return Layer(mediaType=f.media_type, digest=digest, size=size, name=f.layer_name), existed

    with store.lock(), ThreadPoolExecutor(workers, thread_name_prefix="zreg-import") as pool:
        futures = [pool.submit(tensor_layer, t) for t in plan.tensors]
        futures += [pool.submit(file_layer, f) for f in plan.files]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        layers = []
        for future in futures:
            if future.cancelled():
                continue
            layer, existed = future.result()  # raises the first worker error
            layers.append(layer)
            if existed:
                result.reused_blobs += 1
            else:
                result.new_blobs += 1
                result.new_bytes += layer.size
        layers.sort(key=lambda layer: layer.name)
        config = ModelConfig(
            capabilities=["image"] if plan.architecture else [],
            architecture=plan.architecture,
            parameter_count=sum(c.parameter_count for c in plan.components.values()),
            components=plan.components,
        )
        config_bytes = config.to_bytes()
        config_digest, _ = store.blobs.put_bytes(config_bytes)
        store.blobs.sync()
        manifest = Manifest(schemaVersion=2, mediaType=MANIFEST_V2,
                            config=Descriptor(mediaType=CONFIG_MEDIA_TYPE, digest=config_digest,
                                              size=len(config_bytes)),
                            layers=layers)
        data = manifest.to_bytes()
        store.manifests.write_bytes(name, data)
    result.digest = sha256_bytes(data)
    result.manifest_size = len(data)
    result.layers = len(layers)
    return result
