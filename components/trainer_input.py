"""The Trainer's Examples as token batches, read the TFX way:
`fn_args.data_accessor.tf_dataset_factory` over the split's files with the
curated schema (`fn_args.schema_path`, else the schema CuratedSchemaGen
writes), seeded shuffle for training, one pass for evaluation."""

from __future__ import annotations

import os
from typing import Iterator, List, Optional

import numpy as np

from components.trainer_config import TrainerSettings

FEATURE = "input_ids"


class TokenDataError(ValueError):
    """The Examples hold something the model cannot read as token ids
    (out of the vocabulary, negative); names the split."""


def _split_name(what: str) -> str:
    return {"train_files": "train", "eval_files": "eval"}.get(what, what)


def check_token_ids(batch: np.ndarray, vocab_size: int, what: str, index: int) -> None:
    """Ids outside [0, vocab) would index past the embedding (a negative one
    silently wraps): a data error here, not a divergence in the engine."""
    low, high = int(batch.min()), int(batch.max())
    if low < 0 or high >= vocab_size:
        bad = batch[(batch < 0) | (batch >= vocab_size)]
        raise TokenDataError(
            f"{_split_name(what)} split: batch {index} holds {bad.size} token id(s) outside the "
            f"model's vocabulary [0, {vocab_size}) (min {low}, max {high}); the records' "
            f"{FEATURE} must be token ids of a vocabulary of {vocab_size}")


def resolve_file_patterns(files, what: str = "train_files") -> List[str]:
    """TFX gives a list of patterns (`<uri>/Split-train/*`); a directory is
    expanded to `<dir>/*`. Raises if nothing matches."""
    import tensorflow as tf

    if files is None:
        raise ValueError(f"fn_args.{what}: no files given")
    items = [files] if isinstance(files, str) else list(files)
    patterns = [os.path.join(p, "*") if tf.io.gfile.isdir(p) else p for p in items]
    matched = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not matched:
        raise ValueError(f"fn_args.{what}: no files match {items!r}")
    return patterns


def _schema(fn_args, settings: TrainerSettings):
    """The curated schema: fn_args' schema file, else the one we know."""
    from tensorflow_metadata.proto.v0 import schema_pb2
    from tfx.utils import io_utils

    from components.curated_schema import make_schema

    path = getattr(fn_args, "schema_path", None) or getattr(fn_args, "schema_file", None)
    if path:
        if os.path.isdir(path):
            path = os.path.join(path, "schema.pbtxt")
        return io_utils.parse_pbtxt_file(path, schema_pb2.Schema())
    return make_schema(settings.model_config.vocab_size, settings.seq_len)


def _dataset(fn_args, settings: TrainerSettings, files, shuffle: bool, what: str):
    """(tf.data of [B, S] token batches, file patterns): seeded-shuffle and
    endless when shuffle, else one pass with a short last batch."""
    from tfx_bsl.public import tfxio

    accessor = getattr(fn_args, "data_accessor", None)
    if accessor is None:
        raise ValueError("fn_args.data_accessor: missing (TFX's Trainer executor gives one; "
                         "tfx.components.trainer.fn_args_utils.DataAccessor)")
    t = settings.training
    patterns = resolve_file_patterns(files, what)
    options = tfxio.TensorFlowDatasetOptions(
        batch_size=t.batch_size, shuffle=shuffle, shuffle_seed=t.seed if shuffle else None,
        num_epochs=None if shuffle else 1, drop_final_batch=shuffle)
    dataset = accessor.tf_dataset_factory(patterns, options, _schema(fn_args, settings))
    dataset = dataset.map(lambda f: f[FEATURE])  # int64: checked against the vocab, then cast
    return dataset, patterns


def read_batches(fn_args, settings: TrainerSettings, files, batches: Optional[int],
                 what: str) -> np.ndarray:
    """[examples, S] int32 tokens of the first `batches` batches of one pass
    over `files` (all of them when batches is None); for evaluation."""
    dataset, patterns = _dataset(fn_args, settings, files, False, what)
    if batches:
        dataset = dataset.take(batches)
    vocab = settings.model_config.vocab_size
    arrays = []
    for index, batch in enumerate(dataset.as_numpy_iterator()):
        batch = np.asarray(batch)
        check_token_ids(batch, vocab, what, index)
        arrays.append(batch.astype(np.int32))
    if not arrays:
        raise ValueError(f"fn_args.{what}: {list(patterns)!r} has no examples")
    return np.concatenate(arrays)


def stream_batches(fn_args, settings: TrainerSettings, files, batches: int,
                   what: str = "train_files") -> Iterator[np.ndarray]:
    """The `batches` seeded-shuffle [B, S] int32 training batches, lazily.
    The first one is read now, so an empty split or a wrong shape fails
    here, before the engine starts; a split that runs short fails when it
    does, naming how many batches it gave."""
    dataset, patterns = _dataset(fn_args, settings, files, True, what)
    # In a list, so the generator below can drop it once it has read the last batch.
    source = [dataset.take(batches).as_numpy_iterator()]
    expected = (settings.training.batch_size, settings.seq_len)

    vocab = settings.model_config.vocab_size

    def checked(batch, index):
        batch = np.asarray(batch)
        if batch.shape != expected:
            raise ValueError(f"fn_args.{what}: batch {index} has shape {batch.shape}, "
                             f"expected {expected} (batch_size, seq_len)")
        check_token_ids(batch, vocab, what, index)  # before the int32 cast can wrap int64 ids
        return np.ascontiguousarray(batch, np.int32)

    first = next(source[0], None)
    if first is None:
        raise ValueError(f"fn_args.{what}: {list(patterns)!r} has no examples")
    first = checked(first, 0)

    def rest():
        yield first
        for n in range(1, batches):
            # Never past the last batch: in the Trainer, with the engine busy
            # on every core, tf.data took 6-54 s to report the end of a
            # take() it had already reached (make run, session 27).
            batch = next(source[0], None)
            if batch is None:
                raise ValueError(f"fn_args.{what}: got {n} batches, need {batches}")
            yield checked(batch, n)
        source.clear()  # the iterator goes with the thread that read it to the end

    return rest()


def data_identity(files, what: str = "train_files") -> str:
    """A short hash of the training data as the engine will see it: each
    file's split-relative name, size and first MiB (content, not the
    artifact URI, so a re-materialised identical split keeps it). Part of
    the checkpoint fingerprint: changed data never resumes old checkpoints."""
    import hashlib

    import tensorflow as tf

    digest = hashlib.sha256()
    paths = sorted({p for pattern in resolve_file_patterns(files, what) for p in tf.io.gfile.glob(pattern)})
    for path in paths:
        name = "/".join(path.rstrip("/").split("/")[-2:])
        digest.update(f"{name}:{tf.io.gfile.stat(path).length}\n".encode())
        with tf.io.gfile.GFile(path, "rb") as f:
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]
