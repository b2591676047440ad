"""A small reader for the safetensors format (8-byte little-endian header
size, a JSON header of {name: {dtype, shape, data_offsets}}, raw bytes).

Written here rather than taken from the `safetensors` package because its
NumPy backend cannot represent bfloat16 or float8, both of which DeepSeek-V3
checkpoints use; we widen them to float32 while reading.
"""

from __future__ import annotations

import json
import struct
from typing import Dict, Iterator, Tuple

import numpy as np

_PLAIN = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}


def _float8_values(exponent_bits: int, mantissa_bits: int):
    """(value, exponent, mantissa) of each of the 256 bit patterns of an IEEE-like
    float8 with the given field widths, before special values."""
    bits = np.arange(256, dtype=np.uint32)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent = (bits >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = (bits & ((1 << mantissa_bits) - 1)).astype(np.float64)
    bias = (1 << (exponent_bits - 1)) - 1
    step = float(1 << mantissa_bits)
    normal = (1.0 + mantissa / step) * np.exp2(exponent.astype(np.float64) - bias)
    subnormal = (mantissa / step) * np.exp2(1.0 - bias)
    return sign * np.where(exponent == 0, subnormal, normal), exponent, mantissa, bits


def _float8_e4m3_table() -> np.ndarray:
    value, _, _, bits = _float8_values(4, 3)
    value[(bits & 0x7F) == 0x7F] = np.nan  # e4m3fn has NaN, no infinities
    return value.astype(np.float32)


def _float8_e5m2_table() -> np.ndarray:
    value, exponent, mantissa, _ = _float8_values(5, 2)
    top = exponent == 0x1F  # IEEE-style: infinities and NaNs
    value[top] = np.where(mantissa[top] == 0, np.sign(value[top]) * np.inf, np.nan)
    return value.astype(np.float32)


_F8_TABLES = {"F8_E4M3": _float8_e4m3_table, "F8_E5M2": _float8_e5m2_table}


def _decode(raw: bytes, dtype: str, shape) -> np.ndarray:
    if dtype in _PLAIN:
        return np.frombuffer(raw, dtype=np.dtype(_PLAIN[dtype]).newbyteorder("<")).reshape(shape).copy()
    if dtype == "BF16":
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    if dtype in _F8_TABLES:
        return _F8_TABLES[dtype]()[np.frombuffer(raw, dtype=np.uint8)].reshape(shape)
    raise ValueError(f"safetensors: unsupported dtype {dtype!r}")


#: The format's own bound on the JSON header (safetensors rejects larger):
#: a corrupt or hostile size field must not make us read gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024

_ITEM_BYTES = {**{k: np.dtype(v).itemsize for k, v in _PLAIN.items()}, "BF16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1}


class SafetensorsError(ValueError):
    """A .safetensors file that does not follow the format; names the file."""


def read_header(path: str) -> Tuple[dict, int]:
    """({name: info}, offset of the data section). The header size is
    bounded and every tensor's offsets are checked against its dtype, shape
    and the file's size before anything is read."""
    import os

    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: {file_size} bytes, too short for a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES or 8 + size > file_size:
            raise SafetensorsError(f"{path}: header size {size} exceeds "
                                   f"{'the file' if size <= MAX_HEADER_BYTES else MAX_HEADER_BYTES} "
                                   f"({file_size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, ValueError) as e:
            raise SafetensorsError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    _check_offsets(path, header, file_size - 8 - size)
    return header, 8 + size


def _check_offsets(path: str, header: dict, data_size: int) -> None:
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (all(isinstance(v, int) and v >= 0 for v in (start, end, *shape))
                  and isinstance(shape, list))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed entry {info!r}")
        if dtype not in _ITEM_BYTES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        want = int(np.prod(shape, dtype=np.int64)) * _ITEM_BYTES[dtype]
        if not start <= end <= data_size or end - start != want:
            raise SafetensorsError(
                f"{path}: tensor {name!r} data_offsets [{start}, {end}] do not hold {dtype} "
                f"{tuple(shape)} ({want} bytes) inside the {data_size}-byte data section")
        spans.append((start, end, name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise SafetensorsError(f"{path}: tensors {first!r} and {second!r} overlap")


def iter_tensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Yields (name, array) for every tensor in one .safetensors file."""
    header, base = read_header(path)
    with open(path, "rb") as f:
        for name, info in header.items():
            start, end = info["data_offsets"]
            f.seek(base + start)
            yield name, _decode(f.read(end - start), info["dtype"], tuple(info["shape"]))


def load_file(path: str) -> Dict[str, np.ndarray]:
    return dict(iter_tensors(path))


def save_file(tensors: Dict[str, np.ndarray], path: str) -> None:
    """Writes float32/float16/int tensors (used by tests and converters)."""
    names = {np.dtype(v): k for k, v in _PLAIN.items()}
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
