"""TFRecord encoding of token sequences and a vectorised tf.data loader.

Every record is a serialized ``tf.train.Example`` with one feature,
``input_ids``: an int64 list of length ``seq_len``. TensorFlow is imported
lazily inside the functions, so importing this module (and `data`) is cheap
and TF-free.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Union

import numpy as np

FEATURE_KEY = "input_ids"
_COMPRESSIONS = {"": "", "NONE": "", "GZIP": "GZIP", "ZLIB": "ZLIB"}


def _tf():
    import tensorflow as tf  # noqa: WPS433 (lazy by design)

    return tf


def _compression(compression: Optional[str]) -> str:
    key = "" if compression is None else str(compression).upper()
    if key not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of None, 'GZIP', 'ZLIB', got {compression!r}")
    return _COMPRESSIONS[key]


def _as_2d_tokens(tokens) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"tokens must be a 2-D [num_sequences, seq_len] array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def feature_spec(seq_len: int) -> dict:
    """``{'input_ids': tf.io.FixedLenFeature([seq_len], tf.int64)}`` for parsing."""
    tf = _tf()
    return {FEATURE_KEY: tf.io.FixedLenFeature([int(seq_len)], tf.int64)}


def sequence_to_example(tokens):
    """One 1-D token sequence -> ``tf.train.Example`` with int64 ``input_ids``."""
    tf = _tf()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
    values = arr.astype(np.int64, copy=False).tolist()
    return tf.train.Example(
        features=tf.train.Features(feature={FEATURE_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=values))})
    )


def serialize_sequences(tokens) -> List[bytes]:
    """``[N, L]`` tokens -> N serialized ``tf.train.Example`` byte strings."""
    return [sequence_to_example(row).SerializeToString() for row in _as_2d_tokens(tokens)]


def write_tfrecords(path: str, tokens, compression: Optional[str] = "GZIP") -> int:
    """Write each row of ``tokens`` ([N, L] ints) as one Example; returns N."""
    tf = _tf()
    arr = _as_2d_tokens(tokens)
    options = tf.io.TFRecordOptions(compression_type=_compression(compression))
    with tf.io.TFRecordWriter(str(path), options=options) as writer:
        for row in arr:
            writer.write(sequence_to_example(row).SerializeToString())
    return int(arr.shape[0])


def _glob(file_pattern: Union[str, Sequence[str]]) -> List[str]:
    tf = _tf()
    patterns = [file_pattern] if isinstance(file_pattern, (str, bytes)) else list(file_pattern)
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p if isinstance(p, str) else p.decode())})
    if not files:
        raise ValueError(f"no files match file_pattern {file_pattern!r}")
    return files


def make_dataset(
    file_pattern: Union[str, Sequence[str]],
    seq_len: int,
    batch_size: int,
    shuffle: bool = True,
    seed: Optional[int] = None,
    repeat: Union[bool, int, None] = False,
    compression: Optional[str] = "GZIP",
    drop_remainder: bool = False,
    shuffle_buffer_size: int = 10_000,
):
    """tf.data pipeline yielding ``{'input_ids': int32 [B, seq_len]}``.

    Args:
      file_pattern: glob (or list of globs) of TFRecord files; matched files
        are read in sorted order when ``shuffle`` is False.
      seq_len: length of every ``input_ids`` list (parsing fails otherwise).
      batch_size: sequences per batch.
      shuffle: shuffle file order and records (buffer ``shuffle_buffer_size``),
        reshuffled every epoch. With a ``seed`` the order is reproducible.
      seed: shuffle seed (None: nondeterministic, faster parallel reads).
      repeat: False/None/1: one pass; True: forever; int n: n passes.
      compression: 'GZIP' (default), 'ZLIB' or None.
      drop_remainder: drop the last partial batch (static batch dimension).

    Records are batched first and parsed with one vectorised
    ``tf.io.parse_example`` call per batch, then prefetched.
    """
    tf = _tf()
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("shuffle_buffer_size", shuffle_buffer_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if repeat is True:
        epochs = -1
    elif repeat in (False, None):
        epochs = 1
    elif isinstance(repeat, numbers.Integral) and repeat >= 1:
        epochs = int(repeat)
    else:
        raise ValueError(f"repeat must be a bool or an integer >= 1, got {repeat!r}")

    files = _glob(file_pattern)
    comp = _compression(compression)
    autotune = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(
            lambda f: tf.data.TFRecordDataset(f, compression_type=comp),
            cycle_length=min(len(files), 16),
            num_parallel_calls=autotune,
            deterministic=seed is not None,
        )
        ds = ds.shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)
    else:
        ds = tf.data.TFRecordDataset(ds, compression_type=comp)
    if epochs != 1:
        ds = ds.repeat(epochs)
    ds = ds.batch(int(batch_size), drop_remainder=bool(drop_remainder))
    spec = {FEATURE_KEY: tf.io.FixedLenFeature([int(seq_len)], tf.int64)}

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, spec)
        return {FEATURE_KEY: tf.cast(parsed[FEATURE_KEY], tf.int32)}

    ds = ds.map(parse, num_parallel_calls=autotune, deterministic=(not shuffle) or seed is not None)
    return ds.prefetch(autotune)
