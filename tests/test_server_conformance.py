"""`zreg serve` against the OCI distribution spec, endpoint by endpoint (ids end-1..end-13 as in
the spec's table): status codes, headers, error codes, Range, chunked uploads, mount, paging,
deletes and auth. Each test runs its own server on a free 127.0.0.1 port."""

from __future__ import annotations

import hashlib
import json
import time

import bcrypt
import pytest
import requests

from zreg.registry import oci_paths
from zreg.registry.htpasswd import Htpasswd
from zreg.registry.manifest import MANIFEST_V2, MAX_MANIFEST_BYTES
from zreg.registry.names import parse_name
from zreg.registry.server import BackgroundServer, make_app
from zreg.registry.uploads import Uploads

USER, PASSWORD = "alice", "s3cret"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REPO = "team/model"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """A running server and a requests session (with credentials unless anonymous)."""

    def __init__(self, server: BackgroundServer, auth=(USER, PASSWORD)):
        self.server = server
        self.http = requests.Session()
        self.http.auth = auth

    def url(self, path: str) -> str:
        return self.server.url + path if path.startswith("/") else path

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("allow_redirects", False)
        return self.http.request(method, self.url(path), **kwargs)

    def anonymous(self) -> "Registry":
        return Registry(self.server, auth=None)

    # Pushing, the way a client would.
    def push_blob(self, data: bytes, repo: str = REPO) -> str:
        digest = digest_of(data)
        r = self.request("POST", oci_paths.uploads(repo, digest=digest), data=data)
        assert r.status_code == 201, r.text
        return digest

    def push_manifest(self, data: bytes, reference: str = "latest", repo: str = REPO,
                      media_type: str = MANIFEST_V2) -> requests.Response:
        return self.request("PUT", oci_paths.manifest(repo, reference), data=data,
                            headers={"Content-Type": media_type})

    def push_image(self, tag: str = "latest", repo: str = REPO, seed: str = "a",
                   media_type: str = MANIFEST_V2) -> bytes:
        """Two layers and a config, all pushed; returns the manifest bytes (pushed under tag)."""
        config = json.dumps({"model_format": "safetensors", "seed": seed}).encode()
        layers = [f"layer-1-{seed}".encode(), f"layer-2-{seed}".encode() * 100]
        manifest = make_manifest(config, layers, media_type)
        for blob in [config, *layers]:
            self.push_blob(blob, repo)
        r = self.push_manifest(manifest, tag, repo, media_type)
        assert r.status_code == 201, r.text
        return manifest


def make_manifest(config: bytes, layers: list[bytes], media_type: str = MANIFEST_V2, **extra) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": media_type,
           "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                      "digest": digest_of(config), "size": len(config)},
           "layers": [{"mediaType": "application/vnd.zreg.image.file", "digest": digest_of(blob),
                       "size": len(blob), "name": f"file{i}"} for i, blob in enumerate(layers)]}
    doc.update(extra)
    return json.dumps(doc, indent=1).encode()  # not compact, so byte-exact storage is tested


def error_code(r: requests.Response) -> str:
    body = r.json()
    assert set(body["errors"][0]) >= {"code", "message", "detail"}
    return body["errors"][0]["code"]


@pytest.fixture(scope="module")
def htpasswd_line() -> str:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    return f"{USER}:$2y${hashed[4:]}\n"  # `htpasswd -B` writes the $2y$ prefix


def start(store, **options) -> BackgroundServer:
    return BackgroundServer(make_app(store, **options)).start()


@pytest.fixture
def registry(store, tmp_path, htpasswd_line):
    """Push allowed for alice (bcrypt htpasswd), pulls open."""
    path = tmp_path / "htpasswd"
    path.write_text("# users\nbob:$apr1$notbcrypt$xxxxxxxxxxxxxxxxxxxxxx\n" + htpasswd_line)
    server = start(store, htpasswd=Htpasswd(path))
    yield Registry(server)
    server.stop()


@pytest.fixture
def read_only(store):
    server = start(store)
    yield Registry(server, auth=None)
    server.stop()


# --- end-1: GET /v2/ ----------------------------------------------------------------------------

def test_end1_base_read_only(read_only):
    r = read_only.request("GET", "/v2/")
    assert r.status_code == 200 and r.json() == {}
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_end1_base_challenges_when_credentials_exist(registry):
    r = registry.anonymous().request("GET", "/v2/")
    assert r.status_code == 401 and error_code(r) == "UNAUTHORIZED"
    assert r.headers["WWW-Authenticate"] == 'Basic realm="zreg"'
    assert registry.request("GET", "/v2/").status_code == 200
    r = registry.request("GET", "/v2/", auth=(USER, "wrong"))
    assert r.status_code == 401 and error_code(r) == "UNAUTHORIZED"
    r = registry.request("GET", "/v2/", auth=("bob", "anything"))  # non-bcrypt entries are ignored
    assert r.status_code == 401


# --- end-2: GET/HEAD blobs ------------------------------------------------------------------------

def test_end2_blob_get_head_and_range(registry):
    data = bytes(range(256)) * 40
    digest = registry.push_blob(data)
    r = registry.anonymous().request("HEAD", oci_paths.blob(REPO, digest))
    assert r.status_code == 200 and r.content == b""
    assert r.headers["Content-Length"] == str(len(data)) and r.headers["Docker-Content-Digest"] == digest
    r = registry.anonymous().request("GET", oci_paths.blob(REPO, digest))
    assert r.status_code == 200 and r.content == data and r.headers["Docker-Content-Digest"] == digest
    r = registry.request("GET", oci_paths.blob(REPO, digest), headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    r = registry.request("GET", oci_paths.blob(REPO, digest), headers={"Range": "bytes=10000-"})
    assert r.status_code == 206 and r.content == data[10000:]
    r = registry.request("GET", oci_paths.blob(REPO, digest), headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416


def test_end2_blobs_are_global_to_valid_repositories(registry):
    digest = registry.push_blob(b"shared bytes")
    for repo in ("other/repo", "library/x"):
        r = registry.request("HEAD", oci_paths.blob(repo, digest))
        assert r.status_code == 200


def test_end2_blob_errors(registry):
    missing = digest_of(b"never pushed")
    r = registry.request("GET", oci_paths.blob(REPO, missing))
    assert r.status_code == 404 and error_code(r) == "BLOB_UNKNOWN"
    assert registry.request("HEAD", oci_paths.blob(REPO, missing)).status_code == 404
    for bad in ("sha256:1234", "sha512:" + "a" * 128, "sha256:" + "A" * 64):
        r = registry.request("GET", oci_paths.blob(REPO, bad))
        assert r.status_code == 400 and error_code(r) == "DIGEST_INVALID", bad


# --- end-3: GET/HEAD manifests --------------------------------------------------------------------

def test_end3_manifest_by_tag_and_digest(registry):
    manifest = registry.push_image()
    digest = digest_of(manifest)
    for reference in ("latest", digest):
        r = registry.anonymous().request("GET", oci_paths.manifest(REPO, reference),
                                         headers={"Accept": MANIFEST_V2})
        assert r.status_code == 200 and r.content == manifest
        assert r.headers["Content-Type"] == MANIFEST_V2 and r.headers["Docker-Content-Digest"] == digest
        r = registry.request("HEAD", oci_paths.manifest(REPO, reference))
        assert r.status_code == 200 and r.content == b""
        assert r.headers["Content-Length"] == str(len(manifest)) and r.headers["Docker-Content-Digest"] == digest


def test_end3_manifest_unknown(registry):
    registry.push_image()
    r = registry.request("GET", oci_paths.manifest(REPO, "nope"))
    assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"
    r = registry.request("GET", oci_paths.manifest(REPO, digest_of(b"x")))
    assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"
    r = registry.request("GET", oci_paths.manifest("no/such", "latest"))
    assert r.status_code == 404 and error_code(r) == "NAME_UNKNOWN"


@pytest.mark.parametrize("name", ["tiny", "a/b/c", "Team/model", "team/Model", "team/-x", "team/a..b", "team/a:b"])
def test_invalid_repository_names(registry, name):
    for method, path in [("GET", oci_paths.manifest(name, "latest")), ("GET", oci_paths.tags(name)),
                         ("HEAD", oci_paths.blob(name, digest_of(b"x"))), ("POST", oci_paths.uploads(name)),
                         ("PUT", oci_paths.manifest(name, "latest"))]:
        r = registry.request(method, path, data=b"{}")
        assert r.status_code == 400, (method, path)
        if method != "HEAD":
            assert error_code(r) == "NAME_INVALID"


# --- end-4a/4b, 5, 6, 13: uploads -----------------------------------------------------------------

def test_end4a_start_upload(registry):
    r = registry.request("POST", oci_paths.uploads(REPO))
    assert r.status_code == 202
    assert r.headers["Location"].startswith(f"/v2/{REPO}/blobs/uploads/")
    assert r.headers["Docker-Upload-UUID"] in r.headers["Location"]
    assert r.headers["Range"] == "0-0"


def test_end4b_single_shot_upload(registry, store):
    data = b"single shot" * 1000
    digest = digest_of(data)
    r = registry.request("POST", oci_paths.uploads(REPO, digest=digest), data=data)
    assert r.status_code == 201
    assert r.headers["Location"] == oci_paths.blob(REPO, digest) and r.headers["Docker-Content-Digest"] == digest
    assert store.blobs.path(digest).read_bytes() == data
    r = registry.request("POST", oci_paths.uploads(REPO, digest=digest_of(b"other")), data=data)
    assert r.status_code == 400 and error_code(r) == "DIGEST_INVALID"
    assert not store.blobs.has(digest_of(b"other"))
    r = registry.request("POST", oci_paths.uploads(REPO, digest="sha256:nothex"), data=data)
    assert r.status_code == 400 and error_code(r) == "DIGEST_INVALID"


def test_end5_end6_chunked_upload_with_content_range(registry, store):
    data = bytes(range(256)) * 1000
    r = registry.request("POST", oci_paths.uploads(REPO))
    location = r.headers["Location"]
    chunks = [(0, 99_999), (100_000, 200_000), (200_001, len(data) - 1)]
    for start, end in chunks:
        r = registry.request("PATCH", location, data=data[start:end + 1],
                             headers={"Content-Range": f"{start}-{end}", "Content-Type": "application/octet-stream"})
        assert r.status_code == 202, r.text
        assert r.headers["Range"] == f"0-{end}"
        location = r.headers["Location"]
        # end-13: the status says how far the upload got
        r = registry.request("GET", location)
        assert r.status_code == 204 and r.headers["Range"] == f"0-{end}"
    digest = digest_of(data)
    r = registry.request("PUT", location + f"?digest={digest}")
    assert r.status_code == 201 and r.headers["Location"] == oci_paths.blob(REPO, digest)
    assert r.headers["Docker-Content-Digest"] == digest
    assert store.blobs.path(digest).read_bytes() == data
    assert registry.request("GET", location).status_code == 404  # the session is gone
    assert not any(Uploads(store).dir.iterdir())


def test_end5_streamed_patches_and_last_chunk_on_put(registry, store):
    data = b"0123456789" * 5000
    location = registry.request("POST", oci_paths.uploads(REPO)).headers["Location"]
    r = registry.request("PATCH", location, data=iter([data[:1000], data[1000:20000]]))  # chunked transfer
    assert r.status_code == 202 and r.headers["Range"] == "0-19999"
    r = registry.request("PATCH", r.headers["Location"], data=data[20000:30000])
    assert r.headers["Range"] == "0-29999"
    digest = digest_of(data)
    r = registry.request("PUT", r.headers["Location"] + f"?digest={digest}", data=data[30000:],
                         headers={"Content-Range": f"30000-{len(data) - 1}"})
    assert r.status_code == 201
    assert store.blobs.path(digest).read_bytes() == data


def test_end5_out_of_order_chunk_is_416(registry):
    location = registry.request("POST", oci_paths.uploads(REPO)).headers["Location"]
    registry.request("PATCH", location, data=b"a" * 10, headers={"Content-Range": "0-9"})
    for bad_range in ("20-29", "0-9", "5-14"):
        r = registry.request("PATCH", location, data=b"b" * 10, headers={"Content-Range": bad_range})
        assert r.status_code == 416 and error_code(r) == "BLOB_UPLOAD_INVALID"
        assert r.headers["Range"] == "0-9" and r.headers["Location"] == location
    r = registry.request("PATCH", location, data=b"b" * 10, headers={"Content-Range": "10-19"})
    assert r.status_code == 202 and r.headers["Range"] == "0-19"


def test_end5_body_disagreeing_with_content_range(registry):
    location = registry.request("POST", oci_paths.uploads(REPO)).headers["Location"]
    r = registry.request("PATCH", location, data=b"abc", headers={"Content-Range": "0-9"})
    assert r.status_code == 400 and error_code(r) == "BLOB_UPLOAD_INVALID"
    r = registry.request("PATCH", location, data=iter([b"abc"]), headers={"Content-Range": "0-9"})
    assert r.status_code == 400 and error_code(r) == "BLOB_UPLOAD_INVALID"
    assert registry.request("GET", location).headers["Range"] == "0-0"  # the bad chunk was dropped
    r = registry.request("PATCH", location, data=b"abc", headers={"Content-Range": "bad"})
    assert r.status_code == 400 and error_code(r) == "BLOB_UPLOAD_INVALID"


def test_end6_monolithic_put_and_digest_mismatch(registry, store):
    data = b"monolithic"
    location = registry.request("POST", oci_paths.uploads(REPO)).headers["Location"]
    r = registry.request("PUT", location + f"?digest={digest_of(data)}", data=data,
                         headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201 and store.blobs.path(digest_of(data)).read_bytes() == data

    location = registry.request("POST", oci_paths.uploads(REPO)).headers["Location"]
    r = registry.request("PUT", location + f"?digest={digest_of(b'something else')}", data=data)
    assert r.status_code == 400 and error_code(r) == "DIGEST_INVALID"
    assert not store.blobs.has(digest_of(b"something else"))
    assert registry.request("GET", location).status_code == 404  # a session that cannot match is dropped

    location = registry.request("POST", oci_paths.uploads(REPO)).headers["Location"]
    r = registry.request("PUT", location, data=data)
    assert r.status_code == 400 and error_code(r) == "DIGEST_INVALID"


def test_end13_upload_status_and_cancel(registry):
    location = registry.request("POST", oci_paths.uploads(REPO)).headers["Location"]
    r = registry.request("GET", location)
    assert r.status_code == 204 and r.headers["Range"] == "0-0" and r.headers["Location"] == location
    assert registry.request("DELETE", location).status_code == 204
    r = registry.request("GET", location)
    assert r.status_code == 404 and error_code(r) == "BLOB_UPLOAD_UNKNOWN"
    r = registry.request("DELETE", location)
    assert r.status_code == 404 and error_code(r) == "BLOB_UPLOAD_UNKNOWN"
    for bad in ("nope", "a.b", "0123456789abcdef0123456789abcdef"):
        r = registry.request("GET", oci_paths.upload(REPO, bad))
        assert r.status_code == 404 and error_code(r) == "BLOB_UPLOAD_UNKNOWN"


def test_upload_session_belongs_to_its_repository(registry):
    session = registry.request("POST", oci_paths.uploads(REPO)).headers["Docker-Upload-UUID"]
    r = registry.request("PATCH", oci_paths.upload("other/repo", session), data=b"x")
    assert r.status_code == 404 and error_code(r) == "BLOB_UPLOAD_UNKNOWN"


def test_idle_upload_sessions_are_purged(registry, store):
    location = registry.request("POST", oci_paths.uploads(REPO)).headers["Location"]
    uploads = Uploads(store)
    assert uploads.purge(max_age=3600) == 0
    assert uploads.purge(max_age=3600, now=time.time() + 7200) == 1
    assert registry.request("GET", location).status_code == 404


# --- end-11: cross-repository mount ---------------------------------------------------------------

def test_end11_mount(registry):
    digest = registry.push_blob(b"mount me", repo="other/repo")
    r = registry.request("POST", oci_paths.uploads(REPO, mount=digest, **{"from": "other/repo"}))
    assert r.status_code == 201
    assert r.headers["Location"] == oci_paths.blob(REPO, digest) and r.headers["Docker-Content-Digest"] == digest
    r = registry.request("POST", oci_paths.uploads(REPO, mount=digest))  # no `from`: still found
    assert r.status_code == 201
    r = registry.request("POST", oci_paths.uploads(REPO, mount=digest_of(b"absent"), **{"from": "other/repo"}))
    assert r.status_code == 202 and "/blobs/uploads/" in r.headers["Location"]


# --- end-7: PUT manifests -------------------------------------------------------------------------

def test_end7_put_manifest_stores_exact_bytes(registry, store):
    manifest = registry.push_image()
    r = registry.push_manifest(manifest, "v1")
    digest = digest_of(manifest)
    assert r.status_code == 201
    assert r.headers["Location"] == oci_paths.manifest(REPO, digest) and r.headers["Docker-Content-Digest"] == digest
    host = parse_name("x").host
    assert store.manifests.read_bytes(parse_name(f"{host}/{REPO}:v1")) == manifest
    _, parsed, _ = store.resolve(f"{host}/{REPO}:latest")  # a zreg model like any other
    assert len(parsed.layers) == 2


def test_end7_oci_manifest_and_content_type(registry):
    manifest = registry.push_image(tag="oci", media_type=OCI_MANIFEST)
    r = registry.request("GET", oci_paths.manifest(REPO, "oci"))
    assert r.content == manifest and r.headers["Content-Type"] == OCI_MANIFEST
    r = registry.push_manifest(manifest, "mismatch", media_type=MANIFEST_V2)
    assert r.status_code == 400 and error_code(r) == "MANIFEST_INVALID"


def test_end7_manifest_errors(registry):
    config, layer = b"{}", b"layer"
    registry.push_blob(config)
    manifest = make_manifest(config, [layer])
    r = registry.push_manifest(manifest)
    assert r.status_code == 400 and error_code(r) == "MANIFEST_BLOB_UNKNOWN"
    assert r.json()["errors"][0]["detail"]["digest"] == digest_of(layer)
    registry.push_blob(layer)
    for bad in (b"not json", b"[]", b'{"schemaVersion": 1}', json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_V2,
                "config": {"mediaType": "x", "digest": "sha256:bad", "size": 2}, "layers": []}).encode()):
        r = registry.push_manifest(bad)
        assert r.status_code == 400 and error_code(r) == "MANIFEST_INVALID", bad
    wrong_size = json.loads(manifest)
    wrong_size["layers"][0]["size"] += 1
    r = registry.push_manifest(json.dumps(wrong_size).encode())
    assert r.status_code == 400 and error_code(r) == "MANIFEST_INVALID"
    r = registry.push_manifest(manifest, digest_of(manifest + b" "))
    assert r.status_code == 400 and error_code(r) == "DIGEST_INVALID"
    r = registry.push_manifest(manifest, ".bad-tag")
    assert r.status_code == 400 and error_code(r) == "MANIFEST_INVALID"
    assert registry.push_manifest(manifest).status_code == 201


def test_end7_oversized_manifest_is_413(registry):
    config = b"{}"
    registry.push_blob(config)
    doc = json.loads(make_manifest(config, []))
    doc["annotations"] = {"pad": "x" * MAX_MANIFEST_BYTES}
    r = registry.push_manifest(json.dumps(doc).encode())
    assert r.status_code == 413
    r = registry.push_manifest(iter([json.dumps(doc).encode()]))  # no Content-Length: capped while read
    assert r.status_code == 413
    doc["annotations"] = {"pad": "x" * (MAX_MANIFEST_BYTES - 1000)}  # just under the cap is fine
    data = json.dumps(doc).encode()
    assert len(data) <= MAX_MANIFEST_BYTES
    assert registry.push_manifest(data).status_code == 201


def test_end7_push_by_digest_and_image_index(registry):
    child = registry.push_image(tag="tmp", seed="b")
    child_digest = digest_of(child)
    registry.request("DELETE", oci_paths.manifest(REPO, "tmp"))
    r = registry.push_manifest(child, child_digest)
    assert r.status_code == 201 and r.headers["Docker-Content-Digest"] == child_digest
    r = registry.request("GET", oci_paths.manifest(REPO, child_digest))
    assert r.status_code == 200 and r.content == child
    assert registry.request("GET", oci_paths.tags(REPO)).json()["tags"] == []  # untagged stays untagged

    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": MANIFEST_V2, "digest": child_digest, "size": len(child)}]}).encode()
    r = registry.push_manifest(index, "multi", media_type=OCI_INDEX)
    assert r.status_code == 201, r.text
    r = registry.request("GET", oci_paths.manifest(REPO, "multi"))
    assert r.content == index and r.headers["Content-Type"] == OCI_INDEX
    assert registry.request("GET", oci_paths.manifest(REPO, digest_of(index))).content == index
    assert registry.request("GET", oci_paths.tags(REPO)).json()["tags"] == ["multi"]
    dangling = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": MANIFEST_V2, "digest": digest_of(b"nothing"), "size": 7}]}).encode()
    r = registry.push_manifest(dangling, "dangling", media_type=OCI_INDEX)
    assert r.status_code == 400 and error_code(r) == "MANIFEST_BLOB_UNKNOWN"


# --- end-12: referrers ----------------------------------------------------------------------------

def test_end12_referrers(registry):
    subject = registry.push_image()
    empty = registry.push_blob(b"{}")
    signature = registry.push_blob(b"signature")
    artifact = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x.sig",
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
                           "layers": [{"mediaType": "application/x.sig", "digest": signature, "size": 9}],
                           "subject": {"mediaType": MANIFEST_V2, "digest": digest_of(subject), "size": len(subject)},
                           "annotations": {"who": "alice"}}).encode()
    r = registry.push_manifest(artifact, digest_of(artifact), media_type=OCI_MANIFEST)
    assert r.status_code == 201 and r.headers["OCI-Subject"] == digest_of(subject)
    r = registry.request("GET", oci_paths.referrers(REPO, digest_of(subject)))
    assert r.status_code == 200 and r.headers["Content-Type"] == OCI_INDEX
    assert r.json()["manifests"] == [{"mediaType": OCI_MANIFEST, "digest": digest_of(artifact), "size": len(artifact),
                                      "artifactType": "application/x.sig", "annotations": {"who": "alice"}}]
    r = registry.request("GET", oci_paths.referrers(REPO, digest_of(subject)) + "?artifactType=application/x.other")
    assert r.json()["manifests"] == [] and r.headers["OCI-Filters-Applied"] == "artifactType"
    r = registry.request("GET", oci_paths.referrers(REPO, "sha256:bad"))
    assert r.status_code == 400 and error_code(r) == "DIGEST_INVALID"


# --- end-8: tags list, and the catalog -------------------------------------------------------------

def test_end8_tags_sorted_and_paged(registry):
    manifest = registry.push_image()
    tags = ["latest", "v10", "v2", "A", "b_1", "v1.0"]
    for tag in tags[1:]:
        assert registry.push_manifest(manifest, tag).status_code == 201
    r = registry.anonymous().request("GET", oci_paths.tags(REPO))
    assert r.status_code == 200 and r.json() == {"name": REPO, "tags": sorted(tags)}
    assert "Link" not in r.headers
    pages, path = [], oci_paths.tags(REPO, n=4)
    for _ in range(10):
        r = registry.request("GET", path)
        pages.append(r.json()["tags"])
        if "Link" not in r.headers:
            break
        assert r.headers["Link"].endswith('>; rel="next"')
        path = r.headers["Link"][1:r.headers["Link"].index(">")]
    assert pages == [sorted(tags)[:4], sorted(tags)[4:]]
    r = registry.request("GET", oci_paths.tags(REPO, n=2, last="b_1"))
    assert r.json()["tags"] == ["latest", "v1.0"]
    assert registry.request("GET", oci_paths.tags(REPO, last="v2")).json()["tags"] == []
    assert registry.request("GET", oci_paths.tags(REPO, n=0)).json()["tags"] == []
    r = registry.request("GET", oci_paths.tags(REPO) + "?n=-1")
    assert r.status_code == 400
    r = registry.request("GET", oci_paths.tags("no/such"))
    assert r.status_code == 404 and error_code(r) == "NAME_UNKNOWN"


def test_catalog_sorted_and_paged(registry):
    for repo in ("b/one", "a/two", "c/three"):
        registry.push_image(repo=repo)
    r = registry.request("GET", oci_paths.catalog())
    assert r.json() == {"repositories": ["a/two", "b/one", "c/three"]}
    r = registry.request("GET", oci_paths.catalog(n=2))
    assert r.json()["repositories"] == ["a/two", "b/one"]
    assert r.headers["Link"] == f'<{oci_paths.catalog(n=2, last="b/one")}>; rel="next"'
    r = registry.request("GET", oci_paths.catalog(n=2, last="b/one"))
    assert r.json()["repositories"] == ["c/three"] and "Link" not in r.headers


# --- end-9, end-10: deletes -----------------------------------------------------------------------

def test_end9_delete_manifest_by_tag_and_digest(registry):
    manifest = registry.push_image()
    registry.push_manifest(manifest, "v1")
    other = registry.push_image(tag="other", seed="z")
    assert registry.request("DELETE", oci_paths.manifest(REPO, "v1")).status_code == 202
    assert registry.request("GET", oci_paths.manifest(REPO, "v1")).status_code == 404
    assert registry.request("GET", oci_paths.manifest(REPO, "latest")).status_code == 200
    r = registry.request("DELETE", oci_paths.manifest(REPO, digest_of(manifest)))
    assert r.status_code == 202
    r = registry.request("GET", oci_paths.manifest(REPO, digest_of(manifest)))
    assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"
    assert registry.request("GET", oci_paths.tags(REPO)).json()["tags"] == ["other"]
    assert registry.request("GET", oci_paths.manifest(REPO, "other")).content == other
    r = registry.request("DELETE", oci_paths.manifest(REPO, "v1"))
    assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"


def test_end10_delete_blob_only_when_unreferenced(registry, store):
    manifest = registry.push_image()
    layer = json.loads(manifest)["layers"][0]["digest"]
    r = registry.request("DELETE", oci_paths.blob(REPO, layer))
    assert r.status_code == 405 and error_code(r) == "UNSUPPORTED"
    assert store.blobs.has(layer)
    registry.request("DELETE", oci_paths.manifest(REPO, "latest"))
    assert registry.request("DELETE", oci_paths.blob(REPO, layer)).status_code == 202
    r = registry.request("GET", oci_paths.blob(REPO, layer))
    assert r.status_code == 404 and error_code(r) == "BLOB_UNKNOWN"
    r = registry.request("DELETE", oci_paths.blob(REPO, layer))
    assert r.status_code == 404 and error_code(r) == "BLOB_UNKNOWN"


# --- auth -------------------------------------------------------------------------------------------

def test_writes_need_credentials(registry):
    anonymous = registry.anonymous()
    digest = digest_of(b"x")
    writes = [("POST", oci_paths.uploads(REPO)), ("POST", oci_paths.uploads(REPO, digest=digest)),
              ("PATCH", oci_paths.upload(REPO, "0" * 32)), ("PUT", oci_paths.upload(REPO, "0" * 32)),
              ("GET", oci_paths.upload(REPO, "0" * 32)), ("DELETE", oci_paths.upload(REPO, "0" * 32)),
              ("PUT", oci_paths.manifest(REPO, "latest")), ("DELETE", oci_paths.manifest(REPO, "latest")),
              ("DELETE", oci_paths.blob(REPO, digest))]
    for method, path in writes:
        for client in (anonymous, Registry(registry.server, auth=(USER, "wrong"))):
            r = client.request(method, path, data=b"x")
            assert r.status_code == 401 and error_code(r) == "UNAUTHORIZED", (method, path)
            assert r.headers["WWW-Authenticate"] == 'Basic realm="zreg"'
    manifest = registry.push_image()
    assert anonymous.request("GET", oci_paths.manifest(REPO, "latest")).content == manifest


def test_read_only_without_htpasswd(read_only, store):
    digest = digest_of(b"x")
    for method, path in [("POST", oci_paths.uploads(REPO)), ("PUT", oci_paths.manifest(REPO, "latest")),
                         ("DELETE", oci_paths.manifest(REPO, "latest")), ("DELETE", oci_paths.blob(REPO, digest)),
                         ("PATCH", oci_paths.upload(REPO, "0" * 32))]:
        r = read_only.request(method, path, data=b"x", auth=(USER, PASSWORD))
        assert r.status_code == 405 and error_code(r) == "UNSUPPORTED", (method, path)
        assert "WWW-Authenticate" not in r.headers
    assert not store.blobs.dir.exists() or not any(store.blobs.dir.iterdir())


def test_auth_reads(store, tmp_path, htpasswd_line):
    path = tmp_path / "htpasswd"
    path.write_text(htpasswd_line)
    with BackgroundServer(make_app(store, htpasswd=Htpasswd(path), auth_reads=True)) as server:
        registry = Registry(server)
        manifest = registry.push_image()
        for method, p in [("GET", oci_paths.manifest(REPO, "latest")), ("GET", oci_paths.tags(REPO)),
                          ("GET", oci_paths.catalog()), ("HEAD", oci_paths.blob(REPO, digest_of(b"{}")))]:
            r = registry.anonymous().request(method, p)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="zreg"'
        assert registry.request("GET", oci_paths.manifest(REPO, "latest")).content == manifest


def test_htpasswd_changes_are_picked_up(registry, tmp_path, htpasswd_line):
    assert registry.request("POST", oci_paths.uploads(REPO)).status_code == 202
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"new", bcrypt.gensalt(4)).decode()
    path.write_text(f"carol:{hashed}\n")
    assert registry.request("POST", oci_paths.uploads(REPO)).status_code == 401
    assert registry.request("POST", oci_paths.uploads(REPO), auth=("carol", "new")).status_code == 202


def test_upload_keeps_what_arrived_before_a_dropped_connection(registry, store):
    """A client that loses its connection mid-PATCH resumes from the Range the status reports."""
    import base64
    import socket

    location = registry.request("POST", oci_paths.uploads(REPO)).headers["Location"]
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with socket.create_connection(("127.0.0.1", registry.server.port), timeout=30) as sock:
        sock.sendall(f"PATCH {location} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {token}\r\n"
                     f"Content-Length: 1000000\r\n\r\n".encode() + b"x" * 5000)
        time.sleep(0.2)
    for _ in range(100):  # the server notices the drop asynchronously
        r = registry.request("GET", location)
        if r.headers["Range"] != "0-0":
            break
        time.sleep(0.05)
    assert r.status_code == 204 and r.headers["Range"] == "0-4999"
    r = registry.request("PATCH", location, data=b"y" * 10, headers={"Content-Range": "5000-5009"})
    assert r.status_code == 202 and r.headers["Range"] == "0-5009"
    digest = digest_of(b"x" * 5000 + b"y" * 10)
    assert registry.request("PUT", r.headers["Location"] + f"?digest={digest}").status_code == 201
    assert store.blobs.has(digest, 5010)
