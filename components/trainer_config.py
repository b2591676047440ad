"""The Trainer's inputs, validated before any work starts: where TFX carries
each training setting, around the one settings type
(`training.settings.TrainingSettings`, which holds every rule).

    custom_config = {
        "model_config": DeepSeekV3Config.to_dict(),
        "seq_len": int,
        "training": TrainingSettings.to_dict() without seq_len and train_steps,
    }

`seq_len` sits at the top (the schema and the data share it) and the step
count is TFX's `TrainArgs(num_steps=...)` (fn_args.train_steps). The
explicit settings (batch_size, learning_rate, warmup_steps, weight_decay,
checkpoint_every, log_every, precision, seed) must be given, so the recorded
exec property says how the model was trained; `checkpoint_dir` defaults to
<model_run_dir>/checkpoints and `eval_batches` to fn_args.eval_steps.

The engine trains on every device JAX sees in its process (all GPUs, else the
CPU; XLA_FLAGS=--xla_force_host_platform_device_count=N gives N CPU devices),
in every process of a multi-host job (see training.parallel).

Every error is a `TrainerConfigError` (a ValueError) whose message names the
offending key, e.g. ``custom_config['training']['batch_size']: ...``.
TensorFlow and Keras are not imported here.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Mapping, Optional

from model.config import ConfigError, DeepSeekV3Config
from training.settings import TrainingSettings, TrainingSettingsError

#: The training settings TFX carries outside custom_config["training"].
TFX_FIELDS = {"seq_len": "custom_config['seq_len']", "train_steps": "fn_args.train_steps"}


class TrainerConfigError(ValueError):
    """An invalid Trainer custom_config / fn_args value; the message names the key."""


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    model_config: DeepSeekV3Config
    training: TrainingSettings
    eval_steps: Optional[int]  # None: the whole eval split

    @property
    def seq_len(self) -> int:
        return self.training.seq_len


def custom_config(model_config: DeepSeekV3Config, training: TrainingSettings) -> dict:
    """The Trainer's custom_config for these settings (the inverse of `parse_fn_args`)."""
    return {"model_config": model_config.to_dict(), "seq_len": training.seq_len,
            "training": {k: v for k, v in training.to_dict().items() if k not in TFX_FIELDS}}


def _key(field: Optional[str]) -> str:
    if field in TFX_FIELDS:
        return TFX_FIELDS[field]
    return "custom_config['training']" + (f"[{field!r}]" if field else "")


def _eval_steps(eval_steps: Any) -> Optional[int]:
    """fn_args.eval_steps: None or 0 means the whole split."""
    if eval_steps is None or (isinstance(eval_steps, numbers.Integral) and eval_steps == 0):
        return None
    if isinstance(eval_steps, bool) or not isinstance(eval_steps, numbers.Integral) or eval_steps < 0:
        raise TrainerConfigError(f"fn_args.eval_steps: must be a non-negative integer or None, "
                                 f"got {eval_steps!r}")
    return int(eval_steps)


def parse_fn_args(fn_args) -> TrainerSettings:
    """Validates `fn_args.custom_config`, train/eval steps and output paths."""
    custom = fn_args.custom_config
    expected = ("model_config", "seq_len", "training")
    if not isinstance(custom, Mapping):
        raise TrainerConfigError(f"custom_config: must be a dict with 'model_config', 'seq_len' and "
                                 f"'training', got {type(custom).__name__}")
    unknown = sorted(set(custom) - set(expected))
    if unknown:
        raise TrainerConfigError(f"custom_config: unknown keys {unknown}; expected 'model_config', "
                                 f"'seq_len', 'training'")
    for name in expected:
        if name not in custom:
            raise TrainerConfigError(f"custom_config[{name!r}]: missing")

    raw_model = custom["model_config"]
    if not isinstance(raw_model, Mapping):
        raise TrainerConfigError(f"custom_config['model_config']: must be a dict "
                                 f"(DeepSeekV3Config.to_dict()), got {type(raw_model).__name__}")
    try:
        model_config = DeepSeekV3Config.from_dict(raw_model)
    except (ConfigError, TypeError) as e:
        raise TrainerConfigError(f"custom_config['model_config']: {e}") from None

    raw = custom["training"]
    if isinstance(raw, Mapping):
        for name in TFX_FIELDS:
            if name in raw:
                raise TrainerConfigError(f"{_key(None)}[{name!r}]: given by {TFX_FIELDS[name]}, not here")
        raw = {**raw, "seq_len": custom["seq_len"], "train_steps": fn_args.train_steps}
    try:
        training = TrainingSettings.from_dict(raw, require_explicit=True).check_model(model_config)
    except TrainingSettingsError as e:
        raise TrainerConfigError(f"{_key(e.field)}: {e.problem}") from None

    eval_steps = _eval_steps(fn_args.eval_steps)
    for name in ("serving_model_dir", "model_run_dir"):
        if not getattr(fn_args, name):
            raise TrainerConfigError(f"fn_args.{name}: empty")
    if training.checkpoint_dir is None:
        training = training.replace(checkpoint_dir=os.path.join(fn_args.model_run_dir, "checkpoints"))
    return TrainerSettings(model_config=model_config, training=training, eval_steps=eval_steps)
