"""What the Trainer adapter (components/trainer.py) and the export still
need from TensorFlow's side: the dtype-policy context, variable paths, and the
tf.data readers used when no TFX DataAccessor is given. Training itself runs
in the engine (`training/`, Keras on JAX)."""

from __future__ import annotations

import contextlib
import os
from typing import List, Optional, Sequence

import keras  # noqa: E402  (Keras 3; never tf.keras)
import tensorflow as tf  # noqa: E402


@contextlib.contextmanager
def dtype_policy(name: str):
    """Sets Keras' global dtype policy for the block, then restores it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def relative_variable_path(variable) -> str:
    """A variable's path inside its model (the instance-specific model name stripped)."""
    from training.checkpoint import relative_path

    return relative_path(variable)


# ------------------------------------------------------------------- data
def resolve_file_patterns(files, what: str = "train_files") -> List[str]:
    """TFX gives a list of patterns (`<uri>/Split-train/*`); a directory is
    expanded to `<dir>/*`. Raises if nothing matches."""
    if files is None:
        raise ValueError(f"fn_args.{what}: no files given")
    items = [files] if isinstance(files, str) else list(files)
    patterns = [os.path.join(p, "*") if tf.io.gfile.isdir(p) else p for p in items]
    matched = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not matched:
        raise ValueError(f"fn_args.{what}: no files match {items!r}")
    return patterns


def detect_compression(patterns: Sequence[str]) -> Optional[str]:
    """'GZIP' when the first matched file starts with the gzip magic bytes
    (ExampleGen's `*.gz`), else None (uncompressed TFRecords)."""
    first = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})[0]
    with tf.io.gfile.GFile(first, "rb") as f:
        magic = f.read(2)
    return "GZIP" if magic == b"\x1f\x8b" else None


def train_dataset(patterns, seq_len: int, batch_size: int, seed: int, skip_batches: int = 0):
    """Endless, seeded-shuffle batches of (ids, ids) with a static batch size;
    `skip_batches` resumes the exact stream of an earlier run."""
    from data.tfrecord import make_dataset

    ds = make_dataset(patterns, seq_len, batch_size, shuffle=True, seed=seed, repeat=True,
                      compression=detect_compression(patterns), drop_remainder=True)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.map(lambda batch: (batch["input_ids"], batch["input_ids"]))


def eval_dataset(patterns, seq_len: int, batch_size: int, max_batches: Optional[int]):
    from data.tfrecord import make_dataset

    ds = make_dataset(patterns, seq_len, batch_size, shuffle=False, repeat=False,
                      compression=detect_compression(patterns), drop_remainder=False)
    if max_batches:
        ds = ds.take(max_batches)
    return ds
