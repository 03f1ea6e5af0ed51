"""Stored models as the runtime sees them: components, their tensors and files.

A tensor layer's blob is a one-tensor safetensors file (docs/format.md). `mx.load` opens it with
MLX's own safetensors reader, keyed by the layer name: the array is lazy until first evaluated,
then read straight from the blob into its one MLX buffer (on the CPU backend MLX reads with
pread rather than mapping the file; nothing copies it again). The runtime evaluates a
component's weights when it loads the component, in groups (`materialize`), because MLX keeps a
file descriptor open per unevaluated blob.

FP8 (mxfp8, see the quantization section of docs/format.md): `<module>.weight` is stored as
F8_E4M3 with its [out, in] shape, plus `<module>.scales` as F8_E8M0 [out, in/32]: exactly
`mx.quantize(w, group_size=32, bits=8, mode="mxfp8")`. MLX loads both as uint8; the weight's
bytes viewed as uint32 [out, in/4] are the packed weight `mx.quantized_matmul` takes (a view,
no copy).

Checking (`check_tensors`) compares the manifest's names, shapes and dtypes (no data read) with
what the model's config implies, and names every missing, extra or mis-shaped tensor.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from zreg.registry.digest import sha256_bytes
from zreg.registry.manifest import Layer, Manifest, ModelConfig
from zreg.registry.store import Store
from zreg.registry.tensorblob import read_blob_tensor

from .errors import UnsupportedModel, WeightMismatch

FLOAT_DTYPES = {"F32": 4, "BF16": 2, "F16": 2}
FP8_WEIGHT, FP8_SCALES = "F8_E4M3", "F8_E8M0"
MXFP8_GROUP = 32
_MATERIALIZE_GROUP = 64  # blobs evaluated together (bounds open descriptors)


def _raise_open_file_limit() -> None:
    # Lazily loaded blobs hold a descriptor each until evaluated; macOS's default soft limit is 256.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


@dataclass
class StoredModel:
    """A resolved model: its name, manifest digest, manifest, config blob and store."""

    store: Store
    name: str
    digest: str
    manifest: Manifest
    config: ModelConfig

    @classmethod
    def open(cls, store: Store, name: str) -> "StoredModel":
        model_name, manifest, raw = store.resolve(name)
        return cls(store=store, name=model_name.short(), digest=sha256_bytes(raw), manifest=manifest,
                   config=store.config(manifest))

    def component(self, component: str) -> "StoredComponent":
        layers = [layer for layer in self.manifest.layers if layer.component == component]
        if not layers:
            raise UnsupportedModel(f"model {self.name!r} has no {component!r} component")
        info = self.config.components.get(component)
        return StoredComponent(self, component, layers, info.quantization if info else None)


class StoredComponent:
    """One component folder of a stored model: tensors by name, files by file name."""

    def __init__(self, model: StoredModel, name: str, layers: list[Layer], quantization: str | None):
        self.model = model
        self.name = name
        self.quantization = quantization
        prefix = len(name) + 1
        self.tensors = {layer.name[prefix:]: layer for layer in layers if layer.is_tensor}
        self.files = {layer.name[prefix:]: layer for layer in layers if not layer.is_tensor}

    @property
    def nbytes(self) -> int:
        """Bytes of the component's blobs (tensor data plus a ~100-byte header each): what its
        weights take when resident."""
        return sum(layer.size for layer in self.tensors.values())

    def read_file(self, file: str) -> bytes:
        layer = self.files.get(file)
        if layer is None:
            raise UnsupportedModel(f"model {self.model.name!r} has no {self.name}/{file}")
        return self.model.store.blobs.read_bytes(layer.digest)

    def json(self, file: str) -> dict:
        try:
            return json.loads(self.read_file(file))
        except ValueError as e:
            raise UnsupportedModel(f"{self.model.name}: {self.name}/{file} is not valid JSON: {e}") from None

    def blob_path(self, tensor: str) -> Path:
        return self.model.store.blobs.path(self.tensors[tensor].digest)

    def open(self, names) -> dict[str, mx.array]:
        """Lazy arrays for these tensors (nothing read yet). FP8 weights come back as the packed
        uint32 view; their `.scales` must be opened too."""
        _raise_open_file_limit()
        out = {}
        for name in names:
            layer = self.tensors[name]
            loaded = mx.load(str(self.blob_path(name)), format="safetensors")
            if len(loaded) != 1:
                raise WeightMismatch(f"{self.name}/{name}: blob {layer.digest[:19]} holds "
                                     f"{len(loaded)} tensors, expected one")
            array = next(iter(loaded.values()))
            if layer.dtype == FP8_WEIGHT:
                array = array.view(mx.uint32)  # [out, in] bytes == packed [out, in/4]
            out[name] = array
        return out


def materialize(arrays: dict[str, mx.array]) -> None:
    """Read lazily opened blobs now, a group at a time (each unevaluated blob holds a descriptor)."""
    values = list(arrays.values())
    for i in range(0, len(values), _MATERIALIZE_GROUP):
        mx.eval(values[i:i + _MATERIALIZE_GROUP])


def check_tensors(component: StoredComponent, expected: dict[str, tuple[int, ...]],
                  linear_weights: set[str], optional: set[str] = frozenset()) -> None:
    """Raise WeightMismatch unless the stored tensors are exactly `expected` (name -> stored
    shape), give or take the `optional` names and the `.scales` of FP8 weights. FP8 is accepted
    only for `linear_weights` (the weights of `layers.Linear` modules)."""
    stored = component.tensors
    missing = sorted(n for n in expected if n not in stored)
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    extra, misshaped, bad_dtype = [], [], []
    for name, layer in sorted(stored.items()):
        shape = tuple(layer.shape or ())
        if name in expected:
            if shape != tuple(expected[name]):
                misshaped.append(f"{name} {list(shape)} (expected {list(expected[name])})")
            if layer.dtype == FP8_WEIGHT and name in linear_weights:
                problems += _check_fp8(component, name, shape)
            elif layer.dtype not in FLOAT_DTYPES:
                bad_dtype.append(f"{name} ({layer.dtype})")
        elif name.endswith(".scales") and stored.get(name[:-7] + ".weight") is not None \
                and stored[name[:-7] + ".weight"].dtype == FP8_WEIGHT:
            continue  # checked with its weight
        elif name not in optional:
            extra.append(name)
    if extra:
        problems.append(f"unexpected {_some(extra)}")
    if misshaped:
        problems.append(f"mis-shaped {_some(misshaped)}")
    if bad_dtype:
        problems.append(f"unsupported dtype {_some(bad_dtype)}")
    if problems:
        raise WeightMismatch(f"{component.model.name}: {component.name} tensors do not match its "
                             f"config.json: " + "; ".join(problems))


def _check_fp8(component: StoredComponent, name: str, shape: tuple[int, ...]) -> list[str]:
    scales_name = name[:-7] + ".scales" if name.endswith(".weight") else None
    scales = component.tensors.get(scales_name) if scales_name else None
    if len(shape) != 2 or shape[1] % MXFP8_GROUP:
        return [f"FP8 tensor {name} {list(shape)}: only 2-D weights with inputs a multiple of "
                f"{MXFP8_GROUP} can be mxfp8"]
    if scales is None:
        return [f"FP8 weight {name} has no {scales_name} (F8_E8M0 [out, in/{MXFP8_GROUP}])"]
    want = [shape[0], shape[1] // MXFP8_GROUP]
    if scales.dtype != FP8_SCALES or list(scales.shape or ()) != want:
        return [f"{scales_name} is {scales.dtype} {scales.shape}, expected {FP8_SCALES} {want}"]
    return []


def _some(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} tensor{'s' if len(items) != 1 else ''}: {shown}{more}"


def assign(module, arrays: dict[str, mx.array]) -> None:
    """Set each dotted name (`layers.0.attention.to_q.weight`) on the module tree, in place.
    Unlike `Module.update`, this may add keys (an FP8 linear's `scales`)."""
    for name, array in arrays.items():
        *path, leaf = name.split(".")
        node = module
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[leaf] = array



def release(module, names) -> None:
    """Drop the arrays `assign` set (an FP8 linear's `scales` key goes away with its weight)."""
    for name in names:
        *path, leaf = name.split(".")
        node = module
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if leaf == "scales":
            del node[leaf]
        else:
            node[leaf] = _RELEASED


_RELEASED = mx.zeros((0,))


def read_rows(component: StoredComponent, name: str, ids: list[int]) -> np.ndarray:
    """Rows `ids` of a 2-D float tensor as float32, read through a memory map of its blob: an
    embedding table (778 MB for Qwen3-4B) is never loaded to look up a few dozen tokens."""
    layer = component.tensors[name]
    path = component.blob_path(name)
    blob = read_blob_tensor(path, name)
    rows, cols = blob.shape
    bad = [i for i in ids if not 0 <= i < rows]
    if bad:
        raise WeightMismatch(f"{component.name}/{name}: token ids {bad[:5]} are past its {rows} rows")
    np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}.get(layer.dtype)
    if np_dtype is None:
        raise WeightMismatch(f"{component.name}/{name} is {layer.dtype}; an embedding table must be F32, F16 or BF16")
    table = np.memmap(path, dtype=np_dtype, mode="r", offset=blob.data_offset, shape=(rows, cols))
    picked = np.asarray(table[ids])
    if layer.dtype == "BF16":  # bfloat16 is the top half of a float32
        return (picked.astype(np.uint32) << 16).view(np.float32)
    return picked.astype(np.float32)
