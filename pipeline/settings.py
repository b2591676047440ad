"""Everything a pipeline run is configured by, validated in one place before
any component starts (a bad setting never gets as far as the Trainer)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

from model import ConfigError, DeepSeekV3Config, get_preset
from model.checks import PRECISIONS, check_int


def _is_remote(path: str) -> bool:
    return "://" in str(path)


class SettingsError(ValueError):
    """An invalid pipeline setting; the message names it."""


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    run_dir: str = "runs/default"
    pipeline_name: str = "deepseek-tfx"
    # Model: a preset plus field overrides (validated as a DeepSeekV3Config).
    preset: str = "mini"
    model_overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # Data: the synthetic generator, or the user's own TFRecords.
    data_kind: str = "markov"
    data_params: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"order": 1, "temperature": 0.5})
    seq_len: int = 64
    train_examples: int = 4096
    eval_examples: int = 512
    data_seed: int = 0
    examples_dir: Optional[str] = None  # ImportExampleGen over these TFRecords instead
    # Training.
    train_steps: int = 300
    eval_steps: int = 8
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    precision: str = "auto"
    expert_parallel: int = 1        # devices per routed-expert shard group (training/parallel.py)
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    checkpoint_every: int = 100
    log_every: int = 25
    seed: int = 0
    # Gate.
    thresholds: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # Orchestration.
    beam_pipeline_args: List[str] = dataclasses.field(
        default_factory=lambda: ["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    enable_cache: bool = True
    # Paths (default: under run_dir).
    pipeline_root: Optional[str] = None
    metadata_path: Optional[str] = None
    # ML Metadata on MySQL/MariaDB instead of the SQLite file
    # (pipeline.metadata_store: mysql://USER@HOST:PORT/DB[?unix_socket=PATH]).
    metadata_mysql: Optional[str] = None
    serving_dir: Optional[str] = None

    def __post_init__(self):
        for name in ("seq_len", "train_examples", "eval_examples", "train_steps", "eval_steps",
                     "batch_size", "checkpoint_every", "log_every", "expert_parallel",
                     "gradient_accumulation"):
            check_int(name, getattr(self, name), 1, error=SettingsError)
        if self.seq_len < 2:
            raise SettingsError("seq_len: must be at least 2 (one input and one target)")
        if not (self.learning_rate > 0):
            raise SettingsError(f"learning_rate: must be positive, got {self.learning_rate!r}")
        if self.precision not in PRECISIONS:
            raise SettingsError(f"precision: must be one of {PRECISIONS}, got {self.precision!r}")
        if self.examples_dir is None and self.eval_examples < self.batch_size:
            raise SettingsError(f"eval_examples ({self.eval_examples}) must be >= batch_size ({self.batch_size})")
        if self.examples_dir is not None and not _is_remote(self.examples_dir) \
                and not os.path.isdir(self.examples_dir):
            # A remote URI (gs://, s3://, ...) is checked where it is read: the
            # compiling machine may have no credentials for the bucket.
            raise SettingsError(f"examples_dir: {self.examples_dir!r} is not a directory")
        if self.metadata_mysql is not None:
            from pipeline.metadata_store import MySQLAddress

            try:
                MySQLAddress.parse(self.metadata_mysql)
            except ValueError as e:
                raise SettingsError(str(e)) from None
        config = self.model_config  # validates the preset and overrides
        if self.expert_parallel > 1 and (not config.n_routed_experts
                                         or config.n_routed_experts % self.expert_parallel):
            raise SettingsError(f"expert_parallel: {self.expert_parallel} does not divide the "
                                f"model's {config.n_routed_experts} routed experts")
        if self.seq_len > config.max_position_embeddings:
            raise SettingsError(f"seq_len {self.seq_len} exceeds the model's max_position_embeddings "
                                f"{config.max_position_embeddings}")
        if self.examples_dir is None:
            self.data_spec  # validates the generator settings
        from components.validation_checks import GateThresholds

        try:
            GateThresholds(**self.thresholds)
        except TypeError as e:
            raise SettingsError(f"thresholds: {e}") from None
        except ValueError as e:
            raise SettingsError(f"thresholds: {e}") from None

    # ----------------------------------------------------------- derived
    @property
    def model_config(self) -> DeepSeekV3Config:
        try:
            return get_preset(self.preset, **self.model_overrides)
        except (TypeError, ConfigError) as e:
            raise SettingsError(f"model: {e}") from None

    @property
    def data_spec(self):
        from data import DataSpec, DataSpecError

        try:
            return DataSpec(self.data_kind, vocab_size=self.model_config.vocab_size,
                            seq_len=self.seq_len, seed=self.data_seed, **self.data_params)
        except (DataSpecError, TypeError) as e:
            raise SettingsError(f"data: {e}") from None

    def path(self, name: str) -> str:
        explicit = {"pipeline_root": self.pipeline_root, "metadata": self.metadata_path,
                    "serving": self.serving_dir}.get(name)
        if explicit:
            return explicit
        defaults = {"pipeline_root": "pipeline_root", "metadata": "metadata.sqlite",
                    "serving": "serving", "checkpoints": "checkpoints", "schema": "schema"}
        return os.path.join(os.path.abspath(self.run_dir), defaults[name])

    def trainer_custom_config(self) -> Dict[str, Any]:
        return {
            "model_config": self.model_config.to_dict(),
            "seq_len": self.seq_len,
            "training": {
                "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "warmup_steps": self.warmup_steps, "weight_decay": 0.01,
                "checkpoint_every": self.checkpoint_every, "log_every": self.log_every,
                "precision": self.precision, "seed": self.seed,
                "expert_parallel": self.expert_parallel,
                "gradient_accumulation": self.gradient_accumulation,
                # Stable across executions so a restarted run resumes; keyed by
                # everything that defines the training so a changed run never
                # resumes someone else's checkpoint.
                "checkpoint_dir": os.path.join(self.path("checkpoints"), self.training_fingerprint()),
            },
        }

    def training_fingerprint(self) -> str:
        import hashlib

        key = json.dumps({"model": self.model_config.to_dict(), "seq_len": self.seq_len,
                          "batch": self.batch_size, "lr": self.learning_rate, "steps": self.train_steps,
                          "warmup": self.warmup_steps, "precision": self.precision, "seed": self.seed,
                          "accumulation": self.gradient_accumulation,
                          "data": None if self.examples_dir else self.data_spec.to_dict(),
                          "examples_dir": self.examples_dir,
                          "n": [self.train_examples, self.eval_examples]}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def replace(self, **changes) -> "PipelineSettings":
        return dataclasses.replace(self, **changes)
