"""The manifest and the config blob (format: docs/format.md).

Manifests are stored and served byte-exact: we parse them to read, and serialise only the ones
we create, compactly and with a fixed key order so the same folder always gives the same digest.
"""

from __future__ import annotations

import json
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import FormatError

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
JSON_MEDIA_TYPE = "application/vnd.ollama.image.json"
FILE_MEDIA_TYPE = "application/vnd.zreg.image.file"
MAX_MANIFEST_BYTES = 4 << 20  # what the CNCF registry and containers/image accept


def _parse(cls, data: bytes, where: str, what: str):
    """Validate JSON into `cls`; the first problem becomes a one-line FormatError."""
    try:
        return cls.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise FormatError(f"{where}: invalid {what}: {field}: {first['msg']}") from None


class Descriptor(BaseModel):
    model_config = ConfigDict(extra="allow")

    mediaType: str
    digest: str
    size: int = Field(ge=0)


class Layer(Descriptor):
    name: Optional[str] = None
    dtype: Optional[str] = None
    shape: Optional[list[int]] = None

    @property
    def is_tensor(self) -> bool:
        return self.mediaType == TENSOR_MEDIA_TYPE

    @property
    def component(self) -> str:
        return self.name.split("/", 1)[0] if self.name and "/" in self.name else ""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schemaVersion: int
    mediaType: str = MANIFEST_V2
    config: Descriptor
    layers: list[Layer]

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(exclude_none=True), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "Manifest":
        if len(data) > MAX_MANIFEST_BYTES:
            raise FormatError(f"{where}: manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
        return _parse(cls, data, where, "manifest")

    def tensor_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.is_tensor]

    def blob_digests(self) -> set[str]:
        return {self.config.digest} | {layer.digest for layer in self.layers}


class WeightFile(BaseModel):
    """One source .safetensors file: its tensors in file order and its __metadata__, so
    `zreg export` can rebuild the same files."""

    metadata: Optional[dict[str, str]] = None
    tensors: list[str]


class Component(BaseModel):
    model_config = ConfigDict(extra="allow")

    library: Optional[str] = None
    class_name: Optional[str] = None
    dtype: Optional[str] = None          # the dtype holding most of the component's bytes
    dtypes: dict[str, int] = {}          # dtype -> tensor count
    quantization: Optional[str] = None
    parameter_count: int = 0
    tensor_count: int = 0
    weight_files: dict[str, WeightFile] = {}


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    model_format: str = "safetensors"
    capabilities: list[str] = []
    architecture: Optional[str] = None
    parameter_count: int = 0
    components: dict[str, Component] = {}

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(exclude_none=True), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "ModelConfig":
        return _parse(cls, data, where, "model config")
