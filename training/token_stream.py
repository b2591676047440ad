"""Training batches read in order from a byte stream (the worker's stdin),
so the Trainer adapter can stream its tf.data batches into the engine
instead of writing every batch of the run to disk first.

The stream holds `batches` micro-batches of [batch_size, seq_len] int32
(native byte order, C order), back to back, nothing else.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np


class TokenStream:
    """Looks like the [micro-batches, B, S] array `Engine.train` reads:
    `shape`, `ndim`, `len()` and `stream[i:j]`, with i never going back.
    Micro-batches before i are read and discarded, so a run resuming at
    step k skips the k x gradient_accumulation batches it already trained on
    and sees the batches an uninterrupted run would."""

    def __init__(self, stream: BinaryIO, batches: int, batch_size: int, seq_len: int):
        for name, value in (("batches", batches), ("batch_size", batch_size), ("seq_len", seq_len)):
            if int(value) < 1:
                raise ValueError(f"TokenStream: {name} must be >= 1, got {value}")
        self.shape = (int(batches), int(batch_size), int(seq_len))
        self.ndim = 3
        self.dtype = np.dtype(np.int32)
        self._stream = stream
        self._position = 0  # micro-batches consumed so far

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def position(self) -> int:
        return self._position

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"TokenStream supports only forward slices stream[i:j], got {index!r}")
        start, stop, _ = index.indices(len(self))
        if start < self._position:
            raise ValueError(f"TokenStream reads forward only: micro-batch {start} requested, "
                             f"{self._position} already read")
        while self._position < start:  # skip (resume): one batch at a time bounds memory
            self._read(1)
        return self._read(max(stop - start, 0))

    def _read(self, n: int) -> np.ndarray:
        out = np.empty((n,) + self.shape[1:], np.int32)
        if n == 0:
            return out
        view = memoryview(out).cast("B")
        got = 0
        while got < len(view):
            k = self._stream.readinto(view[got:])
            if not k:
                batch_bytes = out[0].nbytes
                raise EOFError(f"the token stream ended after {self._position + got // batch_bytes}"
                               f" of {len(self)} micro-batches of {list(self.shape[1:])} int32")
            got += k
        self._position += n
        return out


__all__ = ["TokenStream"]
