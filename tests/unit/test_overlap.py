"""training.overlap: the batch prefetch thread and the background
checkpoint writer of the engine's loop."""

import threading
import time

import numpy as np
import pytest

from training.checkpoint import Checkpointer
from training.overlap import BatchPrefetcher, CheckpointWriter

pytestmark = pytest.mark.unit


def test_prefetch_reads_ahead_in_order():
    made = []
    ahead = threading.Event()

    def make(step):
        made.append(step)
        if step == 3:
            ahead.set()
        return step * 10

    prefetch = BatchPrefetcher(make, 2, 7, depth=2)
    try:
        assert ahead.wait(10)  # step 3 was made before anyone asked for step 2
        assert [prefetch.next(s) for s in range(2, 7)] == [20, 30, 40, 50, 60]
        assert made == [2, 3, 4, 5, 6]
    finally:
        prefetch.close()


def test_prefetch_error_surfaces_at_its_step():
    def make(step):
        if step == 2:
            raise ValueError("tokens: the stream ended at micro-batch 2")
        return step

    prefetch = BatchPrefetcher(make, 0, 5)
    try:
        assert prefetch.next(0) == 0 and prefetch.next(1) == 1
        with pytest.raises(ValueError, match="ended at micro-batch 2"):
            prefetch.next(2)
    finally:
        prefetch.close()


class _SlowCheckpointer:
    def __init__(self):
        self.writing, self.order, self.overlapped = False, [], False

    def save(self, step, arrays):
        self.overlapped |= self.writing
        self.writing = True
        time.sleep(0.2)
        self.order.append(step)
        self.writing = False


def test_writer_runs_in_the_background_one_save_at_a_time():
    slow, written = _SlowCheckpointer(), []
    writer = CheckpointWriter(slow, written.append)
    start = time.perf_counter()
    writer.save(10, {})
    assert time.perf_counter() - start < 0.15  # returned while the file is written
    writer.save(20, {})  # waits for step 10 first
    writer.wait()
    assert slow.order == [10, 20] and written == [10, 20] and not slow.overlapped


def test_writer_error_surfaces_at_the_next_wait(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    writer = CheckpointWriter(Checkpointer(str(blocker / "ckpt"), {}))
    writer.save(1, {"w": np.zeros(3)})
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # reported once


def test_written_checkpoints_are_whole_and_the_last_two_kept(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), {"seed": 0})
    writer = CheckpointWriter(checkpointer)
    for step in (2, 4, 6):
        writer.save(step, {"w": np.full(4, step, np.float32)})
    writer.wait()
    assert checkpointer.steps() == [4, 6]
    assert np.array_equal(checkpointer.load(6)["w"], np.full(4, 6, np.float32))
