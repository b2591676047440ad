"""Everything a pipeline run is configured by, validated in one place before
any component starts (a bad setting never gets as far as the Trainer)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

from model import ConfigError, DeepSeekV3Config, get_preset
from model.checks import check_int
from training.settings import TrainingSettings, TrainingSettingsError

_T = TrainingSettings  # the training fields' defaults (and rules) are its


def _is_remote(path: str) -> bool:
    return "://" in str(path)


class SettingsError(ValueError):
    """An invalid pipeline setting; the message names it."""


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    run_dir: str = "runs/default"
    pipeline_name: str = "deepseek-tfx"
    # Model: a preset plus field overrides (validated as a DeepSeekV3Config),
    # or a base model to fine-tune: a Hugging Face DeepSeek-V3 directory
    # (model.base_model) whose config.json is the model's (the preset is not
    # used; an override that changes a weight shape is refused).
    preset: str = "mini"
    model_overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    base_model: Optional[str] = None
    # Data: the synthetic generator, or the user's own TFRecords.
    data_kind: str = "markov"
    data_params: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"order": 1, "temperature": 0.5})
    seq_len: int = _T.seq_len
    train_examples: int = 4096
    eval_examples: int = 512
    data_seed: int = 0
    examples_dir: Optional[str] = None  # ImportExampleGen over these TFRecords instead
    # Or the user's own text (pipeline/text_data.py): a tokenizer trained on
    # it (vocab_size) or given (tokenizer_file), documents held out for eval.
    text_dir: Optional[str] = None
    vocab_size: Optional[int] = None
    tokenizer_file: Optional[str] = None
    text_eval_fraction: float = 0.1
    # Training: the fields of training.settings.TrainingSettings (same names,
    # its defaults, validated by it); `training` builds it.
    train_steps: int = _T.train_steps
    eval_steps: int = 8
    batch_size: int = _T.batch_size
    learning_rate: float = _T.learning_rate
    warmup_steps: int = _T.warmup_steps
    weight_decay: float = _T.weight_decay
    precision: str = _T.precision
    expert_parallel: int = _T.expert_parallel          # devices per routed-expert shard group
    dispatch_capacity_factor: float = _T.dispatch_capacity_factor  # all-to-all buffer rows
    dispatch_recompute: bool = _T.dispatch_recompute  # backward recomputes the dispatch
    cpu_devices: Optional[int] = _T.cpu_devices  # engine's CPU devices; None: one per core
    gradient_accumulation: int = _T.gradient_accumulation  # micro-batches per optimizer step
    checkpoint_every: int = _T.checkpoint_every
    log_every: int = _T.log_every
    seed: int = _T.seed
    # Gate.
    thresholds: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # Orchestration.
    # Empty: Beam's default, the DirectRunner in memory with one worker. An
    # empty list also spares each Beam component (ExampleGen, StatisticsGen,
    # Evaluator) the sdist of the whole TFX install that TFX builds for a
    # remote runner whenever arguments are given without a dependency flag
    # (~3.5 s each on 2 cores; an in-process runner never reads it).
    beam_pipeline_args: List[str] = dataclasses.field(default_factory=list)
    enable_cache: bool = True
    # Paths (default: under run_dir).
    pipeline_root: Optional[str] = None
    metadata_path: Optional[str] = None
    engine_stall_timeout_s: Optional[float] = None  # kill a silent engine child as hung
    # ML Metadata on MySQL/MariaDB instead of the SQLite file
    # (pipeline.metadata_store: mysql://USER@HOST:PORT/DB[?unix_socket=PATH]).
    metadata_mysql: Optional[str] = None
    serving_dir: Optional[str] = None
    # Where the Trainer's checkpoints go (default <run_dir>/checkpoints); one
    # subdirectory per training fingerprint.
    checkpoint_root: Optional[str] = None

    def __post_init__(self):
        if self.base_model is not None:
            self.base  # reads config.json and the safetensors headers
        try:
            training = self._training()
        except TrainingSettingsError as e:
            raise SettingsError(str(e)) from None
        for name in ("train_examples", "eval_examples", "eval_steps"):
            check_int(name, getattr(self, name), 1, error=SettingsError)
        if self.text_dir is not None and self.examples_dir is not None:
            raise SettingsError("text_dir and examples_dir: give one source of data, not both")
        if self.text_dir is None and (self.vocab_size is not None or self.tokenizer_file):
            raise SettingsError("vocab_size / tokenizer_file: only with text_dir (--text-dir)")
        self.text_data  # validates the text settings
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
        try:
            training.check_model(self.model_config)  # (model_config validates the preset and overrides)
        except TrainingSettingsError as e:
            raise SettingsError(str(e)) from None
        if self.examples_dir is None and self.text_dir is None:
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
    def base(self):
        """The `model.base_model.BaseModel` of a fine-tune, else None."""
        if self.base_model is None:
            return None
        cached = self.__dict__.get("_base")
        if cached is None or cached[0] != self.base_model:
            from model.base_model import BaseModel, BaseModelError

            try:
                cached = (self.base_model, BaseModel.read(self.base_model))
            except BaseModelError as e:
                raise SettingsError(str(e)) from None
            object.__setattr__(self, "_base", cached)  # read once per settings object
        return cached[1]

    @property
    def text_data(self):
        """The validated `TextData` of a run on text, else None. With a base
        model the tokenizer is its own SentencePiece model when it brings
        one (and none is given), else one trained to its vocabulary size."""
        if self.text_dir is None:
            return None
        from pipeline.text_data import TextData, TextSettingsError

        vocab_size, tokenizer_file = self.vocab_size, self.tokenizer_file
        base = self.base
        if base is not None and vocab_size is None and not tokenizer_file:
            tokenizer_file = base.tokenizer_file
            if tokenizer_file is None:
                vocab_size = base.model_config(self.model_overrides).vocab_size
        try:
            return TextData(self.text_dir, vocab_size, tokenizer_file, self.text_eval_fraction)
        except TextSettingsError as e:
            raise SettingsError(str(e)) from None

    @property
    def model_config(self) -> DeepSeekV3Config:
        overrides = dict(self.model_overrides)
        if self.base_model is not None:
            return self._base_model_config(overrides)
        if self.text_dir is not None:  # the tokenizer's vocabulary is the model's
            vocab = self.text_data.resolved_vocab_size
            if overrides.get("vocab_size", vocab) != vocab:
                raise SettingsError(f"model_overrides.vocab_size {overrides['vocab_size']} differs from "
                                    f"the tokenizer's {vocab}; the tokenizer sets it (--vocab-size)")
            overrides["vocab_size"] = vocab
        try:
            return get_preset(self.preset, **overrides)
        except (TypeError, ConfigError) as e:
            raise SettingsError(f"model: {e}") from None

    def _base_model_config(self, overrides) -> DeepSeekV3Config:
        from model.base_model import BaseModelError

        base = self.base
        try:
            config = base.model_config(overrides)
        except BaseModelError as e:
            raise SettingsError(str(e)) from None
        if self.text_dir is not None:  # every token id of the data must be a row of the embedding
            vocab = self.text_data.resolved_vocab_size
            if vocab > config.vocab_size:
                raise SettingsError(f"base_model: its vocabulary ({config.vocab_size} ids, "
                                    f"{base.config_file}) is smaller than the tokenizer's {vocab}: "
                                    f"the data's token ids would not fit")
        return config

    @property
    def data_spec(self):
        from data import DataSpec, DataSpecError

        try:
            return DataSpec(self.data_kind, vocab_size=self.model_config.vocab_size,
                            seq_len=self.seq_len, seed=self.data_seed, **self.data_params)
        except (DataSpecError, TypeError) as e:
            raise SettingsError(f"data: {e}") from None

    def _training(self, **extra) -> TrainingSettings:
        shared = [f.name for f in dataclasses.fields(self) if f.name in TrainingSettings.names()]
        return TrainingSettings(**{name: getattr(self, name) for name in shared}, **extra)

    @property
    def training(self) -> TrainingSettings:
        """The Trainer's training settings. The checkpoint directory is stable
        across executions so a restarted run resumes, and keyed by everything
        that defines the training so a changed run never resumes someone
        else's checkpoint."""
        return self._training(checkpoint_dir=os.path.join(self.path("checkpoints"),
                                                          self.training_fingerprint()))

    def path(self, name: str) -> str:
        explicit = {"pipeline_root": self.pipeline_root, "metadata": self.metadata_path,
                    "serving": self.serving_dir, "checkpoints": self.checkpoint_root}.get(name)
        if explicit:
            return explicit
        defaults = {"pipeline_root": "pipeline_root", "metadata": "metadata.sqlite",
                    "serving": "serving", "checkpoints": "checkpoints", "schema": "schema"}
        return os.path.join(os.path.abspath(self.run_dir), defaults[name])

    def trainer_custom_config(self) -> Dict[str, Any]:
        from components.trainer_config import custom_config

        return custom_config(self.model_config, self.training)

    def training_fingerprint(self) -> str:
        import hashlib

        key = json.dumps({"model": self.model_config.to_dict(), "seq_len": self.seq_len,
                          "batch": self.batch_size, "lr": self.learning_rate, "steps": self.train_steps,
                          "warmup": self.warmup_steps, "weight_decay": self.weight_decay,
                          "precision": self.precision, "seed": self.seed,
                          "accumulation": self.gradient_accumulation,
                          "data": None if self.examples_dir or self.text_dir else self.data_spec.to_dict(),
                          "text": self.text_data.identity() if self.text_dir else None,
                          "examples_dir": self.examples_dir,
                          "n": [self.train_examples, self.eval_examples],
                          # (only when set: runs without one keep their directories)
                          **({"base_model": self.base.identity} if self.base_model else {})},
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def replace(self, **changes) -> "PipelineSettings":
        return dataclasses.replace(self, **changes)
