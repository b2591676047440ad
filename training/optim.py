"""Learning-rate schedule and optimizer (backend-agnostic Keras)."""

from __future__ import annotations

import math
from typing import Optional

import keras

MIN_LR_RATIO = 0.1


def warmup_cosine_lr(step: float, peak: float, warmup_steps: int, total_steps: int,
                     min_ratio: float = MIN_LR_RATIO) -> float:
    """Host-side value of `WarmupCosineSchedule` (for logs)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * min((step + 1.0) / warmup_steps, 1.0)
    span = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


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
    """AdamW (beta_2 0.95, eps 1e-8) with an optional global-norm clip."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=weight_decay, beta_1=0.9, beta_2=0.95,
        epsilon=1e-8, global_clipnorm=grad_clip_norm)
    # Decoupled weight decay on weight matrices only: not on norm scales,
    # biases, or float8 scale / amax-history bookkeeping.
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    return optimizer
