"""Summaries of stored models for `zreg list` and `zreg show`."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from .digest import sha256_bytes
from .manifest import Manifest
from .names import ModelName
from .store import Store


@dataclass
class ModelEntry:
    name: str
    digest: str
    size: int
    modified: float


def list_models(store: Store) -> list[ModelEntry]:
    entries = []
    for name in store.manifests.names():
        path = store.manifests.path(name)
        data = path.read_bytes()
        try:
            manifest = Manifest.from_bytes(data, str(path))
            size = manifest.config.size + sum(layer.size for layer in manifest.layers)
        except Exception:
            size = -1  # listed anyway; `zreg verify` says what is wrong
        entries.append(ModelEntry(name.short(), sha256_bytes(data), size, path.stat().st_mtime))
    return entries


@dataclass
class ComponentSummary:
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    class_name: str | None = None
    quantization: str | None = None


@dataclass
class ModelSummary:
    name: str
    digest: str
    architecture: str | None
    capabilities: list[str]
    parameters: int
    tensors: int
    bytes: int            # sum of the distinct blobs the model references
    shared_bytes: int     # of those, bytes other models reference too
    components: dict[str, ComponentSummary]

    def to_dict(self) -> dict:
        return asdict(self)


def show_model(store: Store, name: ModelName | str) -> ModelSummary:
    name, manifest, data = store.resolve(name)
    config = store.config(manifest)
    components: dict[str, ComponentSummary] = defaultdict(ComponentSummary)
    dtype_counts: dict[str, Counter] = defaultdict(Counter)
    for layer in manifest.layers:
        comp = components[layer.component or "(root)"]
        comp.bytes += layer.size
        if layer.is_tensor:
            comp.tensors += 1
            n = 1
            for d in layer.shape or []:
                n *= d
            comp.parameters += n
            dtype_counts[layer.component][layer.dtype] += 1
        else:
            comp.files.append(layer.name)
    for comp_name, comp in components.items():
        comp.dtypes = dict(sorted(dtype_counts[comp_name].items()))
        if comp_name in config.components:
            comp.class_name = config.components[comp_name].class_name
            comp.quantization = config.components[comp_name].quantization
    own = {d.digest: d.size for d in [manifest.config, *manifest.layers]}
    others: set[str] = set()
    for other in store.manifests.names():
        if other == name:
            continue
        try:
            others |= store.resolve(other)[1].blob_digests()
        except Exception:
            continue
    return ModelSummary(
        name=name.short(), digest=sha256_bytes(data), architecture=config.architecture,
        capabilities=config.capabilities,
        parameters=sum(c.parameters for c in components.values()),
        tensors=sum(c.tensors for c in components.values()),
        bytes=sum(own.values()),
        shared_bytes=sum(size for digest, size in own.items() if digest in others),
        components=dict(sorted(components.items())),
    )
