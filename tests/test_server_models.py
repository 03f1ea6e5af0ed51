"""`zreg serve` with real models: a model made by `zreg create` pulls back byte for byte, pushing
what the store already has costs nothing, a model pushed blob by blob into an empty store is a
valid zreg model, and the `zreg serve` command starts and stops cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import bcrypt
import pytest
import requests

from zreg.registry import oci_paths
from zreg.registry.htpasswd import Htpasswd
from zreg.registry.names import parse_name
from zreg.registry.server import BackgroundServer, make_app
from zreg.registry.store import Store

from .conftest import run_zreg

AUTH = ("alice", "pw")


@pytest.fixture
def htpasswd(tmp_path) -> Htpasswd:
    path = tmp_path / "htpasswd"
    path.write_text(f"{AUTH[0]}:{bcrypt.hashpw(AUTH[1].encode(), bcrypt.gensalt(4)).decode()}\n")
    return Htpasswd(path)


def blob_digests(manifest: bytes) -> list[str]:
    doc = json.loads(manifest)
    return [doc["config"]["digest"]] + [layer["digest"] for layer in doc["layers"]]


def test_created_model_pulls_byte_identical(store, model_folder):
    run_zreg("create", model_folder, "-n", "tiny", store=store)
    _, _, stored = store.resolve("tiny")
    with BackgroundServer(make_app(store)) as server:
        http = requests.Session()
        r = http.get(server.url + oci_paths.manifest("library/tiny", "latest"), timeout=30)
        assert r.status_code == 200 and r.content == stored
        digest = r.headers["Docker-Content-Digest"]
        assert digest == "sha256:" + hashlib.sha256(stored).hexdigest()
        assert http.get(server.url + oci_paths.manifest("library/tiny", digest), timeout=30).content == stored
        for blob in blob_digests(stored):
            r = http.get(server.url + oci_paths.blob("library/tiny", blob), timeout=30)
            assert r.status_code == 200
            assert "sha256:" + hashlib.sha256(r.content).hexdigest() == blob
            assert r.content == store.blobs.path(blob).read_bytes()
        assert http.get(server.url + oci_paths.catalog(), timeout=30).json() == {"repositories": ["library/tiny"]}


def test_host_name_selects_the_served_models(store, model_folder):
    run_zreg("create", model_folder, "-n", "example.com/team/tiny:v1", store=store)
    with BackgroundServer(make_app(store, host_name="example.com")) as server:
        r = requests.get(server.url + oci_paths.tags("team/tiny"), timeout=30)
        assert r.json() == {"name": "team/tiny", "tags": ["v1"]}
    with BackgroundServer(make_app(store)) as server:  # the default host holds nothing
        assert requests.get(server.url + oci_paths.catalog(), timeout=30).json() == {"repositories": []}


def test_pushing_what_the_store_has_costs_nothing(store, model_folder, htpasswd):
    run_zreg("create", model_folder, "-n", "tiny", store=store)
    _, _, manifest = store.resolve("tiny")
    before = {d: os.stat(store.blobs.path(d)) for d in store.blobs.digests()}
    with BackgroundServer(make_app(store, htpasswd=htpasswd)) as server:
        http = requests.Session()
        http.auth = AUTH
        for blob in blob_digests(manifest):
            assert http.head(server.url + oci_paths.blob("team/copy", blob), timeout=30).status_code == 200
            r = http.post(server.url + oci_paths.uploads("team/copy", mount=blob, **{"from": "library/tiny"}),
                          timeout=30)
            assert r.status_code == 201
        r = http.put(server.url + oci_paths.manifest("team/copy", "latest"), data=manifest, timeout=30,
                     headers={"Content-Type": json.loads(manifest)["mediaType"]})
        assert r.status_code == 201
    after = {d: os.stat(store.blobs.path(d)) for d in store.blobs.digests()}
    assert {d: (s.st_ino, s.st_mtime_ns) for d, s in after.items()} == \
        {d: (s.st_ino, s.st_mtime_ns) for d, s in before.items()}
    assert store.resolve("team/copy")[2] == manifest
    assert not store.layout.uploads.exists() or not any(store.layout.uploads.iterdir())


def push_model(url: str, source: Store, name: str, repo: str, tag: str) -> None:
    """A plain client push: HEAD each blob, upload the missing ones in two chunks, then PUT."""
    _, _, manifest = source.resolve(name)
    http = requests.Session()
    http.auth = AUTH
    for blob in blob_digests(manifest):
        if http.head(url + oci_paths.blob(repo, blob), timeout=30).status_code == 200:
            continue
        data = source.blobs.path(blob).read_bytes()
        location = http.post(url + oci_paths.uploads(repo), timeout=30).headers["Location"]
        half = len(data) // 2
        for start, chunk in ((0, data[:half]), (half, data[half:])):
            if not chunk:
                continue
            r = http.patch(url + location, data=chunk, timeout=30,
                           headers={"Content-Range": f"{start}-{start + len(chunk) - 1}"})
            assert r.status_code == 202, r.text
            location = r.headers["Location"]
        r = http.put(url + location, params={"digest": blob}, timeout=30)
        assert r.status_code == 201, r.text
    r = http.put(url + oci_paths.manifest(repo, tag), data=manifest, timeout=30,
                 headers={"Content-Type": json.loads(manifest)["mediaType"]})
    assert r.status_code == 201, r.text


def test_model_pushed_into_an_empty_store_is_a_valid_model(tmp_path, store, model_folder, htpasswd):
    run_zreg("create", model_folder, "-n", "tiny", store=store)
    target = Store(tmp_path / "target")
    with BackgroundServer(make_app(target, htpasswd=htpasswd)) as server:
        push_model(server.url, store, "tiny", "library/pushed", "v1")
    assert target.resolve("pushed:v1")[2] == store.resolve("tiny")[2]
    assert sorted(target.blobs.digests()) == sorted(store.blobs.digests())
    report = run_zreg("verify", "pushed:v1", store=target)
    assert report.returncode == 0
    run_zreg("export", "pushed:v1", tmp_path / "exported", store=target)
    assert (tmp_path / "exported" / "model_index.json").read_bytes() == (model_folder / "model_index.json").read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 30) -> requests.Response:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"zreg serve exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            return requests.get(url, timeout=5)
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError("zreg serve did not answer in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_starts_and_stops_cleanly(store, model_folder, sig):
    run_zreg("create", model_folder, "-n", "tiny", store=store)
    port = free_port()
    env = dict(os.environ, ZREG_MODELS=str(store.root))
    proc = subprocess.Popen([sys.executable, "-m", "zreg.cli.main", "serve", "--addr", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(base + "/v2/", proc).status_code == 200
        r = requests.get(base + oci_paths.manifest("library/tiny", "latest"), timeout=30)
        assert r.content == store.resolve("tiny")[2]
        r = requests.post(base + oci_paths.uploads("library/tiny"), timeout=30)
        assert r.status_code == 405  # read-only without --htpasswd
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        assert "zreg serve: http://127.0.0.1" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_serve_command_refuses_bad_options(store, tmp_path):
    proc = run_zreg("serve", "--auth-reads", store=store, check=False)
    assert proc.returncode == 2 and "--auth-reads needs --htpasswd" in proc.stderr
    bad = tmp_path / "htpasswd"
    bad.write_text("bob:$apr1$x$yyyy\n")
    proc = run_zreg("serve", "--htpasswd", bad, store=store, check=False)
    assert proc.returncode == 2 and "no bcrypt entries" in proc.stderr
    proc = run_zreg("serve", "--addr", "nonsense", store=store, check=False)
    assert proc.returncode != 0 and "invalid address" in proc.stderr
    proc = run_zreg("serve", "--host-name", "nodots", "--addr", f"127.0.0.1:{free_port()}", store=store, check=False)
    assert proc.returncode != 0 and "host name" in proc.stderr


def test_names_map_to_the_store_layout(store):
    # The registry repository `namespace/model` is the store's host/namespace/model folder.
    from zreg.registry.server_storage import RegistryStorage
    storage = RegistryStorage(store, "registry.ollama.ai")
    assert storage.name("library/tiny", "v1") == parse_name("tiny:v1")


def test_store_tools_live_with_pushed_manifests(tmp_path, store, model_folder, htpasswd):
    """A manifest pushed by digest only is a model to gc (its blobs stay); an image index is kept
    out of manifests/, so list/gc/verify still read every manifest there."""
    run_zreg("create", model_folder, "-n", "tiny", store=store)
    _, _, manifest = store.resolve("tiny")
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{"mediaType": json.loads(manifest)["mediaType"], "digest": digest,
                                       "size": len(manifest)}]}).encode()
    with BackgroundServer(make_app(store, htpasswd=htpasswd)) as server:
        http = requests.Session()
        http.auth = AUTH
        headers = {"Content-Type": json.loads(manifest)["mediaType"]}
        assert http.put(server.url + oci_paths.manifest("team/bydigest", digest), data=manifest,
                        headers=headers, timeout=30).status_code == 201
        assert http.put(server.url + oci_paths.manifest("team/bydigest", "multi"), data=index, timeout=30,
                        headers={"Content-Type": "application/vnd.oci.image.index.v1+json"}).status_code == 201
        run_zreg("rm", "tiny", store=store)  # the by-digest copy still holds every blob
        assert "removed 0 unreferenced blobs" in run_zreg("gc", store=store).stdout
        assert run_zreg("verify", store=store).returncode == 0
        assert f"bydigest:sha256-{digest[7:]}" in run_zreg("list", store=store).stdout
        for blob in blob_digests(manifest):
            assert http.get(server.url + oci_paths.blob("team/bydigest", blob), timeout=30).status_code == 200
        r = http.get(server.url + oci_paths.manifest("team/bydigest", "multi"), timeout=30)
        assert r.content == index
