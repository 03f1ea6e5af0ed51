"""Every on-disk path of the store comes from here. The tree (Ollama's layout, so either tool
can read the other's store):

    $ZREG_MODELS (default ~/.zreg/models)
    ├── blobs/
    │   ├── sha256-<64 hex>          content-addressed blobs: tensors, files, configs
    │   ├── .tmp-<random>            a blob being written (flock held while it is); gc removes stale ones
    │   └── .partial-sha256-<hex>    a download in progress, resumable (flock held while written)
    ├── manifests/
    │   └── <host>/<namespace>/<model>/<tag>     manifest JSON, byte-exact
    │       (`zreg serve` stores a manifest pushed by digest only under the tag
    │        `sha256-<hex>` of its own digest, so gc and verify see it like any model)
    ├── indexes/
    │   └── <host>/<namespace>/<model>/<tag>     image indexes pushed to `zreg serve` (they name
    │                                manifests, not blobs, so they are kept apart from models)
    ├── uploads/
    │   └── <session id>/{data,state.json}       a `zreg serve` blob upload in progress; purged by age
    └── .zreg.lock                   writers hold it shared, gc exclusive

Helpers here compute paths; they create nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from .digest import check_digest
from .errors import StoreError
from .names import ModelName

TEMP_PREFIX = ".tmp-"
PARTIAL_PREFIX = ".partial-"


def default_root() -> Path:
    return Path(os.environ.get("ZREG_MODELS") or Path.home() / ".zreg" / "models")


class Layout:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def lock_file(self) -> Path:
        return self.root / ".zreg.lock"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    def upload(self, session_id: str) -> Path:
        """The folder of one upload session (ids are hex, made by the server)."""
        if not (session_id.isascii() and session_id.isalnum()):
            raise StoreError(f"invalid upload session id {session_id!r}")
        return self.uploads / session_id

    @property
    def indexes(self) -> Path:
        return self.root / "indexes"

    def index(self, name: ModelName) -> Path:
        return self.indexes / name.host / name.namespace / name.model / name.tag

    def blob(self, digest: str) -> Path:
        """`sha256:<hex>` -> blobs/sha256-<hex>."""
        check_digest(digest)
        return self.blobs / digest.replace(":", "-", 1)

    def partial(self, digest: str) -> Path:
        """Where a download of `digest` accumulates until it is verified."""
        check_digest(digest)
        return self.blobs / f"{PARTIAL_PREFIX}{digest.replace(':', '-', 1)}"

    def manifest(self, name: ModelName) -> Path:
        path = self.manifests / name.host / name.namespace / name.model / name.tag
        # The name grammar already forbids escapes; this guards against a future grammar change.
        if not path.resolve().is_relative_to(self.manifests.resolve()):
            raise StoreError(f"model name {name} would escape the store at {self.root}")
        return path

    @staticmethod
    def digest_of_blob_file(path: Path) -> str | None:
        """blobs/sha256-<hex> -> `sha256:<hex>`; None for files that are not blobs."""
        name = path.name
        if not name.startswith("sha256-"):
            return None
        digest = "sha256:" + name[len("sha256-"):]
        try:
            check_digest(digest)
        except Exception:
            return None
        return digest
