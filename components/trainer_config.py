"""The Trainer's `custom_config`, validated before any work starts.

    custom_config = {
        "model_config": DeepSeekV3Config.to_dict(),
        "seq_len": int,
        "training": {
            "batch_size": 32, "learning_rate": 3e-3, "warmup_steps": 20,
            "weight_decay": 0.01, "checkpoint_every": 100, "log_every": 25,
            "precision": "auto" | "float32" | "bf16" | "float8", "seed": 0,
            # optional:
            "checkpoint_dir": str,   # default <model_run_dir>/checkpoints
            "eval_batches": int,     # default fn_args.eval_steps, else the whole split
            "grad_clip_norm": float, # global gradient-norm clip, default 1.0 (None: off)
            "gradient_accumulation": int,  # micro-batches per optimizer step, default 1
            "expert_parallel": int,  # devices per routed-expert shard group, default 1
        },

The engine trains on every device JAX sees in its process (all GPUs, else the
CPU; XLA_FLAGS=--xla_force_host_platform_device_count=N gives N CPU devices),
in every process of a multi-host job (see training.parallel).
    }

Every error is a `TrainerConfigError` (a ValueError) whose message names the
offending key, e.g. ``custom_config["training"]["batch_size"]: ...``.
TensorFlow and Keras are not imported here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, Mapping, Optional, Tuple

from model.checks import PRECISIONS, int_problem
from model.config import ConfigError, DeepSeekV3Config

_REQUIRED_TRAINING = ("batch_size", "learning_rate", "warmup_steps", "weight_decay",
                      "checkpoint_every", "log_every", "precision", "seed")
_OPTIONAL_TRAINING = ("checkpoint_dir", "eval_batches", "grad_clip_norm",
                      "gradient_accumulation", "expert_parallel")


class TrainerConfigError(ValueError):
    """An invalid Trainer custom_config / fn_args value; the message names the key."""


def _key(*path: str) -> str:
    return "custom_config" + "".join(f"[{p!r}]" for p in path)


def _int(value: Any, path: Tuple[str, ...], minimum: int) -> int:
    problem = int_problem(value, minimum)
    if problem:
        raise TrainerConfigError(f"{_key(*path)}: {problem}")
    return int(value)


def _float(value: Any, path: Tuple[str, ...], positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        raise TrainerConfigError(f"{_key(*path)}: must be {kind} finite number, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    batch_size: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    checkpoint_every: int
    log_every: int
    precision: str
    seed: int
    checkpoint_dir: str
    eval_batches: Optional[int] = None
    grad_clip_norm: Optional[float] = 1.0
    gradient_accumulation: int = 1
    expert_parallel: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    model_config: DeepSeekV3Config
    seq_len: int
    training: TrainingConfig


def parse_custom_config(custom_config: Optional[Mapping[str, Any]],
                        model_run_dir: Optional[str]) -> TrainerSettings:
    """Validates the Trainer's custom_config; returns typed settings."""
    if not isinstance(custom_config, Mapping):
        raise TrainerConfigError(
            f"custom_config: must be a dict with 'model_config', 'seq_len' and 'training', "
            f"got {type(custom_config).__name__}")
    unknown = sorted(set(custom_config) - {"model_config", "seq_len", "training"})
    if unknown:
        raise TrainerConfigError(f"custom_config: unknown keys {unknown}; "
                                 f"expected 'model_config', 'seq_len', 'training'")
    for name in ("model_config", "seq_len", "training"):
        if name not in custom_config:
            raise TrainerConfigError(f"{_key(name)}: missing")

    raw_model = custom_config["model_config"]
    if not isinstance(raw_model, Mapping):
        raise TrainerConfigError(f"{_key('model_config')}: must be a dict "
                                 f"(DeepSeekV3Config.to_dict()), got {type(raw_model).__name__}")
    try:
        model_config = DeepSeekV3Config.from_dict(raw_model)
    except (ConfigError, TypeError) as e:
        raise TrainerConfigError(f"{_key('model_config')}: {e}") from None

    seq_len = _int(custom_config["seq_len"], ("seq_len",), 2)
    if seq_len > model_config.max_position_embeddings:
        raise TrainerConfigError(
            f"{_key('seq_len')}: {seq_len} exceeds model_config.max_position_embeddings "
            f"{model_config.max_position_embeddings}")

    raw = custom_config["training"]
    if not isinstance(raw, Mapping):
        raise TrainerConfigError(f"{_key('training')}: must be a dict, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_REQUIRED_TRAINING) - set(_OPTIONAL_TRAINING))
    if unknown:
        raise TrainerConfigError(f"{_key('training')}: unknown keys {unknown}; known: "
                                 f"{sorted(_REQUIRED_TRAINING + _OPTIONAL_TRAINING)}")
    for name in _REQUIRED_TRAINING:
        if name not in raw:
            raise TrainerConfigError(f"{_key('training', name)}: missing")

    def path(name):
        return ("training", name)

    precision = raw["precision"]
    if precision not in PRECISIONS:
        raise TrainerConfigError(f"{_key(*path('precision'))}: must be one of {PRECISIONS}, "
                                 f"got {precision!r}")
    checkpoint_dir = raw.get("checkpoint_dir")
    if checkpoint_dir is None:
        if not model_run_dir:
            raise TrainerConfigError(f"{_key(*path('checkpoint_dir'))}: not set and "
                                     f"fn_args.model_run_dir is empty, so there is no default")
        checkpoint_dir = os.path.join(model_run_dir, "checkpoints")
    elif not isinstance(checkpoint_dir, str) or not checkpoint_dir:
        raise TrainerConfigError(f"{_key(*path('checkpoint_dir'))}: must be a non-empty path, "
                                 f"got {checkpoint_dir!r}")
    eval_batches = raw.get("eval_batches")
    if eval_batches is not None:
        eval_batches = _int(eval_batches, path("eval_batches"), 1)
    clip = raw.get("grad_clip_norm", 1.0)
    if clip is not None:
        clip = _float(clip, path("grad_clip_norm"), positive=True)
    expert_parallel = _int(raw.get("expert_parallel", 1), path("expert_parallel"), 1)
    experts = model_config.n_routed_experts
    if expert_parallel > 1 and (not experts or experts % expert_parallel):
        raise TrainerConfigError(f"{_key(*path('expert_parallel'))}: {expert_parallel} does not "
                                 f"divide the model's {experts} routed experts")

    training = TrainingConfig(
        batch_size=_int(raw["batch_size"], path("batch_size"), 1),
        learning_rate=_float(raw["learning_rate"], path("learning_rate"), positive=True),
        warmup_steps=_int(raw["warmup_steps"], path("warmup_steps"), 0),
        weight_decay=_float(raw["weight_decay"], path("weight_decay"), positive=False),
        checkpoint_every=_int(raw["checkpoint_every"], path("checkpoint_every"), 1),
        log_every=_int(raw["log_every"], path("log_every"), 1),
        precision=precision,
        seed=_int(raw["seed"], path("seed"), 0),
        checkpoint_dir=checkpoint_dir,
        eval_batches=eval_batches,
        grad_clip_norm=clip,
        gradient_accumulation=_int(raw.get("gradient_accumulation", 1),
                                   path("gradient_accumulation"), 1),
        expert_parallel=expert_parallel,
    )
    return TrainerSettings(model_config=model_config, seq_len=seq_len, training=training)


def validate_steps(train_steps: Any, eval_steps: Any) -> Tuple[int, Optional[int]]:
    """fn_args.train_steps must be a positive int; eval_steps None/0 means 'whole split'."""
    if isinstance(train_steps, bool) or not isinstance(train_steps, numbers.Integral) \
            or train_steps < 1:
        raise TrainerConfigError(f"fn_args.train_steps: must be a positive integer "
                                 f"(TrainArgs(num_steps=...)), got {train_steps!r}")
    if eval_steps is None or (isinstance(eval_steps, numbers.Integral) and eval_steps == 0):
        return int(train_steps), None
    if isinstance(eval_steps, bool) or not isinstance(eval_steps, numbers.Integral) or eval_steps < 0:
        raise TrainerConfigError(f"fn_args.eval_steps: must be a non-negative integer or None, "
                                 f"got {eval_steps!r}")
    return int(train_steps), int(eval_steps)
