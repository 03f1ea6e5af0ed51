"""Real clients against `zreg serve`: zreg's own push/pull (Docker v2 and OCI ModelPack forms,
chunked uploads, mount, auth) and the oras Python SDK."""

from __future__ import annotations

import bcrypt
import oras.client
import pytest

from zreg.registry.auth import Auth, AuthError
from zreg.registry.client import RegistryClient
from zreg.registry.htpasswd import Htpasswd
from zreg.registry.names import parse_name
from zreg.registry.server import BackgroundServer, make_app
from zreg.registry.store import Store
from zreg.registry.transfer import pull_model, push_model

from .conftest import run_zreg
from .folders import make_model_folder

AUTH = ("alice", "pw")


@pytest.fixture
def served(tmp_path):
    """An empty store served with push rights for alice; yields (server store, host:port)."""
    path = tmp_path / "htpasswd"
    path.write_text(f"{AUTH[0]}:{bcrypt.hashpw(AUTH[1].encode(), bcrypt.gensalt(4)).decode()}\n")
    target = Store(tmp_path / "served")
    with BackgroundServer(make_app(target, htpasswd=Htpasswd(path))) as server:
        yield target, f"127.0.0.1:{server.port}"


def client(host: str, credentials=AUTH) -> RegistryClient:
    return RegistryClient(host, auth=Auth(host, credentials), backoff=0.01, retries=1)


def blob_files(store: Store) -> dict[str, bytes]:
    return {d: store.blobs.path(d).read_bytes() for d in store.blobs.digests()}


@pytest.mark.parametrize("oci", [False, True])
def test_zreg_push_and_pull_round_trip(store, tmp_path, served, model_folder, oci):
    target, host = served
    name = parse_name(f"{host}/library/tiny:v1")
    run_zreg("create", model_folder, "-n", str(name), store=store)
    result = push_model(store, name, client(host), oci=oci)
    assert result.transferred == result.blobs
    if not oci:  # the Docker v2 form is stored as is: a model of the served store
        assert target.resolve("tiny:v1")[2] == store.resolve(name)[2]
    other = Store(tmp_path / "other")
    pull_model(other, name, client(host, credentials=None))  # pulls need no credentials
    assert other.resolve(name)[2] == store.resolve(name)[2]
    assert blob_files(other) == blob_files(store)
    again = push_model(store, name, client(host), oci=oci)
    assert (again.transferred, again.bytes) == (0, 0)


def test_zreg_push_sends_only_new_blobs_and_needs_credentials(store, tmp_path, served):
    target, host = served
    a = make_model_folder(tmp_path / "a", seed=1, text_encoder_seed=9)
    b = make_model_folder(tmp_path / "b", seed=2, text_encoder_seed=9)
    run_zreg("create", a, "-n", f"{host}/team/a", store=store)
    run_zreg("create", b, "-n", f"{host}/team/b", store=store)
    with pytest.raises(AuthError):
        push_model(store, parse_name(f"{host}/team/a"), client(host, credentials=None))
    push_model(store, parse_name(f"{host}/team/a"), client(host))
    result = push_model(store, parse_name(f"{host}/team/b"), client(host))
    # Blobs are global on zreg serve: team/a's blobs answer HEAD 200 under team/b, no mount needed.
    only_b = store.resolve(f"{host}/team/b")[1].blob_digests() - store.resolve(f"{host}/team/a")[1].blob_digests()
    assert result.transferred == len(only_b) < result.blobs
    assert "verify ok" in run_zreg("verify", store=target).stdout


def test_oras_pulls_and_pushes(store, tmp_path, served, model_folder):
    target, host = served
    name = f"{host}/library/tiny:v1"
    run_zreg("create", model_folder, "-n", name, store=store)
    push_model(store, parse_name(name), client(host), oci=True)
    _, manifest, _ = store.resolve(name)
    out = tmp_path / "oras"
    files = oras.client.OrasClient(hostname=host, insecure=True).pull(target=name, outdir=str(out))
    assert len(files) == len(manifest.layers) + 1
    for layer in manifest.layers:
        rel = f"{layer.name}.safetensors" if layer.is_tensor else layer.name
        assert (out / rel).read_bytes() == store.blobs.path(layer.digest).read_bytes()

    pusher = oras.client.OrasClient(hostname=host, insecure=True, auth_backend="basic")
    pusher.login(username=AUTH[0], password=AUTH[1], hostname=host)
    (tmp_path / "hello.txt").write_text("hello zreg\n")
    assert pusher.push(target=f"{host}/team/hello:v1", files=[str(tmp_path / "hello.txt")],
                       disable_path_validation=True).status_code == 201
    files = oras.client.OrasClient(hostname=host, insecure=True).pull(target=f"{host}/team/hello:v1",
                                                                      outdir=str(tmp_path / "back"))
    assert [open(f).read() for f in files] == ["hello zreg\n"]
