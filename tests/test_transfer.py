"""Push and pull against the real CNCF registry, through a fault-injecting proxy, and with
real OCI clients (skopeo, the oras SDK) reading what zreg pushed."""

import json
import os
import signal
import subprocess
import sys
import time

import bcrypt
import oras.client
import pytest

from zreg.registry.auth import Auth, AuthError
from zreg.registry.client import RegistryClient, RegistryUnreachable
from zreg.registry.errors import ModelNotFound
from zreg.registry.names import parse_name
from zreg.registry.store import Store
from zreg.registry.transfer import pull_model, push_model

from .conftest import run_zreg
from .folders import make_big_folder, make_model_folder
from .peers import FaultProxy, cncf_registry, free_port


@pytest.fixture
def registry(tmp_path):
    with cncf_registry(tmp_path) as host:
        yield host


def client(host, **kw):
    kw.setdefault("backoff", 0.01)
    return RegistryClient(host, **kw)


def blob_files(store: Store) -> dict[str, bytes]:
    return {d: store.blobs.path(d).read_bytes() for d in store.blobs.digests()}


def test_round_trip_through_the_cncf_registry(store, tmp_path, registry, model_folder):
    name = f"{registry}/library/tiny:v1"
    run_zreg("create", model_folder, "-n", name, store=store)
    out = run_zreg("push", name, store=store).stdout
    assert "pushed" in out
    other = Store(tmp_path / "other")
    out = run_zreg("pull", name, store=other).stdout
    assert "pulled" in out
    assert other.resolve(name)[2] == store.resolve(name)[2]
    assert blob_files(other) == blob_files(store)
    assert "verify ok" in run_zreg("verify", store=other).stdout
    # Nothing moves the second time, either way.
    again = push_model(store, parse_name(name), client(registry))
    assert (again.transferred, again.bytes, again.skipped) == (0, 0, again.blobs)
    again = pull_model(other, parse_name(name), client(registry))
    assert (again.transferred, again.bytes) == (0, 0)


def test_second_push_sends_no_blob_bytes_and_mounts_across_repos(store, tmp_path, registry):
    a = make_model_folder(tmp_path / "a", seed=1, text_encoder_seed=9)
    b = make_model_folder(tmp_path / "b", seed=2, text_encoder_seed=9)
    run_zreg("create", a, "-n", f"{registry}/team/a", store=store)
    run_zreg("create", b, "-n", f"{registry}/team/b", store=store)
    with FaultProxy(registry) as proxy:
        push_model(store, parse_name(f"{registry}/team/a"), client(proxy.host))
        proxy.faults.log.clear()
        result = push_model(store, parse_name(f"{registry}/team/a"), client(proxy.host))
        uploads = [e for e in proxy.faults.log if e[0] in ("PATCH", "PUT") and "/blobs/" in e[1]]
        assert uploads == [] and result.bytes == 0
    shared = store.resolve(f"{registry}/team/a")[1].blob_digests() & store.resolve(f"{registry}/team/b")[1].blob_digests()
    result = push_model(store, parse_name(f"{registry}/team/b"), client(registry))
    assert result.mounted == len(shared) > 0


def test_oci_push_is_read_by_skopeo_and_oras_and_pulls_back_identical(store, tmp_path, registry, tiny_zimage):
    name = f"{registry}/library/tiny-oci:v1"
    run_zreg("create", tiny_zimage, "-n", name, store=store)
    run_zreg("push", "--oci", name, store=store)
    # skopeo (containers/image, Go) copies it into an OCI layout.
    layout = tmp_path / "layout"
    proc = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{name}", f"oci:{layout}:v1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((layout / "index.json").read_text())
    oci_manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    assert oci_manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert oci_manifest["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    assert {layer["mediaType"] for layer in oci_manifest["layers"]} == {
        "application/vnd.cncf.model.weight.v1.raw", "application/vnd.cncf.model.weight.config.v1.raw"}
    config = json.loads((layout / "blobs/sha256" / oci_manifest["config"]["digest"].split(":")[1]).read_text())
    assert set(config) == {"descriptor", "config", "modelfs"}
    assert config["modelfs"]["diffIds"] == [layer["digest"] for layer in oci_manifest["layers"]]
    # The oras Python SDK pulls every layer to a file named by its title.
    out = tmp_path / "oras"
    files = oras.client.OrasClient(hostname=registry, insecure=True).pull(target=name, outdir=str(out))
    _, manifest, data = store.resolve(name)
    assert len(files) == len(manifest.layers) + 1
    for layer in manifest.layers:
        rel = f"{layer.name}.safetensors" if layer.is_tensor else layer.name
        assert (out / rel).read_bytes() == store.blobs.path(layer.digest).read_bytes()
    # zreg pulls the OCI form back into the identical local manifest.
    other = Store(tmp_path / "other")
    run_zreg("pull", name, store=other)
    assert other.resolve(name)[2] == data
    assert "verify ok" in run_zreg("verify", store=other).stdout


def test_intermittent_500s_and_dropped_connections_are_retried(store, tmp_path, registry):
    big = make_big_folder(tmp_path / "big", tensors=4, mib_each=4)
    name = f"{registry}/library/big"
    run_zreg("create", big, "-n", name, store=store)
    push_model(store, parse_name(name), client(registry))
    _, manifest, _ = store.resolve(name)
    total = sum(d.size for d in [manifest.config, *manifest.layers])
    with FaultProxy(registry) as proxy:
        proxy.faults.fail_requests = 3
        proxy.faults.drop_after = 1 << 20
        other = Store(tmp_path / "other")
        result = pull_model(other, parse_name(name), client(proxy.host), concurrency=2)
        assert result.transferred == result.blobs
        dropped = [e for e in proxy.faults.log if e[4] == "dropped"]
        assert len(dropped) == 4
        resumed = [e for e in proxy.faults.log if e[2] == f"bytes={1 << 20}-"]
        assert len(resumed) == 4   # each dropped blob resumed where it stopped
        assert proxy.blob_bytes_sent() == total  # nothing fetched twice
    assert other.resolve(name)[2] == store.resolve(name)[2]
    assert "verify ok" in run_zreg("verify", store=other).stdout


def test_a_flipped_byte_is_caught_and_nothing_lands(store, tmp_path, registry, model_folder):
    name = f"{registry}/library/tiny"
    run_zreg("create", model_folder, "-n", name, store=store)
    push_model(store, parse_name(name), client(registry))
    other = Store(tmp_path / "other")
    with FaultProxy(registry) as proxy:
        proxy.faults.flip_byte = True
        proc = run_zreg("pull", "--concurrency", "1", f"{proxy.host}/library/tiny", store=other, check=False)
    assert proc.returncode != 0
    assert "digest mismatch" in proc.stderr and "blob sha256:" in proc.stderr
    assert not other.manifests.exists(parse_name(f"{proxy.host}/library/tiny"))
    assert list(other.blobs.digests()) == []


def test_pull_killed_mid_blob_resumes_with_only_the_missing_bytes(store, tmp_path, registry):
    big = make_big_folder(tmp_path / "big", tensors=2, mib_each=16)
    name = f"{registry}/library/big"
    run_zreg("create", big, "-n", name, store=store)
    push_model(store, parse_name(name), client(registry))
    other = Store(tmp_path / "other")
    with FaultProxy(registry) as proxy:
        proxy.faults.bytes_per_second = 8 << 20
        env = dict(os.environ, ZREG_MODELS=str(other.root))
        proc = subprocess.Popen([sys.executable, "-m", "zreg.cli.main", "pull", "--concurrency", "1",
                                 f"{proxy.host}/library/big"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        partial = None
        while time.monotonic() < deadline and proc.poll() is None:
            partials = list(other.blobs.dir.glob(".partial-*")) if other.blobs.dir.exists() else []
            if partials and partials[0].stat().st_size > (2 << 20):
                partial = partials[0]
                break
            time.sleep(0.02)
        assert partial is not None and proc.poll() is None, "pull ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        have = partial.stat().st_size
        proxy.faults.bytes_per_second = None
        proxy.faults.log.clear()
        run_zreg("pull", f"{proxy.host}/library/big", store=other)
        digest = "sha256:" + partial.name.split("sha256-")[1]
        requests_for_blob = [e for e in proxy.faults.log if e[0] == "GET" and digest in e[1]]
        assert requests_for_blob[0][2] == f"bytes={have}-"
        size = other.blobs.path(digest).stat().st_size
        assert requests_for_blob[0][3] == size - have
    assert not partial.exists()
    assert "verify ok" in run_zreg("verify", store=other).stdout


def test_auth_required_refused_and_login(store, tmp_path, monkeypatch):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode() + "\n")
    monkeypatch.setenv("ZREG_HOME", str(tmp_path / "home"))
    with cncf_registry(tmp_path, htpasswd=htpasswd) as host:
        folder = make_model_folder(tmp_path / "src")
        name = f"{host}/library/tiny"
        run_zreg("create", folder, "-n", name, store=store)
        proc = run_zreg("push", name, store=store, check=False)
        assert proc.returncode != 0 and f"zreg login {host}" in proc.stderr
        proc = run_zreg("login", host, "-u", "alice", "--password-stdin", input="wrong\n", check=False)
        assert proc.returncode == 0
        proc = run_zreg("push", name, store=store, check=False)
        assert proc.returncode != 0 and "refused" in proc.stderr and "wrong" not in proc.stderr
        proc = run_zreg("login", host, "-u", "alice", "--password-stdin", input="s3cret\n")
        assert "s3cret" not in proc.stdout + proc.stderr
        auth_file = tmp_path / "home" / "auth.json"
        assert oct(auth_file.stat().st_mode & 0o777) == "0o600"
        assert "s3cret" not in auth_file.read_text()  # encoded, as Docker does, never in clear
        run_zreg("push", name, store=store)
        other = Store(tmp_path / "other")
        run_zreg("pull", name, store=other)
        assert other.resolve(name)[2] == store.resolve(name)[2]


def test_bearer_token_flow(store, tmp_path, registry, model_folder, monkeypatch):
    monkeypatch.setenv("ZREG_HOME", str(tmp_path / "home"))
    name = f"{registry}/library/tiny"
    run_zreg("create", model_folder, "-n", name, store=store)
    push_model(store, parse_name(name), client(registry))
    with FaultProxy(registry) as proxy:
        proxy.faults.bearer = ("bob", "pw")
        target = parse_name(f"{proxy.host}/library/tiny")
        with pytest.raises(AuthError, match="refused"):
            pull_model(Store(tmp_path / "a"), target, client(proxy.host, auth=Auth(proxy.host, ("bob", "nope"))))
        monkeypatch.setenv("ZREG_USERNAME", "bob")
        monkeypatch.setenv("ZREG_PASSWORD", "pw")
        result = pull_model(Store(tmp_path / "b"), target, client(proxy.host))
        assert result.transferred == result.blobs
        assert any(e[1].startswith("/v2/library/tiny/manifests") and e[4] == 200 for e in proxy.faults.log)


def test_unknown_model_and_unreachable_registry(store, registry):
    with pytest.raises(ModelNotFound, match="no such model or tag"):
        pull_model(store, parse_name(f"{registry}/library/nope:v9"), client(registry))
    proc = run_zreg("pull", f"{registry}/library/nope:v9", store=store, check=False)
    assert proc.returncode != 0 and "no such model or tag" in proc.stderr
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(RegistryUnreachable, match="failed after"):
        pull_model(store, parse_name(f"{dead}/library/x"), client(dead, retries=2))
