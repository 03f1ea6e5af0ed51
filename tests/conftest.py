import os
import subprocess
import sys
from pathlib import Path

import pytest

from zreg.registry.store import Store

from .folders import make_model_folder


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    root = tmp_path / "store"
    monkeypatch.setenv("ZREG_MODELS", str(root))
    monkeypatch.delenv("ZREG_DEFAULT_HOST", raising=False)
    return Store(root)


@pytest.fixture
def model_folder(tmp_path) -> Path:
    return make_model_folder(tmp_path / "src")


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory) -> Path:
    """The embedded tiny Z-Image folder, written once per test session."""
    from zreg.fixtures.tiny_zimage import write_tiny_zimage

    return write_tiny_zimage(tmp_path_factory.mktemp("fixture") / "tiny-zimage")


def run_zreg(*args, store: Store | None = None, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if store is not None:
        env["ZREG_MODELS"] = str(store.root)
    proc = subprocess.run([sys.executable, "-m", "zreg.cli.main", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"zreg {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc
