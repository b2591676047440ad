"""Streaming training batches into the engine: training.token_stream.TokenStream
(the worker's reader of its stdin) and training.launch.BatchFeeder (the
parent's writer thread), through a real pipe."""

import io
import os

import numpy as np
import pytest

from training.launch import BatchFeeder
from training.token_stream import TokenStream

pytestmark = pytest.mark.unit

B, S = 3, 5


def _batches(n, seed=0, b=B, s=S):
    return np.random.default_rng(seed).integers(0, 1000, (n, b, s)).astype(np.int32)


def test_reads_like_the_array_in_order_and_skips_forward():
    data = _batches(7)
    stream = TokenStream(io.BytesIO(data.tobytes()), 7, B, S)
    assert (stream.ndim, stream.shape, len(stream)) == (3, (7, B, S), 7)
    # What Engine.train does with A=2 after resuming at step 1: tokens[2:4], tokens[4:6].
    np.testing.assert_array_equal(stream[2:4], data[2:4])
    np.testing.assert_array_equal(stream[4:6], data[4:6])
    assert stream[6:6].shape == (0, B, S) and stream.position == 6
    with pytest.raises(ValueError, match="reads forward only: micro-batch 5 requested, 6 already"):
        stream[5:6]
    with pytest.raises(TypeError, match="forward slices"):
        stream[6]
    np.testing.assert_array_equal(stream[6:], data[6:])


def test_a_short_stream_names_how_many_batches_it_had():
    stream = TokenStream(io.BytesIO(_batches(2).tobytes() + b"\0" * 8), 4, B, S)
    with pytest.raises(EOFError, match=r"ended after 2 of 4 micro-batches of \[3, 5\] int32"):
        stream[0:4]


def test_feeder_through_a_pipe_and_a_reader_that_leaves_early():
    data = _batches(64, b=16, s=256)  # 16 kB a batch: far more than a pipe holds
    read_end, write_end = os.pipe()
    feeder = BatchFeeder(os.fdopen(write_end, "wb"), iter(data))
    feeder.start()
    with os.fdopen(read_end, "rb") as reader:
        stream = TokenStream(reader, 64, 16, 256)
        np.testing.assert_array_equal(stream[0:10], data[0:10])
    # The reader is gone (the child exited): the feeder stops on the broken
    # pipe without an error of its own.
    feeder.join(timeout=30)
    assert not feeder.is_alive() and feeder.error is None and feeder.written < 64


def test_feeder_keeps_the_data_error_and_closes_the_pipe():
    def batches():
        yield _batches(1)[0]
        raise ValueError("fn_args.train_files: got 1 batches, need 4")

    read_end, write_end = os.pipe()
    feeder = BatchFeeder(os.fdopen(write_end, "wb"), batches())
    feeder.start()
    with os.fdopen(read_end, "rb") as reader:
        stream = TokenStream(reader, 4, B, S)
        with pytest.raises(EOFError, match="ended after 1 of 4"):
            stream[0:2]
    feeder.join(timeout=30)
    assert isinstance(feeder.error, ValueError) and "need 4" in str(feeder.error)
