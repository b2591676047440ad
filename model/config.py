"""The one validated configuration object for a DeepSeek-V3-style model.

Field names follow the Hugging Face `DeepseekV3Config` so a checkpoint's
`config.json` maps onto it one to one; the training-only knobs (balancing,
capacity, MTP) follow the names used in the DeepSeek-V3 paper (arXiv 2412.19437).
Every invalid combination is refused here, at construction, with the field named.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Optional

_ATTENTION_TYPES = ("mla", "mha")
_MLA_MODES = ("absorbed", "naive")
_SCORING = ("sigmoid", "softmax")
_YARN_KEYS = {
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
}


class ConfigError(ValueError):
    """An invalid model configuration; the message names the field."""


def _fail(field: str, message: str) -> None:
    raise ConfigError(f"DeepSeekV3Config.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class DeepSeekV3Config:
    # Sizes.
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128  # dense SwiGLU MLP of the first k layers
    moe_intermediate_size: int = 32  # each routed / shared expert
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 512

    # Multi-head Latent Attention.
    q_lora_rank: Optional[int] = 32  # None: a single query projection
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    attention_bias: bool = False
    attention_type: str = "mla"  # "mha": the standard multi-head baseline
    mha_head_dim: Optional[int] = None  # baseline head size; default v_head_dim
    mla_mode: str = "absorbed"  # KV-cache layout for decoding: "absorbed" | "naive"

    # RoPE (applied to the qk_rope_head_dim part only) and YaRN.
    rope_theta: float = 10000.0
    rope_scaling: Optional[Mapping[str, Any]] = None
    rope_interleave: bool = True

    # DeepSeekMoE.
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    first_k_dense_replace: int = 1  # >= num_hidden_layers: every layer dense
    # Auxiliary-loss-free balancing: bias step gamma per training step.
    bias_update_speed: float = 0.001
    # Complementary sequence-wise balance loss weight alpha (0 disables it).
    seq_aux_loss_alpha: float = 0.0
    # Optional training-time expert capacity as a multiple of the even share
    # (real tokens * top_k / experts); overflow is dropped by routing score.
    # None (the default, as DeepSeek-V3 trains) = dropless. Inference is
    # always dropless.
    expert_capacity_factor: Optional[float] = None

    # Multi-token prediction: depth D and loss weight lambda.
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.3

    # Everything else.
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        # Normalise the rope_scaling mapping into a plain, sorted dict so the
        # frozen dataclass stays hashable-free but JSON-stable.
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        self._validate()

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(name, f"must be a positive integer, got {value!r}")
        for name in ("qk_nope_head_dim", "n_shared_experts", "first_k_dense_replace",
                     "num_nextn_predict_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(name, f"must be a non-negative integer, got {value!r}")
        if self.q_lora_rank is not None and (
            not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0
        ):
            _fail("q_lora_rank", f"must be a positive integer or None, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            _fail("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.attention_type not in _ATTENTION_TYPES:
            _fail("attention_type", f"must be one of {_ATTENTION_TYPES}, got {self.attention_type!r}")
        if self.mla_mode not in _MLA_MODES:
            _fail("mla_mode", f"must be one of {_MLA_MODES}, got {self.mla_mode!r}")
        if self.mha_head_dim is not None:
            if not isinstance(self.mha_head_dim, int) or self.mha_head_dim <= 0 or self.mha_head_dim % 2:
                _fail("mha_head_dim", f"must be a positive even integer, got {self.mha_head_dim!r}")
        if self.scoring_func not in _SCORING:
            _fail("scoring_func", f"must be one of {_SCORING}, got {self.scoring_func!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            _fail("num_experts_per_tok",
                  f"top_k={self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_group:
            _fail("n_group",
                  f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            _fail("topk_group", f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        experts_reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > experts_reachable:
            _fail("num_experts_per_tok",
                  f"top_k={self.num_experts_per_tok} exceeds the {experts_reachable} experts "
                  f"in topk_group={self.topk_group} groups")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            _fail("n_group", "group-limited routing scores each group by its top-2 experts, "
                  "so every group needs at least 2 experts")
        for name in ("routed_scaling_factor", "rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                _fail(name, f"must be a positive finite number, got {value!r}")
        for name in ("bias_update_speed", "seq_aux_loss_alpha", "mtp_loss_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                _fail(name, f"must be a non-negative finite number, got {value!r}")
        if self.expert_capacity_factor is not None and (
            not isinstance(self.expert_capacity_factor, (int, float))
            or self.expert_capacity_factor < 1.0
        ):
            _fail("expert_capacity_factor",
                  f"must be None (dropless) or >= 1.0, got {self.expert_capacity_factor!r}")
        if self.rope_scaling is not None:
            self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("yarn", "default", None):
            _fail("rope_scaling", f"only YaRN scaling is supported, got rope_type {kind!r}")
        if kind != "yarn":
            return
        unknown = set(scaling) - _YARN_KEYS - {"rope_type", "type"}
        if unknown:
            _fail("rope_scaling", f"unknown YaRN keys {sorted(unknown)}")
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            _fail("rope_scaling", f"'factor' must be a positive number, got {factor!r}")
        original = scaling.get("original_max_position_embeddings")
        if original is not None and (not isinstance(original, int) or original <= 0):
            _fail("rope_scaling",
                  f"'original_max_position_embeddings' must be a positive integer, got {original!r}")

    # ------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> Optional[dict]:
        """The YaRN settings, or None when RoPE is unscaled."""
        if not self.rope_scaling:
            return None
        kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        return dict(self.rope_scaling) if kind == "yarn" else None

    @property
    def baseline_head_dim(self) -> int:
        return self.mha_head_dim or self.v_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # -------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DeepSeekV3Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"DeepSeekV3Config: unknown fields {unknown}")
        return cls(**dict(values))

    @classmethod
    def from_json(cls, text: str) -> "DeepSeekV3Config":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "DeepSeekV3Config":
        return dataclasses.replace(self, **changes)
