"""The safetensors reader refuses malformed files before reading their data:
a bounded header size, and every tensor's offsets inside the file, sized by
its dtype and shape, not overlapping."""

import json
import struct

import numpy as np
import pytest

from model.safetensors_io import MAX_HEADER_BYTES, SafetensorsError, load_file, save_file

pytestmark = pytest.mark.unit


def _write(path, header, data=b""):
    encoded = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + data)


def test_round_trip(tmp_path):
    path = str(tmp_path / "ok.safetensors")
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64)}
    save_file(tensors, path)
    loaded = load_file(path)
    assert set(loaded) == {"a", "b"} and np.array_equal(loaded["a"], tensors["a"])


def test_huge_header_size_is_refused_without_reading_it(tmp_path):
    path = str(tmp_path / "huge.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 2 ** 62) + b"{}")
    with pytest.raises(SafetensorsError, match="header size"):
        load_file(path)
    with open(path, "wb") as f:  # under the format's bound, beyond the file
        f.write(struct.pack("<Q", MAX_HEADER_BYTES - 8) + b"{}")
    with pytest.raises(SafetensorsError, match="exceeds the file"):
        load_file(path)


@pytest.mark.parametrize("offsets, shape, match", [
    ([0, 64], [2, 3], "do not hold"),       # past the data section
    ([0, 8], [2, 3], "do not hold"),        # shorter than the shape needs
    ([16, 8], [0], "do not hold"),          # end before start
    ([-8, 16], [2, 3], "malformed"),        # negative
    ("x", [2, 3], "malformed"),
])
def test_bad_offsets_are_refused(tmp_path, offsets, shape, match):
    path = str(tmp_path / "bad.safetensors")
    _write(path, {"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}, b"\0" * 24)
    with pytest.raises(SafetensorsError, match=match):
        load_file(path)


def test_overlapping_tensors_are_refused(tmp_path):
    path = str(tmp_path / "overlap.safetensors")
    _write(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                  "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)
    with pytest.raises(SafetensorsError, match="overlap"):
        load_file(path)


def test_truncated_and_non_json_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(SafetensorsError, match="too short"):
        load_file(str(short))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    with pytest.raises(SafetensorsError, match="not JSON"):
        load_file(str(garbage))
