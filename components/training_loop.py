"""The pieces of the Trainer's training loop: device / strategy / precision
choice, the learning-rate schedule and optimizer, the input pipeline,
resumable checkpoints, and the per-step monitor (NaN guard, console progress,
TensorBoard scalars, MoE expert statistics).

Design notes
------------
* Training runs through `model.fit` on a repeated, seeded dataset for exactly
  `total_steps - start_step` steps. The global step is the optimizer's
  `iterations` counter (1-based in the monitor: "step N" = N updates done).
* Learning rate: linear warmup from peak/warmup to the peak over
  `warmup_steps`, then cosine decay to `MIN_LR_RATIO` x peak at `total_steps`
  (`WarmupCosineSchedule`). AdamW (beta_2 0.95, eps 1e-8) with decoupled
  weight decay on matrices only (1-D scales and biases are exempt), and an
  optional global gradient-norm clip.
* Checkpoints (`TrainingCheckpoint`): a `tf.train.Checkpoint` over two flat
  dicts, every model variable keyed by its path inside the model (trainable
  weights, MoE router bias and statistics, float8 scales) and every optimizer
  variable (its iteration counter = the step, moments) keyed by position. The
  model's own object graph is not used because `tf.train.Checkpoint` does not
  see Keras 3's tracked layer lists. `tf.train.CheckpointManager` writes them
  atomically and keeps the last two.
* Resuming is exact: weights, router biases, optimizer moments and the step
  are restored, and the (seeded, deterministic) training stream skips the
  batches already consumed, so a resumed run sees the same batches in the same
  order as an uninterrupted one.
* MoE statistics under MirroredStrategy: `DeepSeekMoE` accumulates its load
  counters with `assign_add`, which Keras implements as `assign(v + delta)`;
  on a variable with aggregation "sum" TensorFlow then sums the *new values*
  of the R replicas, i.e. v <- R * v + sum(delta). The counters are therefore
  only exact right after a reset, so with more than one replica the monitor
  reads and resets them after every step and accumulates on the host.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

MIN_LR_RATIO = 0.1
KEEP_CHECKPOINTS = 2

import keras  # noqa: E402  (Keras 3; never tf.keras)
import tensorflow as tf  # noqa: E402


# --------------------------------------------------------------- devices
def visible_gpus() -> List[str]:
    return [d.name for d in tf.config.list_logical_devices("GPU")]


def select_devices(requested: Optional[Sequence[str]] = None) -> List[str]:
    """The devices to train on: `requested` if given, else every visible GPU
    (an empty list means "the default CPU device")."""
    if requested:
        return list(requested)
    return visible_gpus()


def _is_gpu(device: str) -> bool:
    return "GPU" in device.upper()


def select_strategy(devices: Sequence[str]) -> tf.distribute.Strategy:
    """MirroredStrategy over `devices` when there is a GPU among them or more
    than one device (e.g. ["/cpu:0", "/cpu:1"] logical CPUs in tests);
    otherwise TensorFlow's default (no-op) strategy."""
    devices = list(devices)
    if len(devices) > 1 or any(_is_gpu(d) for d in devices):
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def resolve_precision(precision: str, devices: Sequence[str]) -> Tuple[str, bool]:
    """-> (Keras dtype policy, whether to quantize the model to float8).

    "auto": mixed_bfloat16 on GPU, float32 on CPU. "bf16": mixed_bfloat16.
    "float8": float8 training of the Dense layers (Keras `model.quantize`)
    on top of the "auto" policy."""
    on_gpu = any(_is_gpu(d) for d in devices)
    auto = "mixed_bfloat16" if on_gpu else "float32"
    if precision == "auto":
        return auto, False
    if precision == "float32":
        return "float32", False
    if precision == "bf16":
        return "mixed_bfloat16", False
    if precision == "float8":
        return auto, True
    raise ValueError(f"unknown precision {precision!r}")


@contextlib.contextmanager
def dtype_policy(name: str):
    """Sets Keras' global dtype policy for the block, then restores it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# ------------------------------------------------------ schedule / optimizer
@keras.saving.register_keras_serializable(package="deepseek_tfx_trainer")
class WarmupCosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = peak * (step + 1) / warmup for step < warmup, then cosine
    from peak down to min_ratio * peak at total_steps (held after that).
    `step` is the 0-based index of the update being taken."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int,
                 min_ratio: float = MIN_LR_RATIO):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = float(max(self.warmup_steps, 1))
        warm = self.peak * keras.ops.minimum((step + 1.0) / warmup, 1.0)
        span = float(max(self.total_steps - self.warmup_steps, 1))
        progress = keras.ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
        cosine = 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        decayed = self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
        if self.warmup_steps <= 0:
            return decayed
        return keras.ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "min_ratio": self.min_ratio}


def make_optimizer(model, schedule, weight_decay: float, grad_clip_norm: Optional[float]):
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=weight_decay, beta_1=0.9, beta_2=0.95,
        epsilon=1e-8, global_clipnorm=grad_clip_norm)
    # Decoupled weight decay on weight matrices only: not on norm scales,
    # biases, or float8 scale / amax-history bookkeeping.
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    return optimizer


# ------------------------------------------------------------------- data
def resolve_file_patterns(files, what: str = "train_files") -> List[str]:
    """TFX gives a list of patterns (`<uri>/Split-train/*`); a directory is
    expanded to `<dir>/*`. Raises if nothing matches."""
    if files is None:
        raise ValueError(f"fn_args.{what}: no files given")
    items = [files] if isinstance(files, str) else list(files)
    patterns = [os.path.join(p, "*") if tf.io.gfile.isdir(p) else p for p in items]
    matched = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not matched:
        raise ValueError(f"fn_args.{what}: no files match {items!r}")
    return patterns


def detect_compression(patterns: Sequence[str]) -> Optional[str]:
    """'GZIP' when the first matched file starts with the gzip magic bytes
    (ExampleGen's `*.gz`), else None (uncompressed TFRecords)."""
    first = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})[0]
    with tf.io.gfile.GFile(first, "rb") as f:
        magic = f.read(2)
    return "GZIP" if magic == b"\x1f\x8b" else None


def train_dataset(patterns, seq_len: int, batch_size: int, seed: int, skip_batches: int = 0):
    """Endless, seeded-shuffle batches of (ids, ids) with a static batch size;
    `skip_batches` resumes the exact stream of an earlier run."""
    from data.tfrecord import make_dataset

    ds = make_dataset(patterns, seq_len, batch_size, shuffle=True, seed=seed, repeat=True,
                      compression=detect_compression(patterns), drop_remainder=True)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.map(lambda batch: (batch["input_ids"], batch["input_ids"]))


def eval_dataset(patterns, seq_len: int, batch_size: int, max_batches: Optional[int]):
    from data.tfrecord import make_dataset

    ds = make_dataset(patterns, seq_len, batch_size, shuffle=False, repeat=False,
                      compression=detect_compression(patterns), drop_remainder=False)
    if max_batches:
        ds = ds.take(max_batches)
    return ds


def evaluate_loss(model, patterns, seq_len: int, batch_size: int,
                  max_batches: Optional[int]) -> Dict[str, float]:
    """Mean next-token cross-entropy (nats per target token) over
    `max_batches` batches of the split (all of it when None)."""
    from model.deepseek_v3 import sparse_ce

    @tf.function(reduce_retracing=True)
    def batch_loss(ids):
        logits = model(ids, training=False)
        ce = sparse_ce(logits[:, :-1], ids[:, 1:])
        return tf.reduce_sum(tf.cast(ce, tf.float64)), tf.size(ce)

    total, tokens, batches = 0.0, 0, 0
    for batch in eval_dataset(patterns, seq_len, batch_size, max_batches):
        loss_sum, count = batch_loss(batch["input_ids"])
        total += float(loss_sum)
        tokens += int(count)
        batches += 1
    if not tokens:
        raise ValueError(f"evaluation: the eval split {list(patterns)!r} has no examples")
    loss = total / tokens
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_batches": batches, "eval_target_tokens": tokens}


# ------------------------------------------------------------- checkpoints
def relative_variable_path(variable) -> str:
    """A variable's path inside its model (the instance-specific model name stripped)."""
    return variable.path.split("/", 1)[1] if "/" in variable.path else variable.path


def model_variable_map(model) -> Dict[str, object]:
    """Every model variable keyed by its path inside the model (the model's
    own, instance-specific name stripped)."""
    mapping = {}
    for v in model.weights:
        key = relative_variable_path(v)
        if key in mapping:
            raise ValueError(f"two model variables share the path {key!r}")
        mapping[key] = v
    return mapping


class CheckpointMismatchError(ValueError):
    pass


class TrainingCheckpoint:
    """Resumable training state in `directory`: model variables, optimizer
    variables (iteration counter included) and a `trainer_state.json`
    describing what was trained, to refuse resuming a different setup."""

    STATE_FILE = "trainer_state.json"

    def __init__(self, directory: str, model, optimizer, fingerprint: dict,
                 keep: int = KEEP_CHECKPOINTS):
        self.directory = directory
        self.optimizer = optimizer
        self.fingerprint = fingerprint
        model_vars = {k.replace("/", "."): v for k, v in model_variable_map(model).items()}
        optimizer_vars = {f"v{i:05d}": v for i, v in enumerate(optimizer.variables)}
        self._checkpoint = tf.train.Checkpoint(model=model_vars, optimizer=optimizer_vars)
        self.manager = tf.train.CheckpointManager(self._checkpoint, directory, max_to_keep=keep,
                                                  checkpoint_name="ckpt")

    @property
    def latest(self) -> Optional[str]:
        return self.manager.latest_checkpoint

    def all_steps(self) -> List[int]:
        return [int(p.rsplit("-", 1)[1]) for p in self.manager.checkpoints]

    def restore_latest(self) -> int:
        """Restores the latest checkpoint if any; returns its step (0 if none)."""
        path = self.latest
        if path is None:
            return 0
        self._check_fingerprint()
        try:
            self._checkpoint.restore(path).assert_consumed()
        except (AssertionError, ValueError) as e:
            raise CheckpointMismatchError(
                f"checkpoint {path} does not match this model/optimizer ({e}); point "
                f"training.checkpoint_dir at a fresh directory to start over") from None
        step = int(self.optimizer.iterations.numpy())
        expected = int(path.rsplit("-", 1)[1])
        if step != expected:
            raise CheckpointMismatchError(f"checkpoint {path} holds step {step}, not {expected}")
        return step

    def save(self, step: int) -> str:
        tf.io.gfile.makedirs(self.directory)
        state_path = os.path.join(self.directory, self.STATE_FILE)
        if not tf.io.gfile.exists(state_path):
            with tf.io.gfile.GFile(state_path, "w") as f:
                f.write(json.dumps(self.fingerprint, indent=2, sort_keys=True))
        return self.manager.save(checkpoint_number=step)

    def _check_fingerprint(self) -> None:
        state_path = os.path.join(self.directory, self.STATE_FILE)
        if not tf.io.gfile.exists(state_path):
            return
        with tf.io.gfile.GFile(state_path) as f:
            saved = json.loads(f.read())
        differ = sorted(k for k in set(saved) | set(self.fingerprint)
                        if saved.get(k) != self.fingerprint.get(k))
        if differ:
            raise CheckpointMismatchError(
                f"the checkpoints in {self.directory} come from a different training setup "
                f"(differing: {differ}); point training.checkpoint_dir at a fresh directory")


# ----------------------------------------------------------- MoE statistics
class ExpertStats:
    """Host-side accumulation of the MoE layers' load counters between log
    points (see the module docstring for why multi-replica runs harvest every
    step)."""

    def __init__(self, model):
        self.model = model
        self.reset()

    def reset(self):
        self.load: Dict[str, np.ndarray] = {}
        self.dropped: Dict[str, float] = {}
        self.bias: Dict[str, np.ndarray] = {}

    def harvest(self):
        for name, stats in self.model.get_expert_utilization().items():
            load = np.asarray(stats["load"], np.float64)
            self.load[name] = self.load.get(name, 0.0) + load
            self.dropped[name] = self.dropped.get(name, 0.0) + stats["dropped_fraction"] * load.sum()
            self.bias[name] = np.asarray(stats["bias"], np.float64)
        self.model.reset_expert_counts()

    def summary(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for name, load in self.load.items():
            total, mean = load.sum(), load.mean()
            bias = self.bias[name]
            out[name] = {
                "load_max_min_ratio": float(load.max() / load.min()) if load.min() > 0 else float("inf"),
                "load_cv": float(load.std() / mean) if mean > 0 else 0.0,
                "dropped_fraction": float(self.dropped[name] / total) if total else 0.0,
                "bias_mean": float(bias.mean()),
                "bias_spread": float(bias.max() - bias.min()),
                "load_fraction": (load / total).tolist() if total else [0.0] * len(load),
                "assignments": float(total),  # routed (token, expert) pairs = tokens x top_k
            }
        return out


class RouterBiasUpdate(keras.callbacks.Callback):
    """Aux-loss-free balancing for `fit`: once per optimizer step, moves each
    MoE router bias by the load routed during that step (counter snapshot at
    batch begin, delta at batch end). The MoE forward never moves the bias.
    List it before callbacks that reset the counters (TrainingMonitor)."""

    def __init__(self, model):
        super().__init__()
        self.layers = [m for m in model.moe_layers() if m.config.bias_update_speed > 0]
        self._before = []

    def on_train_batch_begin(self, batch, logs=None):
        self._before = [np.asarray(keras.ops.convert_to_numpy(m.expert_load)) for m in self.layers]

    def on_train_batch_end(self, batch, logs=None):
        for moe, before in zip(self.layers, self._before):
            moe.apply_bias_update(np.asarray(keras.ops.convert_to_numpy(moe.expert_load)) - before)


# -------------------------------------------------------------- monitoring
class TrainingDiverged(RuntimeError):
    pass


def _scalar(value) -> float:
    return float(np.asarray(keras.ops.convert_to_numpy(value)))


def _format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainingMonitor(keras.callbacks.Callback):
    """Per step: NaN/inf guard and checkpointing. Every `log_every` steps (and
    at the end): a console line, TensorBoard scalars, and MoE statistics; the
    loss metrics and expert counters are reset so each line covers its own
    interval."""

    def __init__(self, start_step: int, total_steps: int, log_every: int, checkpoint_every: int,
                 tokens_per_step: int, schedule, checkpoint: Optional[TrainingCheckpoint],
                 log_dir: Optional[str], harvest_every_step: bool,
                 log_fn: Callable[[str], None] = print):
        super().__init__()
        self.start_step = start_step
        self.total_steps = total_steps
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.tokens_per_step = tokens_per_step
        self.schedule = schedule
        self.checkpoint = checkpoint
        self.harvest_every_step = harvest_every_step
        self.log_fn = log_fn
        self.writer = tf.summary.create_file_writer(log_dir) if log_dir else None
        self.history: List[Dict[str, float]] = []
        self.last_checkpoint_step: Optional[int] = None
        self.step = start_step
        self.expert_stats: Optional[ExpertStats] = None
        self.last_expert_summary: Dict[str, Dict[str, float]] = {}

    def on_train_begin(self, logs=None):
        self.expert_stats = ExpertStats(self.model)
        self.model.reset_expert_counts()
        self._run_start = self._interval_start = time.perf_counter()
        self._interval_start_step = self.start_step

    def on_train_batch_end(self, batch, logs=None):
        step = self.start_step + batch + 1
        self.step = step
        loss = _scalar(logs["loss"])  # mean over the current log interval
        if not math.isfinite(loss):
            lr = _scalar(self.schedule(step - 1))
            where = (f"the last good checkpoint is step {self.last_checkpoint_step} in "
                     f"{self.checkpoint.directory}" if self.checkpoint and self.last_checkpoint_step
                     else "no checkpoint was written in this run")
            raise TrainingDiverged(
                f"training diverged: loss is {loss} at step {step} (learning rate {lr:.3g}); "
                f"{where}. Lower training.learning_rate or raise warmup_steps.")
        if self.harvest_every_step:
            self.expert_stats.harvest()
        if step % self.log_every == 0 or step == self.total_steps:
            self._log(step, loss, logs)
        if self.checkpoint is not None and (step % self.checkpoint_every == 0
                                            or step == self.total_steps):
            self.checkpoint.save(step)
            self.last_checkpoint_step = step

    def _log(self, step: int, loss: float, logs):
        now = time.perf_counter()
        steps = step - self._interval_start_step
        elapsed = now - self._interval_start
        token_loss = _scalar(logs["next_token_loss"]) if "next_token_loss" in logs else loss
        ppl = math.exp(min(token_loss, 50.0))
        lr = _scalar(self.schedule(step - 1))
        tokens_per_s = steps * self.tokens_per_step / elapsed if elapsed > 0 else float("nan")
        per_step = (now - self._run_start) / max(step - self.start_step, 1)
        eta = per_step * (self.total_steps - step)
        if not self.harvest_every_step:
            self.expert_stats.harvest()
        experts = self.expert_stats.summary()
        self.expert_stats.reset()
        self.last_expert_summary = experts
        record = {"step": step, "loss": loss, "next_token_loss": token_loss, "perplexity": ppl,
                  "learning_rate": lr, "tokens_per_second": tokens_per_s}
        self.history.append(record)
        width = len(str(self.total_steps))
        balance = ""
        if experts:
            worst = max(s["load_max_min_ratio"] for s in experts.values())
            balance = f" | expert max/min {worst:.2f}"
        self.log_fn(f"step {step:>{width}}/{self.total_steps} | loss {loss:.4f} | ppl {ppl:.2f} | "
                    f"lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | ETA {_format_duration(eta)}{balance}")
        if self.writer is not None:
            with self.writer.as_default(step=step):
                tf.summary.scalar("train/loss", loss)
                tf.summary.scalar("train/next_token_loss", token_loss)
                tf.summary.scalar("train/perplexity", ppl)
                tf.summary.scalar("train/learning_rate", lr)
                tf.summary.scalar("train/tokens_per_second", tokens_per_s)
                for layer, s in experts.items():
                    for key in ("load_max_min_ratio", "load_cv", "dropped_fraction",
                                "bias_mean", "bias_spread"):
                        tf.summary.scalar(f"moe/{layer}/{key}", s[key])
            self.writer.flush()
        for metric in self.model.metrics:
            metric.reset_state()
        self._interval_start, self._interval_start_step = time.perf_counter(), step

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.flush()


def next_token_loss_metric():
    """The plain next-token cross-entropy, logged next to the total loss
    (which also holds the MTP / balance auxiliary losses)."""
    from model.losses import NextTokenLoss

    return keras.metrics.MeanMetricWrapper(NextTokenLoss(reduction=None), name="next_token_loss")
