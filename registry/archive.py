"""Air-gapped transfer: `zreg save NAME -o FILE` and `zreg load FILE`.

The archive is an OCI image layout in a tar (zstd-compressed when FILE ends in `.zst`):
`oci-layout`, `index.json`, `blobs/sha256/<hex>`, holding the model's OCI form (ocimodel.py),
so `skopeo copy oci-archive:FILE:TAG ...` reads the uncompressed form. Both directions stream:
a blob is never held in memory (except small JSON documents `load` must read first).

`load` checks every blob's sha256 as it streams into the store (a blob already there is
skipped), and writes the manifest last, once every blob it names is present.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import tarfile
from pathlib import Path

import zstandard

from .digest import check_digest, sha256_bytes
from .errors import FormatError, ZregError
from .manifest import MAX_MANIFEST_BYTES, Manifest
from .names import ModelName, parse_name
from .ocimodel import OCI_MANIFEST, from_oci, is_zreg_oci, to_oci
from .store import Store, fsync_dir

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
REF_NAME = "org.opencontainers.image.ref.name"
MODEL_NAME = "dev.zreg.model.name"
COPY_BUFFER = 8 << 20


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # fixed metadata: the same model, the same tar
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_member(name, len(data)), io.BytesIO(data))


def save_model(store: Store, name: ModelName, out: Path) -> tuple[int, int]:
    """Write the archive (temp file, then rename). Returns (blobs, bytes of blob data)."""
    name, manifest, data = store.resolve(name)
    oci_bytes, config_bytes = to_oci(data, store.config(manifest), name.repository, name.tag)
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": sha256_bytes(oci_bytes), "size": len(oci_bytes),
        "annotations": {REF_NAME: name.tag, MODEL_NAME: name.short()}}]}
    out = Path(out)
    temp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    descriptors = list({d.digest: d for d in [manifest.config, *manifest.layers]}.values())
    total = 0
    try:
        with open(temp, "wb") as raw:
            compressor = zstandard.ZstdCompressor(level=3, threads=-1) if out.name.endswith(".zst") else None
            sink = compressor.stream_writer(raw, closefd=False) if compressor else raw
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT,
                              copybufsize=COPY_BUFFER) as tar:
                _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
                # The small documents first, so `load` knows what to expect before the blobs.
                _add_bytes(tar, "index.json", json.dumps(index, separators=(",", ":")).encode())
                for doc in (oci_bytes, config_bytes):
                    _add_bytes(tar, f"blobs/sha256/{sha256_bytes(doc)[7:]}", doc)
                for desc in descriptors:
                    path = store.blobs.path(desc.digest)
                    with open(path, "rb") as f:
                        tar.addfile(_member(f"blobs/sha256/{desc.digest[7:]}", desc.size), f)
                    total += desc.size
            if compressor:
                sink.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temp, out)
        fsync_dir(out.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return len(descriptors), total


class _Source:
    """The archive as a stream, decompressing zstd when the file starts with its magic."""

    def __init__(self, path: Path):
        self.file = open(path, "rb")
        magic = self.file.read(4)
        self.file.seek(0)
        self.stream = (zstandard.ZstdDecompressor().stream_reader(self.file, read_size=COPY_BUFFER)
                       if magic == ZSTD_MAGIC else self.file)

    def close(self):
        self.file.close()


def load_model(store: Store, path: Path, name: ModelName | None = None) -> tuple[ModelName, int, int]:
    """Load an archive. Returns (name, blobs stored, blobs the store had already)."""
    path = Path(path)
    if not path.is_file():
        raise ZregError(f"{path}: no such archive")
    docs: dict[str, bytes] = {}     # small JSON blobs, kept until index.json says what they are
    stored = skipped = 0
    index = None
    source = _Source(path)
    try:
        with store.lock(), tarfile.open(fileobj=source.stream, mode="r|", copybufsize=COPY_BUFFER) as tar:
            for member in tar:
                if member.name in ("index.json", "./index.json"):
                    try:
                        index = json.loads(tar.extractfile(member).read())
                    except ValueError as e:
                        raise FormatError(f"{path}: index.json is not valid JSON ({e})") from None
                    continue
                parts = member.name.lstrip("./").split("/")
                if not member.isfile() or len(parts) != 3 or parts[:2] != ["blobs", "sha256"]:
                    continue
                digest = check_digest("sha256:" + parts[2])
                if store.blobs.has(digest, member.size):
                    skipped += 1
                    continue
                f = tar.extractfile(member)
                first = f.read(1)
                if member.size <= MAX_MANIFEST_BYTES and first == b"{":
                    # Maybe the manifest or a config: held until index.json says what it is.
                    doc = first + f.read(member.size)
                    if sha256_bytes(doc) != digest:
                        raise FormatError(f"{path}: blob {digest} is corrupt (its content hashes differently)")
                    docs[digest] = doc
                    continue
                with store.blobs.writer() as writer:
                    writer.write(first)
                    while chunk := f.read(COPY_BUFFER):
                        writer.write(chunk)
                    try:
                        writer.commit(expected_digest=digest)
                    except ZregError:
                        raise FormatError(f"{path}: blob {digest} is corrupt (its content hashes differently)") from None
                stored += 1
            if index is None:
                raise FormatError(f"{path}: not an OCI image layout archive (no index.json)")
            entry = index.get("manifests", [{}])[0]
            oci_bytes = docs.get(entry.get("digest", ""))
            if oci_bytes is None:
                raise FormatError(f"{path}: index.json names manifest {entry.get('digest')!r}, which is not in the archive")
            local = from_oci(oci_bytes) if is_zreg_oci(oci_bytes) else oci_bytes
            manifest = Manifest.from_bytes(local, str(path))
            if name is None:
                label = (entry.get("annotations") or {}).get(MODEL_NAME)
                if not label:
                    raise ZregError(f"{path}: the archive does not name its model; pass --name")
                name = parse_name(label)
            for desc in [manifest.config, *manifest.layers]:
                if store.blobs.has(desc.digest, desc.size):
                    continue
                if desc.digest in docs:
                    store.blobs.put_bytes(docs.pop(desc.digest))
                    stored += 1
                    continue
                raise FormatError(f"{path}: blob {desc.digest} ({desc.name or 'config'}) is missing from the archive")
            store.blobs.sync()
            store.manifests.write_bytes(name, local)
    except tarfile.TarError as e:
        raise FormatError(f"{path}: damaged archive ({e})") from None
    except zstandard.ZstdError as e:
        raise FormatError(f"{path}: damaged zstd stream ({e})") from None
    finally:
        source.close()
    return name, stored, skipped
