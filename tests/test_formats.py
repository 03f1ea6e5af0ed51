import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from zreg.registry.errors import FormatError
from zreg.registry.safetensors_format import parse_header
from zreg.registry.tensorblob import blob_header, read_blob_tensor

from .folders import write_raw_safetensors


def write_blob(path, array: np.ndarray, dtype: str):
    path.write_bytes(blob_header(dtype, array.shape) + array.tobytes())


def test_header_matches_the_published_example():
    header = blob_header("BF16", (2560, 9728))
    assert len(header) == 88  # the seed README's worked example
    (n,) = struct.unpack("<Q", header[:8])
    assert json.loads(header[8:]) == {"data": {"dtype": "BF16", "shape": [2560, 9728],
                                               "data_offsets": [0, 2560 * 9728 * 2]}}
    assert header[8:].rstrip(b" ").endswith(b"}")


@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (2, 3, 4, 5), (0, 7)])
def test_blobs_are_aligned_and_open_in_any_reader(tmp_path, shape):
    array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    path = tmp_path / "blob"
    write_blob(path, array, "F32")
    assert len(blob_header("F32", shape)) % 8 == 0
    with safe_open(str(path), framework="numpy") as f:
        assert list(f.keys()) == ["data"]
        np.testing.assert_array_equal(f.get_tensor("data"), array)
    loaded = mx.load(str(path), format="safetensors")  # blobs have no extension
    np.testing.assert_array_equal(np.array(loaded["data"]), array)
    info = read_blob_tensor(path)
    assert (info.key, info.dtype, info.shape, info.nbytes) == ("data", "F32", shape, array.nbytes)


def test_blob_keyed_by_tensor_name_is_accepted(tmp_path):
    array = np.ones((2, 2), np.float32)
    path = tmp_path / "blob"
    write_raw_safetensors(path, {"norm.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}},
                          array.tobytes())
    assert read_blob_tensor(path, "vae/norm.weight").key == "norm.weight"
    with pytest.raises(FormatError, match="neither"):
        read_blob_tensor(path, "vae/other.weight")


def test_blob_with_two_tensors_is_rejected(tmp_path):
    path = tmp_path / "blob"
    write_raw_safetensors(path, {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                                 "b": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"xy")
    with pytest.raises(FormatError, match="exactly one tensor"):
        read_blob_tensor(path)


@pytest.mark.parametrize("header, data, message", [
    ({"t": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4, "past the end"),
    ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "out of order"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"../x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "not allowed"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
])
def test_bad_headers(tmp_path, header, data, message):
    path = tmp_path / "f.safetensors"
    write_raw_safetensors(path, header, data)
    raw = path.read_bytes()
    with pytest.raises(FormatError, match=message):
        parse_header(raw, len(raw), str(path))


def test_duplicate_keys_and_bad_lengths():
    text = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    raw = struct.pack("<Q", len(text)) + text + b"x"
    with pytest.raises(FormatError, match="duplicate key 'a'"):
        parse_header(raw, len(raw), "f")
    raw = struct.pack("<Q", 1000) + b"{}"
    with pytest.raises(FormatError, match="runs past the end"):
        parse_header(raw, len(raw), "f")
    with pytest.raises(FormatError, match="too short"):
        parse_header(b"abc", 3, "f")
