"""Named configurations: from unit-test size up to the published 671B shape.
Every preset is dropless (expert_capacity_factor None, the config default)."""

from __future__ import annotations

from .config import ConfigError, DeepSeekV3Config

PRESETS = {
    # Unit tests: every code path (q-LoRA, group routing, shared experts,
    # dense-then-MoE layers) at a size that builds in milliseconds.
    "tiny": DeepSeekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
        q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=1,
    ),
    # The default pipeline model: learns the synthetic data on 2 CPU cores
    # within a couple of minutes; 8 heads so its absorbed MLA cache is < 20%
    # of the equivalent MHA cache, as at full scale.
    "mini": DeepSeekV3Config(
        vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=8, max_position_embeddings=512,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=1.0, first_k_dense_replace=1,
        bias_update_speed=0.001,
    ),
    # ~120M activated (~900M total) parameters for H100 benchmarks.
    "gpu-small": DeepSeekV3Config(
        vocab_size=16384, hidden_size=768, intermediate_size=2048, moe_intermediate_size=512,
        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=4096,
        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=4,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=1,
    ),
    # The published DeepSeek-V3 dimensions (config.json of deepseek-ai/DeepSeek-V3).
    # Meant for analytic figures (parameter count, KV-cache bytes): building it
    # would allocate 671B parameters.
    "deepseek-v3-671b": DeepSeekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
        max_position_embeddings=163840, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        first_k_dense_replace=3, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=1,
    ),
}


def get_preset(name: str, **overrides) -> DeepSeekV3Config:
    """Returns the named preset, with `overrides` applied (and re-validated)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config
