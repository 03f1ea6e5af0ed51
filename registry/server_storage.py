"""The registry's view of the store: OCI repositories, references and blobs over zreg's layout.

Mapping (H = the one host `zreg serve` serves, `--host-name`, default the store's default host,
so a model created locally as `tiny` is `library/tiny:latest` on the registry):

    repository `namespace/model`, tag T   <->  manifests/H/namespace/model/T   (a model, as `zreg create` writes it)
    image manifest pushed by digest only   ->  manifests/H/namespace/model/sha256-<hex>
    image index (names manifests, no blobs) -> indexes/H/namespace/model/<tag or sha256-hex>
    blob <digest> of any repository        <->  blobs/sha256-<hex>  (one global content-addressed store)

A manifest pushed by digest lives in the models tree under the tag `sha256-<hex>` of its own
digest, so `zreg gc` keeps its blobs and `zreg verify` checks it like any model; tags/list hides
such entries (a tag whose bytes hash to its own name cannot come from anything else). A GET by
digest tries that entry, then hashes the repository's tags (hashes are cached by inode, mtime
and size). Image indexes are kept out of manifests/ because `zreg list`/`gc`/`verify` read
every file there as a model manifest; they reference manifests, never blobs, so gc needs no
word of them.

Locks: a manifest PUT or DELETE holds the store lock shared (as `zreg create` does), so gc never
runs between "its blobs are here" and "the manifest is written"; a blob DELETE holds it
exclusively (as gc does) and refuses a blob any manifest of the store still names.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .digest import sha256_bytes
from .errors import FormatError, InvalidName, ModelNotFound, ZregError
from .maintenance import referenced_digests
from .manifest import MANIFEST_V2, MAX_MANIFEST_BYTES, Manifest
from .names import DEFAULT_TAG, ModelName, parse_name
from .store import Store, fsync_dir, write_atomic
from .uploads import DigestInvalid, valid_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = (MANIFEST_V2, OCI_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)

_DIGEST_TAG = re.compile(r"sha256-[a-f0-9]{64}")
_REPOSITORY_CHARS = re.compile(r"[a-z0-9._/-]+")


class _Detailed(ZregError):
    def __init__(self, message: str, detail=None):
        super().__init__(message)
        self.detail = detail


class RepositoryUnknown(_Detailed):
    pass


class ManifestUnknown(ModelNotFound):
    pass


class ManifestInvalid(_Detailed, FormatError):
    pass


class ManifestTooLarge(_Detailed):
    pass


class ManifestBlobUnknown(_Detailed):
    pass


def manifest_too_large(size: int) -> ManifestTooLarge:
    return ManifestTooLarge(f"manifest is {size} bytes, over the {MAX_MANIFEST_BYTES} limit",
                            {"size": size, "limit": MAX_MANIFEST_BYTES})


class BlobUnknown(_Detailed):
    pass


class BlobInUse(_Detailed):
    pass


@dataclass(frozen=True)
class Info:
    """What the server needs to know of one stored manifest without reading it again."""
    digest: str
    size: int
    media_type: str
    subject: str | None = None
    artifact_type: str | None = None
    annotations: dict | None = None

    def descriptor(self) -> dict:
        desc = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            desc["artifactType"] = self.artifact_type
        if self.annotations:
            desc["annotations"] = self.annotations
        return desc


def describe(data: bytes) -> Info:
    """Digest, media type, subject and artifact type of manifest bytes (tolerant: stored
    files are served as they are, even ones this server would not accept today)."""
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return Info(sha256_bytes(data), len(data), MANIFEST_V2)
    media_type = doc.get("mediaType")
    if not isinstance(media_type, str):
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    subject = doc.get("subject")
    subject = subject.get("digest") if isinstance(subject, dict) else None
    artifact_type = doc.get("artifactType")
    if not isinstance(artifact_type, str):
        config = doc.get("config")
        artifact_type = config.get("mediaType") if isinstance(config, dict) else None
    annotations = doc.get("annotations") if isinstance(doc.get("annotations"), dict) else None
    return Info(sha256_bytes(data), len(data), media_type, subject, artifact_type, annotations)


class _Tree:
    """One `<host>/<namespace>/<model>/<tag>` tree of manifest files: manifests/ or indexes/."""

    def __init__(self, root: Path, path_of):
        self.root = root
        self.path = path_of  # ModelName -> Path, from the store's Layout

    def tags(self, name: ModelName) -> list[str]:
        folder = self.path(name).parent
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [e.name for e in entries if e.is_file() and not e.name.startswith(".") and _is_tag(e.name)]

    def repositories(self, host: str) -> set[str]:
        found = set()
        for folder in self.root.glob(f"{host}/*/*"):  # a valid host holds no glob characters
            if folder.is_dir() and any(not e.name.startswith(".") for e in os.scandir(folder)):
                found.add(f"{folder.parent.name}/{folder.name}")
        return found

    def write(self, name: ModelName, data: bytes) -> None:
        write_atomic(self.path(name), data)

    def delete(self, name: ModelName) -> bool:
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        for parent in list(path.parents)[:3]:  # model, namespace, host folders left empty
            try:
                parent.rmdir()
            except OSError:
                break
        return True


def _is_tag(text: str) -> bool:
    """The store's tag grammar (names.py), asked through ModelName so it stays in one place."""
    try:
        ModelName("h", "n", "m", DEFAULT_TAG).with_tag(text)
        return True
    except InvalidName:
        return False


class RegistryStorage:
    def __init__(self, store: Store, host: str):
        try:
            valid = parse_name(f"{host}/n/m").host == host
        except InvalidName:
            valid = False
        if not valid:
            raise InvalidName(f"host name {host!r} must hold a dot or a colon or be localhost "
                              "(the store's rule for telling a host from a namespace)")
        self.store = store
        self.host = host
        layout = store.layout
        self.models = _Tree(layout.manifests, layout.manifest)
        self.indexes = _Tree(layout.indexes, layout.index)
        self._infos: dict[Path, tuple[tuple, Info]] = {}  # path -> (stat key, info)

    # --- names ---------------------------------------------------------------------------

    def name(self, repository: str, tag: str = DEFAULT_TAG) -> ModelName:
        """The store name for a repository path; NAME_INVALID unless it is `namespace/model`."""
        if not _REPOSITORY_CHARS.fullmatch(repository or "") or repository.count("/") != 1:
            raise InvalidName(f"invalid repository name {repository!r}: zreg serves `namespace/model` "
                              "names (one namespace level, lowercase letters, digits and . _ -)")
        name = parse_name(f"{self.host}/{repository}")
        return name.with_tag(tag)

    # --- manifests -----------------------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, Info]:
        name = self.name(repository)
        if ":" in reference:
            digest = valid_digest(reference)
            for _, entry, path in self._find(name, digest):
                data, info = self._read(path)
                if info.digest == digest:  # it may have been replaced since we hashed it
                    return data, info
        elif _is_tag(reference):
            entry = name.with_tag(reference)
            for tree in (self.models, self.indexes):
                try:
                    return self._read(tree.path(entry))
                except (FileNotFoundError, NotADirectoryError):
                    continue
        raise self._unknown(name, reference)

    def put_manifest(self, repository: str, reference: str, data: bytes,
                     content_type: str | None) -> Info:
        """Validate and store `data` byte for byte under a tag, or under its digest."""
        name = self.name(repository)
        if len(data) > MAX_MANIFEST_BYTES:
            raise manifest_too_large(len(data))
        info = describe(data)
        if ":" in reference:
            if valid_digest(reference) != info.digest:
                raise DigestInvalid(f"manifest bytes hash to {info.digest}, not {reference}")
            tag = "sha256-" + info.digest.split(":", 1)[1]
        elif _is_tag(reference):
            tag = reference
        else:
            raise ManifestInvalid(f"invalid tag {reference!r}: up to 128 of letters, digits, '_', '.', '-', "
                                  "not starting with '.' or '-'", {"tag": reference})
        kind, doc = _validate(data, content_type)
        entry = name.with_tag(tag)
        target, other = (self.models, self.indexes) if kind == "image" else (self.indexes, self.models)
        with self.store.lock():
            if kind == "image":
                self._check_blobs(Manifest.from_bytes(data, f"manifest {repository}:{reference}"))
            else:
                self._check_children(name, doc)
            path = target.path(entry)
            if not (path.is_file() and path.read_bytes() == data):  # a re-push of the same bytes writes nothing
                target.write(entry, data)
            other.delete(entry)  # a tag names one thing: drop it from the other tree
        return info

    def delete_manifest(self, repository: str, reference: str) -> None:
        """By digest: the manifest and every tag naming it. By tag: that tag only.
        Blobs stay (other models may share them); `zreg gc` removes the unreferenced ones."""
        name = self.name(repository)
        with self.store.lock():
            if ":" in reference:
                found = self._find(name, valid_digest(reference))
                for tree, entry, _ in found:
                    tree.delete(entry)
                if found:
                    return
            elif _is_tag(reference):
                entry = name.with_tag(reference)
                if any([tree.delete(entry) for tree in (self.models, self.indexes)]):  # a list: try both
                    return
        raise self._unknown(name, reference)

    def tags(self, repository: str) -> list[str]:
        name = self.name(repository)
        entries = [(tree, tag) for tree in (self.models, self.indexes) for tag in tree.tags(name)]
        if not entries:
            raise RepositoryUnknown(f"repository {repository!r} not known to this registry",
                                    {"name": repository})
        return sorted({tag for tree, tag in entries if not self._is_digest_entry(tree, name.with_tag(tag))})

    def catalog(self) -> list[str]:
        return sorted(self.models.repositories(self.host) | self.indexes.repositories(self.host))

    def referrers(self, repository: str, digest: str, artifact_type: str | None) -> list[dict]:
        """Descriptors of the repository's manifests whose `subject` is `digest`."""
        name = self.name(repository)
        valid_digest(digest)
        found = {}
        for _, _, path in self._entries(name):
            info = self._info(path)
            if info and info.subject == digest and (artifact_type is None or info.artifact_type == artifact_type):
                found[info.digest] = info.descriptor()
        return [found[d] for d in sorted(found)]

    # --- blobs ---------------------------------------------------------------------------

    def blob(self, repository: str, digest: str) -> tuple[Path, int]:
        """Path and size of a blob. Blobs are global: any valid repository sees every blob."""
        self.name(repository)
        path = self.store.blobs.path(valid_digest(digest))
        try:
            return path, path.stat().st_size
        except FileNotFoundError:
            raise BlobUnknown(f"blob {digest} not in this registry", {"digest": digest}) from None

    def has_blob(self, digest: str) -> bool:
        return self.store.blobs.has(valid_digest(digest))

    def delete_blob(self, repository: str, digest: str) -> None:
        """Delete a blob no manifest of the store names; refuse one still in use (a model
        pointing at a deleted blob would be broken)."""
        self.name(repository)
        valid_digest(digest)
        with self.store.lock(exclusive=True):  # as gc: no writer is between storing and naming a blob
            if not self.store.blobs.has(digest):
                raise BlobUnknown(f"blob {digest} not in this registry", {"digest": digest})
            try:
                in_use = digest in referenced_digests(self.store)
            except ZregError as e:
                raise BlobInUse(f"cannot tell whether blob {digest} is in use: {e}") from None
            if in_use:
                raise BlobInUse(f"blob {digest} is used by a manifest in the store; delete the manifests "
                                "that name it first (their unreferenced blobs then go with `zreg gc`)",
                                {"digest": digest})
            self.store.blobs.path(digest).unlink(missing_ok=True)
            self.store.blobs.sync()

    # --- helpers -------------------------------------------------------------------------

    def _read(self, path: Path) -> tuple[bytes, Info]:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        info = describe(data)
        self._infos[path] = ((st.st_ino, st.st_mtime_ns, st.st_size), info)
        return data, info

    def _info(self, path: Path) -> Info | None:
        try:
            st = path.stat()
            cached = self._infos.get(path)
            if cached and cached[0] == (st.st_ino, st.st_mtime_ns, st.st_size):
                return cached[1]
            return self._read(path)[1]
        except OSError:
            return None

    def _entries(self, name: ModelName):
        """(tree, name with tag, path) for every manifest of the repository."""
        for tree in (self.models, self.indexes):
            for tag in tree.tags(name):
                entry = name.with_tag(tag)
                yield tree, entry, tree.path(entry)

    def _find(self, name: ModelName, digest: str) -> list:
        found = []
        for tree, entry, path in self._entries(name):
            info = self._info(path)
            if info and info.digest == digest:
                found.append((tree, entry, path))
        return found

    def _is_digest_entry(self, tree: _Tree, entry: ModelName) -> bool:
        if not _DIGEST_TAG.fullmatch(entry.tag):
            return False
        info = self._info(tree.path(entry))
        return info is not None and info.digest == "sha256:" + entry.tag[len("sha256-"):]

    def _unknown(self, name: ModelName, reference: str) -> ZregError:
        if not any(True for _ in self._entries(name)):
            return RepositoryUnknown(f"repository {name.repository!r} not known to this registry",
                                     {"name": name.repository})
        return ManifestUnknown(f"manifest {name.repository}:{reference} not found")

    def _check_blobs(self, manifest: Manifest) -> None:
        missing = []
        for desc in [manifest.config, *manifest.layers]:
            try:
                path = self.store.blobs.path(valid_digest(desc.digest))
            except DigestInvalid as e:
                raise ManifestInvalid(f"manifest names {e}") from None
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                missing.append(desc.digest)
                continue
            if size != desc.size:
                raise ManifestInvalid(f"manifest says blob {desc.digest} has {desc.size} bytes; it has {size}",
                                      {"digest": desc.digest, "size": size})
        if missing:
            raise ManifestBlobUnknown(f"manifest names {len(missing)} blob(s) this registry does not have "
                                      f"(first {missing[0]}); push the blobs first", {"digest": missing[0]})

    def _check_children(self, name: ModelName, doc: dict) -> None:
        for child in doc["manifests"]:
            if not self._find(name, child["digest"]):
                raise ManifestBlobUnknown(f"index names manifest {child['digest']}, which is not in "
                                          f"{name.repository}; push it first", {"digest": child["digest"]})


def _validate(data: bytes, content_type: str | None) -> tuple[str, dict]:
    """("image" | "index", parsed JSON) for a manifest this registry accepts; ManifestInvalid else."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ManifestInvalid(f"manifest is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("manifest mediaType is not a string")
    sent = (content_type or "").split(";", 1)[0].strip() or None
    known = IMAGE_TYPES + INDEX_TYPES
    if declared and sent in known and sent != declared:
        raise ManifestInvalid(f"Content-Type is {sent} but the manifest's mediaType is {declared}")
    media_type = declared or (sent if sent in known else None) or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid("manifest schemaVersion must be 2 (schema 1 is not supported)")
    if isinstance(doc.get("subject"), dict):
        _check_descriptor(doc["subject"], "subject")
    if media_type in IMAGE_TYPES:
        try:
            Manifest.from_bytes(data, "manifest")
        except FormatError as e:
            raise ManifestInvalid(str(e)) from None
        return "image", doc
    if media_type in INDEX_TYPES:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise ManifestInvalid("image index has no `manifests` list")
        for i, child in enumerate(children):
            _check_descriptor(child, f"manifests.{i}")
        return "index", doc
    raise ManifestInvalid(f"unsupported manifest media type {media_type!r} (accepted: {', '.join(known)})")


def _check_descriptor(desc, where: str) -> None:
    if not isinstance(desc, dict) or not isinstance(desc.get("mediaType"), str) \
            or not isinstance(desc.get("size"), int) or desc["size"] < 0:
        raise ManifestInvalid(f"manifest {where}: a descriptor needs mediaType, digest and size")
    try:
        valid_digest(desc.get("digest"))
    except DigestInvalid as e:
        raise ManifestInvalid(f"manifest {where}: {e}") from None
