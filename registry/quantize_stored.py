"""`zreg quantize MODE SRC [DST]`: a new model from one already in the store.

Tensors the policy keeps are not read or written: the new manifest names the same blobs, so
the store grows only by the converted tensors.
"""

from __future__ import annotations

from typing import Callable

from .builder import BuildResult, build_model
from .convert import TensorSource
from .errors import InvalidModel
from .names import ModelName
from .quantize import Policy
from .store import Store
from .tensorblob import read_blob_tensor


def quantize_model(store: Store, source: ModelName, dest: ModelName, policy: Policy,
                   on_bytes: Callable[[int], None] = lambda n: None) -> BuildResult:
    source, manifest, _ = store.resolve(source)
    config = store.config(manifest)
    for comp_name, comp in config.components.items():
        if comp.quantization:
            raise InvalidModel(f"model {source.short()!r} is already quantized ({comp_name} is "
                               f"{comp.quantization}); quantize the unquantized model instead")
    if store.manifests.exists(dest) and dest == source:
        raise InvalidModel(f"destination {dest.short()!r} is the source model; choose another name")
    tensors = []
    for layer in manifest.tensor_layers():
        path = store.blobs.path(layer.digest)
        blob = read_blob_tensor(path, layer.name)
        tensors.append(TensorSource(layer.name, path, blob.data_offset, blob.dtype, blob.shape, layer))
    files = [layer for layer in manifest.layers if not layer.is_tensor]
    components = {name: comp.model_copy(deep=True) for name, comp in config.components.items()}
    return build_model(store, dest, tensors, files, components, config.architecture, policy, on_bytes)


def total_bytes(store: Store, source: ModelName) -> int:
    _, manifest, _ = store.resolve(source)
    return sum(layer.size for layer in manifest.layers)
