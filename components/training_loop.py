"""What the Trainer adapter (components/trainer.py), the export and the demo
still need from TensorFlow's side: the dtype-policy context, variable paths,
the tf.data readers used when no TFX DataAccessor is given, and the router-bias
callback for `model.fit` (pipeline/demo.py). Training itself runs
in the engine (`training/`, Keras on JAX)."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import keras  # noqa: E402  (Keras 3; never tf.keras)
import numpy as np
import tensorflow as tf  # noqa: E402

from training.engine import dtype_policy  # noqa: F401  (re-exported for export / demo)


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


class RouterBiasUpdate(keras.callbacks.Callback):
    """Aux-loss-free balancing for `fit`: once per optimizer step, moves each
    MoE router bias by the load routed during that step (counter snapshot at
    batch begin, delta at batch end). The MoE forward never moves the bias.
    List it before callbacks that reset the counters (TrainingMonitor)."""

    def __init__(self, model):
        super().__init__()
        self.layers = [m for m in model.moe_layers() if m.config.bias_update_speed > 0]
        self._before = []

    def on_train_batch_begin(self, batch, logs=None):
        self._before = [np.asarray(keras.ops.convert_to_numpy(m.expert_load)) for m in self.layers]

    def on_train_batch_end(self, batch, logs=None):
        for moe, before in zip(self.layers, self._before):
            moe.apply_bias_update(np.asarray(keras.ops.convert_to_numpy(moe.expert_load)) - before)
