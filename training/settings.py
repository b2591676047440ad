"""The one training-settings type, from the command line to the engine.

`pipeline.settings.PipelineSettings` builds it, the Trainer's
`custom_config["training"]` carries its dict (`components.trainer_config`),
and the engine's worker rebuilds it with `from_dict`. Every rule on a
training setting is checked here, once, naming the field; the rules that
need the model are `check_model`, and the ones that need the device count
are the mesh plan's (`training.parallel.plan_mesh`). No Keras import.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional

from model.checks import PRECISIONS, int_problem


class TrainingSettingsError(ValueError):
    """An invalid training setting: `field` names it, `problem` says what is wrong."""

    def __init__(self, field: Optional[str], problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field, self.problem = field, problem


def _explicit(default):
    """A setting a Trainer custom_config must state (so the recorded exec
    property says how the model was trained); the engine has the default."""
    return dataclasses.field(default=default, metadata={"explicit": True})


def experts_problem(expert_parallel: int, n_routed_experts: int) -> Optional[str]:
    """Why `expert_parallel` groups cannot split the routed experts, or None."""
    if expert_parallel > 1 and (not n_routed_experts or n_routed_experts % expert_parallel):
        return f"{expert_parallel} does not divide the model's {n_routed_experts} routed experts"
    return None


def _float_problem(value: Any, positive: bool) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        return f"must be {kind} finite number, got {value!r}"
    return None


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    batch_size: int = _explicit(32)       # sequences per micro-batch, global (all devices)
    seq_len: int = 64
    train_steps: int = 300                # optimizer steps
    learning_rate: float = _explicit(3e-3)  # peak of the warmup-cosine schedule
    warmup_steps: int = _explicit(20)
    weight_decay: float = _explicit(0.01)   # AdamW (norms and biases excluded, training.optim)
    grad_clip_norm: Optional[float] = 1.0   # global gradient-norm clip; None: off
    gradient_accumulation: int = 1        # micro-batches per optimizer step
    expert_parallel: int = 1              # devices per routed-expert shard group
    # All-to-all rows per destination device as a multiple of the even share
    # (training/expert_parallel.py); a micro-batch that needs more runs extra
    # all-to-all rounds (counted), nothing is dropped.
    dispatch_capacity_factor: float = 1.5
    # The backward pass recomputes the dispatch (all-to-alls and routed
    # experts) instead of keeping its activations: per-device temporaries
    # below data parallel's for one more routed forward per layer.
    dispatch_recompute: bool = True
    # CPU devices of the engine's JAX when it runs on the CPU (data parallel
    # over them); None: one per core that divides the batch
    # (training/host_devices.py). Ignored with an accelerator.
    cpu_devices: Optional[int] = None
    precision: str = _explicit("auto")    # one of model.checks.PRECISIONS
    seed: int = _explicit(0)
    checkpoint_dir: Optional[str] = None  # None: no checkpoints (the Trainer gives a default)
    checkpoint_every: int = _explicit(100)
    log_every: int = _explicit(25)
    eval_batches: Optional[int] = None    # the Trainer's evaluation; None: fn_args.eval_steps
    record_history: bool = False          # per-step losses, biases and loads (tests)
    # The Trainer kills its engine child as hung after this many seconds
    # without a line of output (training.launch); None: no limit.
    engine_stall_timeout_s: Optional[float] = None

    def __post_init__(self):
        # seq_len >= 2: one input and one target.
        for name, minimum in (("batch_size", 1), ("seq_len", 2), ("train_steps", 1),
                              ("warmup_steps", 0), ("gradient_accumulation", 1),
                              ("expert_parallel", 1), ("seed", 0), ("checkpoint_every", 1),
                              ("log_every", 1)):
            self._check(name, int_problem(getattr(self, name), minimum))
        self._check("learning_rate", _float_problem(self.learning_rate, positive=True))
        self._check("weight_decay", _float_problem(self.weight_decay, positive=False))
        self._check("dispatch_capacity_factor",
                    _float_problem(self.dispatch_capacity_factor, positive=True)
                    or (None if self.dispatch_capacity_factor >= 1 else
                        f"must be >= 1.0, got {self.dispatch_capacity_factor!r}"))
        if self.grad_clip_norm is not None:
            self._check("grad_clip_norm", _float_problem(self.grad_clip_norm, positive=True))
        if self.precision not in PRECISIONS:
            self._check("precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        if self.checkpoint_dir is not None and (not isinstance(self.checkpoint_dir, str)
                                                or not self.checkpoint_dir):
            self._check("checkpoint_dir", f"must be a non-empty path, got {self.checkpoint_dir!r}")
        if self.engine_stall_timeout_s is not None:
            self._check("engine_stall_timeout_s", _float_problem(self.engine_stall_timeout_s, positive=True))
        if self.cpu_devices is not None:
            self._check("cpu_devices", int_problem(self.cpu_devices, 1))
            if self.batch_size % self.cpu_devices or self.cpu_devices % self.expert_parallel:
                self._check("cpu_devices", f"{self.cpu_devices} must divide batch_size "
                                           f"{self.batch_size} and be a multiple of "
                                           f"expert_parallel {self.expert_parallel}")
        if self.eval_batches is not None:
            self._check("eval_batches", int_problem(self.eval_batches, 1))
        if not isinstance(self.dispatch_recompute, bool):
            self._check("dispatch_recompute",
                        f"must be true or false, got {self.dispatch_recompute!r}")
        if not isinstance(self.record_history, bool):
            self._check("record_history", f"must be true or false, got {self.record_history!r}")

    @staticmethod
    def _check(name: str, problem: Optional[str]) -> None:
        if problem:
            raise TrainingSettingsError(name, problem)

    def check_model(self, config) -> "TrainingSettings":
        """The rules that need the model (a DeepSeekV3Config); returns self."""
        if self.seq_len > config.max_position_embeddings:
            self._check("seq_len", f"{self.seq_len} exceeds the model's max_position_embeddings "
                                   f"{config.max_position_embeddings}")
        self._check("expert_parallel", experts_problem(self.expert_parallel, config.n_routed_experts))
        return self

    # ------------------------------------------------------------ derived
    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.gradient_accumulation

    # ------------------------------------------------------------ the dict form
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def names(cls, explicit: Optional[bool] = None) -> tuple:
        """The field names (only the explicit ones, or only the others)."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if explicit is None or f.metadata.get("explicit", False) == explicit)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], require_explicit: bool = False) -> "TrainingSettings":
        """The inverse of `to_dict`; unknown keys are an error, and with
        `require_explicit` so is a missing explicit setting."""
        if not isinstance(values, Mapping):
            raise TrainingSettingsError(None, f"must be a dict, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise TrainingSettingsError(None, f"unknown keys {unknown}; known: {sorted(cls.names())}")
        if require_explicit:
            for name in cls.names(explicit=True):
                if name not in values:
                    raise TrainingSettingsError(name, "missing")
        return cls(**values)

    def replace(self, **changes) -> "TrainingSettings":
        return dataclasses.replace(self, **changes)
