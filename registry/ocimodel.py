"""The OCI form of a zreg model (`push --oci`, `save`), following CNCF ModelPack.

    manifest  application/vnd.oci.image.manifest.v1+json
              artifactType application/vnd.cncf.model.manifest.v1+json
    config    application/vnd.cncf.model.config.v1+json   (ModelPack's schema, nothing extra)
    layers    one per local layer, same blob, same order:
                tensors -> application/vnd.cncf.model.weight.v1.raw
                files   -> application/vnd.cncf.model.weight.config.v1.raw
              then zreg's own config blob as a weight.config layer at `.zreg/config.json`.

Each layer carries `org.opencontainers.image.title` and `org.cncf.model.filepath` (where the
file lands when extracted: `<component>/<tensor>.safetensors` for a tensor blob, which is itself
a safetensors file), `org.cncf.model.file.metadata+json`, and `dev.zreg.layer+json`: the local
layer's mediaType, name, dtype and shape. The manifest annotation `dev.zreg.manifest.digest`
names the local manifest, which `from_oci` rebuilds byte for byte and checks against it.
"""

from __future__ import annotations

import json

from .digest import sha256_bytes
from .errors import FormatError
from .manifest import MANIFEST_V2, Descriptor, Layer, Manifest, ModelConfig

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
TITLE = "org.opencontainers.image.title"
FILEPATH = "org.cncf.model.filepath"
FILE_METADATA = "org.cncf.model.file.metadata+json"
ZREG_LAYER = "dev.zreg.layer+json"
ZREG_MANIFEST = "dev.zreg.manifest.digest"
CONFIG_PATH = ".zreg/config.json"


def _compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


def _param_size(count: int) -> str:
    for scale, letter in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{letter}"
    return str(count)


def _oci_layer(desc: Layer | Descriptor, media_type: str, path: str, zreg: dict) -> dict:
    metadata = {"name": path, "mode": 0o644, "uid": 0, "gid": 0, "size": desc.size,
                "mtime": "1970-01-01T00:00:00Z", "typeflag": 48}
    return {"mediaType": media_type, "digest": desc.digest, "size": desc.size,
            "annotations": {FILEPATH: path, FILE_METADATA: json.dumps(metadata, separators=(",", ":")),
                            TITLE: path, ZREG_LAYER: json.dumps(zreg, separators=(",", ":"))}}


def to_oci(manifest_bytes: bytes, config: ModelConfig, name: str, tag: str) -> tuple[bytes, bytes]:
    """(OCI manifest bytes, ModelPack config bytes) for a local manifest. Raises FormatError
    when the local manifest would not come back byte for byte."""
    manifest = Manifest.from_bytes(manifest_bytes, name)
    layers = []
    for layer in manifest.layers:
        zreg = {"mediaType": layer.mediaType, "name": layer.name}
        if layer.dtype is not None:
            zreg |= {"dtype": layer.dtype, "shape": layer.shape}
        if layer.is_tensor:
            layers.append(_oci_layer(layer, WEIGHT_RAW, f"{layer.name}.safetensors", zreg))
        else:
            layers.append(_oci_layer(layer, WEIGHT_CONFIG_RAW, layer.name, zreg))
    layers.append(_oci_layer(manifest.config, WEIGHT_CONFIG_RAW, CONFIG_PATH,
                             {"role": "config", "mediaType": manifest.config.mediaType}))
    dtypes = sorted({c.dtype for c in config.components.values() if c.dtype})
    quantized = sorted({c.quantization for c in config.components.values() if c.quantization})
    model_config = {
        "descriptor": {"name": name, "version": tag},
        "config": {"architecture": config.architecture or "unknown", "format": config.model_format,
                   "paramSize": _param_size(config.parameter_count),
                   "precision": dtypes[0].lower() if len(dtypes) == 1 else "mixed",
                   **({"quantization": ",".join(quantized)} if quantized else {}),
                   "capabilities": {"inputTypes": ["text"], "outputTypes": ["image"]}
                   if "image" in config.capabilities else {}},
        "modelfs": {"type": "layers", "diffIds": [layer["digest"] for layer in layers]},
    }
    config_bytes = _compact(model_config)
    oci = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": MODEL_ARTIFACT,
           "config": {"mediaType": MODEL_CONFIG, "digest": sha256_bytes(config_bytes), "size": len(config_bytes)},
           "layers": layers, "annotations": {ZREG_MANIFEST: sha256_bytes(manifest_bytes)}}
    oci_bytes = _compact(oci)
    if from_oci(oci_bytes) != manifest_bytes:
        raise FormatError(f"{name}: this manifest is not in zreg's canonical form, so its OCI form would not "
                          "round-trip byte for byte; push it without --oci")
    return oci_bytes, config_bytes


def is_zreg_oci(data: bytes) -> bool:
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return (isinstance(doc, dict) and doc.get("mediaType") == OCI_MANIFEST
            and ZREG_MANIFEST in (doc.get("annotations") or {}))


def from_oci(data: bytes) -> bytes:
    """The local manifest bytes an OCI form stands for (checked against its digest annotation)."""
    try:
        doc = json.loads(data)
        expected = doc["annotations"][ZREG_MANIFEST]
        config = None
        layers = []
        for entry in doc["layers"]:
            zreg = json.loads(entry["annotations"][ZREG_LAYER])
            if zreg.get("role") == "config":
                config = Descriptor(mediaType=zreg["mediaType"], digest=entry["digest"], size=entry["size"])
                continue
            layers.append(Layer(mediaType=zreg["mediaType"], digest=entry["digest"], size=entry["size"],
                                name=zreg.get("name"), dtype=zreg.get("dtype"), shape=zreg.get("shape")))
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"OCI manifest is not a zreg model ({type(e).__name__}: {e})") from None
    if config is None:
        raise FormatError("OCI manifest has no zreg config layer")
    local = Manifest(schemaVersion=2, mediaType=MANIFEST_V2, config=config, layers=layers).to_bytes()
    if sha256_bytes(local) != expected:
        raise FormatError(f"OCI manifest does not rebuild the zreg manifest {expected}")
    return local


