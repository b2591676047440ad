"""Host work off the device's critical path (the engine's loop):

* `BatchPrefetcher`: a thread reads the next steps' micro-batches (a memmap,
  or the forward-only stdin `TokenStream`) and puts them on the mesh while the
  current step runs;
* `host_arrays`: a checkpoint's device arrays fetched in one batched transfer;
* `CheckpointWriter`: the `.npz` written by a background thread; the next
  save (and the end of training) waits for the previous one, and a write
  error surfaces there. `Checkpointer.save` writes a temporary file and
  renames it, so a crash at any moment leaves whole checkpoints only.

No TensorFlow; JAX is imported lazily."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

_DONE = object()


class BatchPrefetcher:
    """Yields `make(step)` for step in [start, end), computed `depth` steps
    ahead in a background thread (in order: the source may be forward-only).
    An exception in `make` is re-raised by the `next()` that would have
    returned its batch."""

    def __init__(self, make: Callable[[int], object], start: int, end: int, depth: int = 2):
        self._make, self._start, self._end = make, start, end
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-batch-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for step in range(self._start, self._end):
                if not self._put((step, self._make(step), None)):
                    return
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            self._put((None, None, e))
            return
        self._put((None, _DONE, None))

    def next(self, step: int):
        got, value, error = self._queue.get()
        if error is not None:
            raise error
        if value is _DONE or got != step:
            raise RuntimeError(f"batch prefetch: expected step {step}, got {got}")
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)  # a read blocked on an idle stdin: a daemon, left behind


def host_arrays(arrays: Sequence) -> List[np.ndarray]:
    """Full host copies of device arrays: the fully addressable ones in one
    batched device_get, the others (multi-process shards) gathered one by one."""
    import jax

    from training.parallel import to_host

    out: List[Optional[np.ndarray]] = [None] * len(arrays)
    local = [i for i, a in enumerate(arrays) if getattr(a, "is_fully_addressable", True)]
    for i, value in zip(local, jax.device_get([arrays[i] for i in local])):
        out[i] = np.asarray(value)
    for i, a in enumerate(arrays):
        if out[i] is None:
            out[i] = to_host(a)
    return out


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time."""

    def __init__(self, checkpointer, on_written: Callable[[int], None] = lambda step: None):
        self.checkpointer, self.on_written = checkpointer, on_written
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def save(self, step: int, arrays: Dict[str, np.ndarray]) -> None:
        self.wait()

        def write():
            try:
                self.checkpointer.save(step, arrays)
                self.on_written(step)
            except BaseException as e:  # noqa: BLE001  (re-raised by wait)
                self._error = e

        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Blocks until the last save is on disk; re-raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
