"""Training checkpoints: model variables (weights, router biases, MoE
counters, float8 scales) keyed by their path inside the model, optimizer
variables (step counter, moments) keyed by position, and the step.

One `.npz` per checkpoint holding full (gathered) arrays, so a checkpoint is
independent of the mesh it was written on: restoring lays each array out
with the sharding of the variable it goes into (1 device -> 8, DP -> EP).
Every checkpoint stores the fingerprint of its training setup (data
identity, optimizer, precision, base model, ...): resuming compares the
checkpoint's own fingerprint, so a run killed during its first save cannot
leave a directory whose fingerprint is another setup's.
Written atomically (temporary file, fsync, rename, fsync of the directory)
by process 0; a failed write removes its temporary file (a disk-full retry
starts clean); with several processes every one waits at a barrier until
the file is in place, not in the next collective (gloo gives up after
30 s). The last `keep` are kept (`trainer_state.json` shows the newest one's setup).
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, List, Optional

import numpy as np

STATE_FILE = "trainer_state.json"
FINGERPRINT_KEY = "__fingerprint__"
_NAME = re.compile(r"^ckpt-(\d+)\.npz$")


class CheckpointMismatchError(ValueError):
    pass


def relative_path(variable) -> str:
    """A variable's path inside its model (the instance-specific model name stripped)."""
    return variable.path.split("/", 1)[1] if "/" in variable.path else variable.path


class Checkpointer:
    def __init__(self, directory: str, fingerprint: dict, keep: int = 2, is_writer: bool = True,
                 barrier: Optional[Callable[[str], None]] = None):
        self.directory = directory
        self.fingerprint = fingerprint
        self.keep = keep
        self.is_writer = is_writer
        # Called by every process after each save (a name per checkpoint).
        self.barrier = barrier

    def steps(self) -> List[int]:
        if not os.path.isdir(self.directory):
            return []
        found = (_NAME.match(n) for n in os.listdir(self.directory))
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"ckpt-{step}.npz")

    def latest(self) -> Optional[int]:
        steps = self.steps()
        return steps[-1] if steps else None

    def saved_fingerprint(self, step: int) -> Optional[dict]:
        """The fingerprint stored in ckpt-<step>.npz (older checkpoints: the
        directory's trainer_state.json), None when there is neither."""
        with np.load(self.path(step)) as data:
            if FINGERPRINT_KEY in data.files:
                return json.loads(str(data[FINGERPRINT_KEY]))
        state_path = os.path.join(self.directory, STATE_FILE)
        if os.path.exists(state_path):
            with open(state_path) as f:
                return json.load(f)
        return None

    def check_fingerprint(self, step: int) -> None:
        """Refuses to resume ckpt-<step> under a different training setup,
        naming each setting that changed (old -> new)."""
        saved = self.saved_fingerprint(step)
        if saved is None:
            raise CheckpointMismatchError(
                f"{self.path(step)} records no training setup; point training.checkpoint_dir "
                f"at a fresh directory")
        changed = fingerprint_changes(saved, self.fingerprint)
        if changed:
            raise CheckpointMismatchError(
                f"the checkpoint {self.path(step)} comes from a different training setup "
                f"(changed: {'; '.join(changed)}); point training.checkpoint_dir at a fresh "
                f"directory")

    def save(self, step: int, arrays: Dict[str, np.ndarray]) -> Optional[str]:
        """Writes ckpt-<step>.npz atomically (process 0), then meets the
        other processes at the barrier."""
        final = None
        if self.is_writer:
            os.makedirs(self.directory, exist_ok=True)
            # For people and tools: the setup of the newest checkpoint.
            _atomic_write_text(os.path.join(self.directory, STATE_FILE),
                               json.dumps(self.fingerprint, indent=2, sort_keys=True))
            final = self.path(step)
            # The setup travels in every checkpoint: a directory never holds
            # a checkpoint whose fingerprint is another run's.
            stamp = np.asarray(json.dumps(self.fingerprint, sort_keys=True))
            _atomic_write(final, lambda f: np.savez(f, __step__=np.asarray(step, np.int64),
                                                    **{FINGERPRINT_KEY: stamp}, **arrays))
            for old in self.steps()[:-self.keep]:
                os.remove(self.path(old))
            _fsync_dir(self.directory)
        if self.barrier is not None:
            self.barrier(f"checkpoint-{step}")
        return final

    def load(self, step: int) -> Dict[str, np.ndarray]:
        with np.load(self.path(step)) as data:
            arrays = {k: data[k] for k in data.files}
        arrays.pop(FINGERPRINT_KEY, None)
        saved_step = int(arrays.pop("__step__"))
        if saved_step != step:
            raise CheckpointMismatchError(f"{self.path(step)} holds step {saved_step}, not {step}")
        return arrays


#: How a change of these fingerprint keys is named.
_LABELS = {"base_model_identity": "base model (the checkpoint training started from)"}


def fingerprint_changes(saved: dict, current: dict, prefix: str = "") -> List[str]:
    """'key: old -> new' for every leaf that differs (nested dicts walked)."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if key in _LABELS and old != new:
            changes.append(f"{_LABELS[key]}: {old!r} -> {new!r}")
            continue
        if isinstance(old, dict) and isinstance(new, dict) and key != "base_model":
            changes += fingerprint_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            if isinstance(old, dict) or isinstance(new, dict):
                fields = sorted(k for k in set(old or {}) | set(new or {})
                                if (old or {}).get(k) != (new or {}).get(k))
                changes.append(f"{prefix}{key} ({', '.join(fields)})")
            else:
                changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


def _atomic_write(path: str, write: Callable) -> None:
    """write(file) into a temporary file, fsync, rename over `path`, fsync
    the directory (the rename itself survives a crash). Any failure removes
    the temporary file and re-raises."""
    tmp = path + f".tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old set or the new file
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


class EngineCheckpoints:
    """The engine's training state, (trainable, non-trainable, optimizer)
    arrays, checkpointed every `checkpoint_every` steps and at the last one;
    model variables keyed "model/<path>", optimizer variables by position."""

    def __init__(self, settings, fingerprint: dict, model, optimizer,
                 log_fn: Callable[[str], None], is_writer: bool,
                 barrier: Optional[Callable[[str], None]] = None):
        self.s, self.log_fn = settings, log_fn
        self.checkpointer = Checkpointer(settings.checkpoint_dir, fingerprint, is_writer=is_writer,
                                         barrier=barrier)
        self.keys = ["model/" + relative_path(v) for v in
                     model.trainable_variables + model.non_trainable_variables]
        self.keys += [f"optimizer/{i:05d}" for i in range(len(optimizer.variables))]
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("two model variables share a path")
        self.sizes = (len(model.trainable_variables), len(model.non_trainable_variables))
        self.last: Optional[int] = None  # the last step saved or resumed from
        self._writer = None  # training.overlap.CheckpointWriter, from the first save

    def _flat(self, state) -> list:
        return [x for part in state for x in part]

    def _split(self, values: list):
        n_tv, n_ntv = self.sizes
        return values[:n_tv], values[n_tv:n_tv + n_ntv], values[n_tv + n_ntv:]

    def resume(self, state):
        """-> (start step, state): the latest checkpoint laid out like `state`, else (0, state)."""
        from training.parallel import global_array

        c = self.checkpointer
        step = c.latest()
        if step is None:
            return 0, state
        c.check_fingerprint(step)
        if step > self.s.train_steps:
            raise CheckpointMismatchError(
                f"the checkpoint in {c.directory} is at step {step} > train_steps "
                f"{self.s.train_steps}; use a fresh checkpoint directory")
        arrays, where = c.load(step), c.path(step)
        missing = sorted(set(self.keys) - set(arrays))
        extra = sorted(set(arrays) - set(self.keys))
        if missing or extra:
            raise CheckpointMismatchError(
                f"checkpoint {where} does not match this model/optimizer (missing {missing[:5]}, "
                f"unexpected {extra[:5]}); point training.checkpoint_dir at a fresh directory")
        values = []
        for key, ref in zip(self.keys, self._flat(state)):
            host = arrays[key]
            if tuple(host.shape) != tuple(ref.shape):
                raise CheckpointMismatchError(f"checkpoint {where}: {key} has shape {host.shape}, "
                                              f"the model needs {tuple(ref.shape)}")
            values.append(global_array(host.astype(ref.dtype), ref.sharding))
        self.last = step
        self.log_fn(f"resuming from step {step} ({where})")
        return step, self._split(values)

    def due(self, done: int) -> bool:
        return done % self.s.checkpoint_every == 0 or done == self.s.train_steps

    def after_step(self, done: int, state) -> None:
        """At a checkpoint step: the state fetched in one batched transfer
        (before the next step reuses its buffers), then written by a
        background thread while training goes on; "checkpoint step N" is
        logged once it is on disk."""
        if not self.due(done):
            return
        from training.overlap import CheckpointWriter, host_arrays

        if self._writer is None:
            self._writer = CheckpointWriter(self.checkpointer, self._written)
        self._writer.save(done, dict(zip(self.keys, host_arrays(self._flat(state)))))

    def _written(self, step: int) -> None:
        self.last = step
        self.log_fn(f"checkpoint step {step}")

    def finish(self) -> None:
        """Waits for the checkpoint being written (re-raising its error)."""
        if self._writer is not None:
            self._writer.wait()

    def steps(self) -> List[int]:
        return self.checkpointer.steps()
