"""Write a model into the store: tensor blobs (on worker threads), file blobs, the config blob,
then the manifest, last. Shared by `create` (sources are shards of a folder) and `quantize`
(sources are blobs of a stored model).

Plain copies are published as soon as each is written, so an interrupted create keeps its
finished blobs. When converting, every new blob is held sealed until all tensors passed their
checks (e.g. no NaN), then published together: bad input leaves the store as it was.
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from .convert import Output, TensorSource, write_tensor
from .digest import sha256_bytes
from .errors import InvalidModel
from .manifest import (CONFIG_MEDIA_TYPE, FILE_MEDIA_TYPE, JSON_MEDIA_TYPE, MANIFEST_V2, Component,
                       Descriptor, Layer, Manifest, ModelConfig)
from .names import ModelName
from .quantize import BF16, Policy
from .store import Store

COPY_CHUNK = 8 << 20


@dataclass
class FileSource:
    layer_name: str
    path: Path
    size: int

    @property
    def media_type(self) -> str:
        return JSON_MEDIA_TYPE if self.path.suffix == ".json" else FILE_MEDIA_TYPE


@dataclass
class BuildResult:
    name: ModelName
    digest: str = ""
    layers: int = 0
    tensors: int = 0
    quantized: int = 0
    new_blobs: int = 0
    new_bytes: int = 0
    reused_blobs: int = 0
    bytes: int = 0                     # sum of the model's layer sizes
    lossless: Optional[bool] = None    # bf16: every converted tensor was exact
    skipped: list[str] = field(default_factory=list)


def _store_file(store: Store, f: FileSource) -> Output:
    with store.blobs.writer() as w, open(f.path, "rb") as src:
        while chunk := src.read(COPY_CHUNK):
            w.write(chunk)
        if w.size != f.size:
            raise InvalidModel(f"{f.path}: file changed while importing ({f.size} bytes, then {w.size})")
        sealed = w.seal()
    return Output(Layer(mediaType=f.media_type, digest=sealed.digest, size=sealed.size, name=f.layer_name),
                  sealed)


def _component_stats(comp: Component, layers: list[Layer]) -> None:
    weights = [layer for layer in layers if not layer.name.endswith(".scales") or layer.dtype != "F8_E8M0"]
    by_bytes = Counter()
    for layer in weights:
        by_bytes[layer.dtype] += layer.size
    comp.tensor_count = len(layers)
    comp.parameter_count = sum(math.prod(layer.shape) for layer in weights)
    comp.dtypes = dict(sorted(Counter(layer.dtype for layer in layers).items()))
    comp.dtype = by_bytes.most_common(1)[0][0] if weights else None


def build_model(store: Store, name: ModelName, tensors: list[TensorSource],
                files: list[Union[FileSource, Layer]], components: dict[str, Component],
                architecture: str | None, policy: Policy | None = None,
                on_bytes: Callable[[int], None] = lambda n: None, workers: int | None = None) -> BuildResult:
    workers = workers or min(4, max(2, os.cpu_count() or 2))
    result = BuildResult(name, tensors=len(tensors))
    actions = [policy.action(t.name, t.dtype, t.shape) if policy else None for t in tensors]
    deferred = policy is not None
    local = threading.local()   # one read buffer per worker thread
    outputs: list[list[Output]] = []

    def one_tensor(src: TensorSource, action) -> list[Output]:
        if not hasattr(local, "buf"):
            local.buf = bytearray(COPY_CHUNK)
        outs = write_tensor(store, src, action, local.buf, on_bytes)
        if not deferred:
            for out in outs:
                out.publish()
        return outs

    def one_file(f) -> list[Output]:
        if isinstance(f, Layer):
            return [Output(f, None, existed=True)]
        out = _store_file(store, f)
        on_bytes(f.size)
        if not deferred:
            out.publish()
        return [out]

    with store.lock(), ThreadPoolExecutor(workers, thread_name_prefix="zreg-build") as pool:
        futures = [pool.submit(one_tensor, t, a) for t, a in zip(tensors, actions)]
        futures += [pool.submit(one_file, f) for f in files]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        wait(futures)
        failure = next((f.exception() for f in futures if not f.cancelled() and f.exception()), None)
        outputs = [f.result() for f in futures if not f.cancelled() and not f.exception()]
        if failure is not None:
            for outs in outputs:
                for out in outs:
                    out.discard()
            raise failure
        flat = [out for outs in outputs for out in outs]
        for out in flat:
            out.publish()
            if out.existed:
                result.reused_blobs += 1
            else:
                result.new_blobs += 1
                result.new_bytes += out.layer.size
        layers = sorted((out.layer for out in flat), key=lambda layer: layer.name)
        result.quantized = sum(1 for a in actions if a is not None)
        converted = [out.lossless for out in flat if out.lossless is not None]
        result.lossless = all(converted) if converted else None
        for comp_name, comp in components.items():
            comp_layers = [layer for layer in layers if layer.is_tensor and layer.component == comp_name]
            _component_stats(comp, comp_layers)
            touched = [a for t, a in zip(tensors, actions) if a and t.name.startswith(comp_name + "/")]
            if touched:
                comp.quantization = policy.record()
                comp.quantized_tensors = len(touched)
                if policy.mode == BF16:
                    comp.lossless = all(out.lossless for out in flat if out.lossless is not None
                                        and out.layer.component == comp_name)
        config = ModelConfig(
            capabilities=["image"] if architecture else [],
            architecture=architecture,
            parameter_count=sum(c.parameter_count for c in components.values()),
            components=components,
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
    result.layers = len(layers)
    result.bytes = sum(layer.size for layer in layers) + len(config_bytes)
    return result
