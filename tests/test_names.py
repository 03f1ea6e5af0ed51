import pytest

from zreg.registry.errors import InvalidName
from zreg.registry.layout import Layout
from zreg.registry.names import name_from_folder, parse_name


@pytest.mark.parametrize("text, expected", [
    ("tiny", "registry.ollama.ai/library/tiny:latest"),
    ("tiny:v1", "registry.ollama.ai/library/tiny:v1"),
    ("team/tiny", "registry.ollama.ai/team/tiny:latest"),
    ("127.0.0.1:5055/library/tiny:latest", "127.0.0.1:5055/library/tiny:latest"),
    ("127.0.0.1:5055/tiny", "127.0.0.1:5055/library/tiny:latest"),
    ("localhost/x/y:Z_1.0-a", "localhost/x/y:Z_1.0-a"),
    ("ghcr.io/org/z-image_turbo:fp8", "ghcr.io/org/z-image_turbo:fp8"),
])
def test_parse(text, expected):
    assert str(parse_name(text)) == expected


@pytest.mark.parametrize("text", [
    "", " tiny", "Tiny", "a/b/c/d", "host.io/a/b/c", "../x", "x/..", "a..b/c", "tiny:", "tiny:.x",
    "tiny:" + "a" * 129, "ho st/x", "tiny@sha256:" + "0" * 64, "-x", "x_", "evil.io:99999999/x",
])
def test_invalid(text):
    with pytest.raises(InvalidName) as e:
        parse_name(text)
    assert "invalid model name" in str(e.value)


def test_default_host_is_configurable(monkeypatch):
    monkeypatch.setenv("ZREG_DEFAULT_HOST", "models.example.com")
    name = parse_name("tiny")
    assert str(name) == "models.example.com/library/tiny:latest"
    assert name.short() == "tiny:latest"


def test_short_form():
    assert parse_name("tiny").short() == "tiny:latest"
    assert parse_name("team/tiny:v2").short() == "team/tiny:v2"
    assert parse_name("127.0.0.1:5/tiny").short() == "127.0.0.1:5/library/tiny:latest"


def test_layout_paths(tmp_path):
    layout = Layout(tmp_path)
    digest = "sha256:" + "ab" * 32
    table = {
        layout.blobs: "blobs",
        layout.manifests: "manifests",
        layout.lock_file: ".zreg.lock",
        layout.blob(digest): "blobs/sha256-" + "ab" * 32,
        layout.manifest(parse_name("tiny")): "manifests/registry.ollama.ai/library/tiny/latest",
        layout.manifest(parse_name("127.0.0.1:5055/ns/m:t")): "manifests/127.0.0.1:5055/ns/m/t",
    }
    for path, expected in table.items():
        assert path == tmp_path / expected
    assert Layout.digest_of_blob_file(layout.blob(digest)) == digest
    assert Layout.digest_of_blob_file(tmp_path / "blobs/.tmp-1-abc") is None


@pytest.mark.parametrize("folder, expected", [("Z-Image-Turbo", "z-image-turbo"), ("my model!", "my-model"),
                                              ("__", "model")])
def test_name_from_folder(folder, expected):
    assert name_from_folder(folder) == expected
    parse_name(expected)


@pytest.mark.parametrize("host, expected", [
    ("localhost", True), ("localhost:5000", True), ("127.0.0.1", True), ("127.3.2.1:80", True),
    ("::1", True), ("[::1]:5000", True), ("example.com", False), ("10.0.0.1:5000", False),
    ("127.example.com", False),
])
def test_is_loopback(host, expected):
    from zreg.registry.names import is_loopback

    assert is_loopback(host) is expected
