"""training.checkpoint's file handling: a failed write leaves nothing
behind (a retry after a full disk starts clean), the directory is fsynced
after the rename, and every process meets at a barrier after each save."""

import errno
import os
import stat

import numpy as np
import pytest

from training import checkpoint
from training.checkpoint import Checkpointer

pytestmark = pytest.mark.unit


def _arrays():
    return {"w": np.arange(8, dtype=np.float32)}


def test_a_failed_write_removes_its_temporary_file_and_a_retry_succeeds(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path), {"model": 1})
    real_savez = np.savez

    def disk_full(f, **arrays):
        f.write(b"\0" * 1024)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save(10, _arrays())
    leftovers = [n for n in os.listdir(tmp_path) if ".tmp" in n]
    assert leftovers == [] and ckpt.steps() == []
    monkeypatch.setattr(checkpoint.np, "savez", real_savez)
    ckpt.save(10, _arrays())
    assert ckpt.steps() == [10]
    assert np.array_equal(ckpt.load(10)["w"], _arrays()["w"])
    assert [n for n in os.listdir(tmp_path) if ".tmp" in n] == []


def test_the_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", record)
    Checkpointer(str(tmp_path), {"model": 1}).save(5, _arrays())
    assert synced and synced[-1] is True  # the last fsync is the directory's, after the rename
    assert False in synced                # and the file's own before it


@pytest.mark.parametrize("writer", [True, False])
def test_every_process_waits_at_a_barrier_after_each_save(tmp_path, writer):
    met = []

    def barrier(name):
        # process 0 reaches it only with the file in place
        met.append((name, os.path.exists(tmp_path / "ckpt-7.npz")))

    ckpt = Checkpointer(str(tmp_path), {"model": 1}, is_writer=writer, barrier=barrier)
    ckpt.save(7, _arrays())
    assert met == [("checkpoint-7", writer)]
