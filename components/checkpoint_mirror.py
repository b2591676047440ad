"""Checkpoints on a remote URI (gs://, s3://, ...) for an engine that only
writes local files (it runs without TensorFlow, so without tf.io.gfile).

The engine checkpoints into a local staging directory; the Trainer adapter
copies each checkpoint to the run's checkpoint URI as soon as the engine
reports it (`checkpoint step N`), and before a (re)started run fetches the
newest one back, so a retried pod on a fresh disk resumes where the last
mirrored checkpoint left off. Uploads go to a temporary name first and are
renamed, so the URI never holds a half-written checkpoint under its final
name; the last `keep` are kept there, as locally."""

from __future__ import annotations

import os
import re
import time
from typing import List, Optional

from training.checkpoint import STATE_FILE

_NAME = re.compile(r"^ckpt-(\d+)\.npz$")
_LINE = re.compile(r"^checkpoint step (\d+)$")


def is_remote(uri: Optional[str]) -> bool:
    """A URI that plain `os` calls cannot reach (file:// and paths are local)."""
    return bool(uri) and "://" in uri and not uri.startswith("file://")


class CheckpointMirror:
    def __init__(self, uri: str, local_dir: str, keep: int = 2):
        self.uri, self.local_dir, self.keep = uri.rstrip("/"), local_dir, keep
        self.seconds = 0.0  # time spent copying (the mirroring overhead)
        self.mirrored: List[int] = []

    @staticmethod
    def _gfile():
        import tensorflow as tf

        return tf.io.gfile

    def remote_steps(self) -> List[int]:
        gfile = self._gfile()
        if not gfile.isdir(self.uri):
            return []
        found = (_NAME.match(n.rstrip("/")) for n in gfile.listdir(self.uri))
        return sorted(int(m.group(1)) for m in found if m)

    def fetch_latest(self) -> Optional[int]:
        """Copies the newest remote checkpoint (and the fingerprint) into the
        local directory; returns its step, None when the URI has none."""
        gfile = self._gfile()
        steps = self.remote_steps()
        if not steps:
            return None
        started = time.perf_counter()
        os.makedirs(self.local_dir, exist_ok=True)
        names = [f"ckpt-{steps[-1]}.npz"]
        if gfile.exists(f"{self.uri}/{STATE_FILE}"):
            names.append(STATE_FILE)
        for name in names:
            local = os.path.join(self.local_dir, name)
            gfile.copy(f"{self.uri}/{name}", local + ".fetch", overwrite=True)
            os.replace(local + ".fetch", local)
        self.seconds += time.perf_counter() - started
        return steps[-1]

    def push(self, step: int) -> None:
        gfile = self._gfile()
        started = time.perf_counter()
        gfile.makedirs(self.uri)
        names = [STATE_FILE] if os.path.exists(os.path.join(self.local_dir, STATE_FILE)) else []
        for name in names + [f"ckpt-{step}.npz"]:
            final = f"{self.uri}/{name}"
            gfile.copy(os.path.join(self.local_dir, name), final + ".tmp", overwrite=True)
            gfile.rename(final + ".tmp", final, overwrite=True)
        for old in self.remote_steps()[:-self.keep]:
            gfile.remove(f"{self.uri}/ckpt-{old}.npz")
        self.mirrored.append(step)
        self.seconds += time.perf_counter() - started

    def on_line(self, line: str) -> None:
        """The engine's `checkpoint step N` line: that checkpoint is in place."""
        found = _LINE.match(line)
        if found:
            self.push(int(found.group(1)))
