"""Live TensorBoard events for the Trainer's model_run artifact, written on
the TFX side (the engine imports no TensorFlow) from the engine's metrics
records as they arrive (`training.launch.run_worker(metrics_fn=...)`):

    train/{loss,next_token_loss,perplexity,learning_rate,tokens_per_second,grad_norm}
    moe/<layer>/{load_max_min_ratio,load_max,load_min,load_cv,dropped_fraction,
                 bias_mean,bias_spread}        scalars, one point per log interval
    moe/<layer>/expert_load                    histogram of load / mean load
    moe/<layer>/expert_load_heatmap            image: experts x steps so far
    eval/...                                   after training, at the final step

Beside the events, `training_metrics.jsonl` keeps the interval records (the
run report draws from it). A resumed run starts at its checkpoint's step:
everything after that step (and the last attempt's eval) is pruned from both
before the new points come, so the curves continue without duplicated steps.
The writing happens on a thread, so reading the engine's output never waits
for a picture to be drawn; when the engine logs faster than the pictures are
drawn, a heatmap whose next interval is already waiting is skipped (the next
one shows it too), so the scalars never fall behind and the last interval
always has its picture."""

from __future__ import annotations

import json
import os
import queue
import threading
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np

METRICS_FILE = "training_metrics.jsonl"
EVENTS_MARK = "tfevents"  # TensorBoard reads every file whose name holds it
TRAIN_SCALARS = ("loss", "next_token_loss", "perplexity", "learning_rate", "tokens_per_second",
                 "grad_norm")
MOE_SCALARS = ("load_max_min_ratio", "load_cv", "dropped_fraction", "bias_mean", "bias_spread")


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def event_files(log_dir: str) -> List[str]:
    gfile = _gfile()
    if not gfile.isdir(log_dir):
        return []
    return sorted(os.path.join(log_dir, name) for name in gfile.listdir(log_dir)
                  if EVENTS_MARK in name and not name.endswith(".tmp"))


def read_metrics(log_dir: str) -> List[dict]:
    """The interval records of `training_metrics.jsonl` (empty when absent)."""
    gfile = _gfile()
    path = os.path.join(log_dir, METRICS_FILE)
    if not gfile.exists(path):
        return []
    with gfile.GFile(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _keep(tag: str, step: int, start_step: int) -> bool:
    return step <= start_step and not tag.startswith("eval/")


def prune_events(log_dir: str, start_step: int) -> int:
    """Rewrites the event files of `log_dir` as one file holding each
    (tag, step) once (the newest), for steps <= start_step and no eval/ tag;
    -> the number of values kept. Crash-safe: the new file is complete before
    the old ones go, and a second pass over both gives the same file."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    files = event_files(log_dir)
    if not files:
        return 0
    kept: Dict[tuple, "event_pb2.Event"] = {}
    for path in files:
        try:
            for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
                event = event_pb2.Event.FromString(raw)
                if not event.HasField("summary"):
                    continue
                for value in event.summary.value:
                    if _keep(value.tag, event.step, start_step):
                        one = event_pb2.Event(wall_time=event.wall_time, step=event.step)
                        one.summary.value.add().CopyFrom(value)
                        kept[(value.tag, event.step)] = one
        except tf.errors.DataLossError:  # the end of a file cut by a kill: keep what was read
            pass
    gfile = _gfile()
    if not kept:
        for path in files:
            gfile.remove(path)
        return 0
    # Named after the oldest file, so TensorBoard reads it before the new writer's.
    final = files[0] if files[0].endswith(".pruned") else files[0] + ".pruned"
    tmp = final + ".tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
        header = event_pb2.Event(wall_time=min([e.wall_time for e in kept.values()] or [0.0]),
                                 file_version="brain.Event:2")
        writer.write(header.SerializeToString())
        for event in sorted(kept.values(), key=lambda e: (e.step, e.wall_time)):
            writer.write(event.SerializeToString())
    gfile.rename(tmp, final, overwrite=True)
    for path in files:
        if path != final:
            gfile.remove(path)
    return len(kept)


def prune_metrics(log_dir: str, start_step: int) -> List[dict]:
    """Keeps the records of steps <= start_step (each step once); -> them."""
    gfile = _gfile()
    by_step = {r["step"]: r for r in read_metrics(log_dir) if r["step"] <= start_step}
    records = [by_step[s] for s in sorted(by_step)]
    path = os.path.join(log_dir, METRICS_FILE)
    if records or gfile.exists(path):
        tmp = path + ".tmp"
        with gfile.GFile(tmp, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        gfile.rename(tmp, path, overwrite=True)
    return records


def load_extremes(load_fraction) -> Dict[str, float]:
    """The most and least loaded expert's load / mean load (1 = balanced)."""
    share = np.asarray(load_fraction, np.float64) * len(load_fraction)
    return {"load_max": float(share.max()), "load_min": float(share.min())}


class TrainingEvents:
    """`metrics_fn` for `training.launch.run_worker`: call it with each engine
    record; `write_eval` after evaluation; `close()` at the end (re-raises a
    failure of the writer thread)."""

    def __init__(self, log_dir: str, log_fn: Optional[Callable[[str], None]] = None):
        self.log_dir = log_dir
        self.log_fn = log_fn or (lambda line: None)
        self.records: List[dict] = []  # this run's and the kept earlier ones
        self.log_every: Optional[int] = None
        self.error: Optional[BaseException] = None
        self._writer = None
        self._waiting_intervals = 0  # queued, not yet written
        self._lock = threading.Lock()
        self._queue: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tensorboard-events", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- callers
    def __call__(self, record: Mapping) -> None:
        if record.get("event") == "interval":
            with self._lock:
                self._waiting_intervals += 1
        self._queue.put(dict(record))

    def write_eval(self, step: int, evaluation: Mapping, experts: Optional[Mapping] = None) -> None:
        self._queue.put({"event": "eval", "step": step, "evaluation": dict(evaluation),
                         "experts": dict(experts or {})})

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.error is not None:
            raise RuntimeError(f"writing the TensorBoard events in {self.log_dir} failed: "
                               f"{type(self.error).__name__}: {self.error}") from self.error

    # -------------------------------------------------------------- thread
    def _run(self) -> None:
        try:  # the imports now, while the engine compiles, not at the first interval
            import tensorflow  # noqa: F401
            from matplotlib.backends import backend_agg  # noqa: F401

            import report.plots  # noqa: F401
        except BaseException as e:  # noqa: BLE001  (re-raised by close)
            self.error = e
        while True:
            record = self._queue.get()
            if record is None:
                return
            if self.error is not None:
                continue  # drain: the first failure is reported by close()
            try:
                handler = {"start": self._start, "interval": self._interval,
                           "eval": self._eval}.get(record.get("event"))
                if handler is not None:
                    handler(record)
            except BaseException as e:  # noqa: BLE001  (re-raised by close)
                self.error = e

    def _open(self):
        if self._writer is None:
            import tensorflow as tf

            _gfile().makedirs(self.log_dir)
            self._writer = tf.summary.create_file_writer(self.log_dir)
        return self._writer

    def _start(self, record: Mapping) -> None:
        start = int(record["start_step"])
        self.log_every = record.get("log_every")
        _gfile().makedirs(self.log_dir)
        prune_events(self.log_dir, start)
        self.records = prune_metrics(self.log_dir, start)
        if start:
            self.log_fn(f"tensorboard: continuing the curves in {self.log_dir} after step {start}")
        self._open()

    def _interval(self, record: Mapping) -> None:
        import tensorflow as tf

        from report.plots import expert_load_heatmap, rgb

        step = int(record["step"])
        with self._lock:
            self._waiting_intervals -= 1
            behind = self._waiting_intervals > 0
        clean = {k: v for k, v in record.items() if k not in ("event",)}
        self.records.append(clean)
        with self._open().as_default(step=step):
            for key in TRAIN_SCALARS:
                if record.get(key) is not None:
                    tf.summary.scalar(f"train/{key}", record[key])
            for layer, stats in (record.get("experts") or {}).items():
                values = dict(stats, **load_extremes(stats["load_fraction"]))
                for key in MOE_SCALARS + ("load_max", "load_min"):
                    if values.get(key) is not None:
                        tf.summary.scalar(f"moe/{layer}/{key}", values[key])
                share = np.asarray(stats["load_fraction"], np.float64) * len(stats["load_fraction"])
                tf.summary.histogram(f"moe/{layer}/expert_load", share)
                if behind:
                    continue
                history = [r for r in self.records if layer in (r.get("experts") or {})]
                pixels = rgb(expert_load_heatmap(layer, history, self.log_every))
                tf.summary.image(f"moe/{layer}/expert_load_heatmap", pixels[None],
                                 description="experts x optimizer steps, load / mean load "
                                             "(1 = balanced, 0 = no tokens)")
        self._writer.flush()  # visible to TensorBoard now, not at close
        path = os.path.join(self.log_dir, METRICS_FILE)
        if "://" in path:  # object stores (gs://, s3://) cannot append: the whole file again
            with _gfile().GFile(path, "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.records))
        else:
            with open(path, "a") as f:
                f.write(json.dumps(clean) + "\n")

    def _eval(self, record: Mapping) -> None:
        import tensorflow as tf

        evaluation = record["evaluation"]
        with self._open().as_default(step=int(record["step"])):
            for key in ("eval_loss", "eval_perplexity", "eval_next_token_accuracy"):
                if evaluation.get(key) is not None:
                    tf.summary.scalar(f"eval/{key[len('eval_'):]}", evaluation[key])
            for layer, stats in (record.get("experts") or {}).items():
                for key in ("load_max_min_ratio", "load_cv", "dropped_fraction"):
                    if stats.get(key) is not None:
                        tf.summary.scalar(f"eval/moe/{layer}/{key}", stats[key])
        self._writer.flush()
