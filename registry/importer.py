"""Import a Hugging Face diffusers folder into the store (`zreg create`).

Two phases. `scan_folder` reads only headers and small JSON files and validates everything
(component list, index files against shards, every tensor's header) so bad input is refused
before the store is touched. `import_folder` then hands the tensors' byte ranges to the model
builder (builder.py), which streams each into its own blob on a few threads (hashing and file
I/O release the GIL), converting them when a quantization policy is given, and writes the
manifest last, so a model is never visible half-imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .builder import BuildResult, FileSource, build_model
from .convert import TensorSource
from .errors import FormatError, InvalidModel
from .manifest import Component, WeightFile
from .names import ModelName, is_path_segment
from .quantize import Policy
from .safetensors_format import read_header
from .store import Store

MODEL_INDEX = "model_index.json"
# Used when there is no model_index.json.
KNOWN_COMPONENTS = ("transformer", "unet", "prior", "text_encoder", "text_encoder_2", "text_encoder_3",
                    "tokenizer", "tokenizer_2", "tokenizer_3", "vae", "scheduler", "image_encoder",
                    "feature_extractor")
# Other weight formats are not imported (safetensors only); they are reported as skipped.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".onnx", ".onnx_data", ".gguf", ".msgpack", ".h5",
                    ".pb", ".ot")
_INDEX_SUFFIX = ".safetensors.index.json"


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
        return sum(t.nbytes for t in self.tensors) + sum(f.size for f in self.files)


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
            if not is_path_segment(key):
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
            plan.tensors.append(TensorSource(f"{component}/{t.name}", path, t.begin, t.dtype, t.shape))
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
    return plan


def import_folder(store: Store, plan: ImportPlan, name: ModelName, policy: Policy | None = None,
                  on_bytes: Callable[[int], None] = lambda n: None, workers: int | None = None) -> BuildResult:
    """Write every blob of `plan` (converted per `policy`), the config blob, then the manifest."""
    result = build_model(store, name, plan.tensors, plan.files, plan.components, plan.architecture,
                         policy, on_bytes, workers)
    result.skipped = list(plan.skipped)
    return result
