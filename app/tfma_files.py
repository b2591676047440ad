"""TFMA's output files (the Evaluator's ModelEvaluation) read without TFMA.

`tensorflow_model_analysis` imports TensorFlow (~5 s), and `inspect` /
`report` only need two of its protos: MetricsForSlice (the `metrics-*`
TFRecord file) and ValidationResult (`validations*`). Their generated
modules import nothing but protobuf; they are loaded from TFMA's installed
`proto/` directory without running the package's `__init__` (which is what
imports TensorFlow). A remote URI (gs://, s3://) is read by TFMA itself,
which brings TensorFlow's file systems.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import struct
import sys
import types
from typing import Iterator, List, Tuple

PACKAGE = "tensorflow_model_analysis"
_PROTOS: dict = {}


def protos() -> Tuple[type, type]:
    """(MetricsForSlice, ValidationResult) message classes."""
    if not _PROTOS:
        if PACKAGE in sys.modules:  # TFMA is already here: its own modules
            from tensorflow_model_analysis.proto import metrics_for_slice_pb2, validation_result_pb2
        else:
            metrics_for_slice_pb2, validation_result_pb2 = _load_without_package()
        _PROTOS["metrics"] = metrics_for_slice_pb2.MetricsForSlice
        _PROTOS["validation"] = validation_result_pb2.ValidationResult
    return _PROTOS["metrics"], _PROTOS["validation"]


def _load_without_package():
    spec = importlib.util.find_spec(PACKAGE)  # locates, does not import
    if spec is None or not spec.origin:
        raise ImportError(f"{PACKAGE} is not installed")
    root = os.path.dirname(spec.origin)
    # Bare stand-ins for the package and its proto/ subpackage, only while the
    # two modules load; afterwards nothing of them stays in sys.modules, so a
    # later `import tensorflow_model_analysis` is the real one (it registers
    # the same proto files again, which protobuf accepts as identical).
    for name, path in ((PACKAGE, root), (f"{PACKAGE}.proto", os.path.join(root, "proto"))):
        stub = types.ModuleType(name)
        stub.__path__ = [path]
        sys.modules[name] = stub
    try:
        return (importlib.import_module(f"{PACKAGE}.proto.metrics_for_slice_pb2"),
                importlib.import_module(f"{PACKAGE}.proto.validation_result_pb2"))
    finally:
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def tfrecords(path: str) -> Iterator[bytes]:
    """The records of an uncompressed TFRecord file (length, length CRC,
    data, data CRC); a truncated file is an error naming it."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise ValueError(f"truncated TFRecord file: {path}")
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                raise ValueError(f"truncated TFRecord file: {path}")
            yield data


def is_local(uri: str) -> bool:
    return "://" not in uri


def load_metrics(uri: str) -> List:
    """The MetricsForSlice records of an evaluation directory."""
    if not is_local(uri):
        import tensorflow_model_analysis as tfma

        return list(tfma.load_metrics(uri))
    metrics_cls, _ = protos()
    return [metrics_cls.FromString(r) for path in sorted(glob.glob(os.path.join(uri, "metrics*")))
            for r in tfrecords(path)]


def load_validation_result(uri: str):
    """The evaluation's ValidationResult; FileNotFoundError when it has none
    (no thresholds were configured)."""
    if not is_local(uri):
        import tensorflow_model_analysis as tfma

        return tfma.load_validation_result(uri)
    _, validation_cls = protos()
    paths = sorted(glob.glob(os.path.join(uri, "validations*")))
    records = [r for path in paths for r in tfrecords(path)]
    if not records:
        raise FileNotFoundError(f"no validation result in {uri}")
    return validation_cls.FromString(records[0])
