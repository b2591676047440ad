"""Benchmark sizes per mode (smoke / quick / full) and the model configs.

Everything a result depends on is here, and run_all copies it into the
output JSON under "configs", so two result files can be compared knowing
they measured the same thing.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

from model import DeepSeekV3Config

MODES = ("smoke", "quick", "full")


@dataclasses.dataclass(frozen=True)
class Sizes:
    # mla_vs_mha
    attn_seq_lens: Tuple[int, ...]
    attn_batch: int
    attn_repeats: int
    # moe_scaling
    moe_experts: Tuple[int, ...]
    moe_top_k: Tuple[int, ...]
    moe_tokens: int
    moe_hidden: int
    moe_expert_dim: int
    moe_repeats: int
    # decode
    decode_contexts: Tuple[int, ...]
    decode_batch: int
    decode_repeats: int
    decode_inner: int
    # fp8_vs_bf16
    fp8_steps: int
    fp8_batch: int
    fp8_seq_len: int
    # train_vs_reference
    train_batch: int
    train_seq_len: int
    train_repeats: int
    reference_steps: int
    # backend comparison (subprocess per backend)
    compare_backends: bool


SIZES: Dict[str, Sizes] = {
    # CI: every code path at toy sizes, well under a minute.
    "smoke": Sizes(
        attn_seq_lens=(16, 32), attn_batch=1, attn_repeats=2,
        moe_experts=(4, 8), moe_top_k=(2,), moe_tokens=64, moe_hidden=32, moe_expert_dim=16,
        moe_repeats=2,
        decode_contexts=(32, 64), decode_batch=2, decode_repeats=2, decode_inner=2,
        fp8_steps=3, fp8_batch=2, fp8_seq_len=16,
        train_batch=2, train_seq_len=16, train_repeats=2, reference_steps=2,
        compare_backends=False,
    ),
    "quick": Sizes(
        attn_seq_lens=(128, 256, 512, 1024), attn_batch=1, attn_repeats=5,
        moe_experts=(4, 8, 16, 32, 64, 256), moe_top_k=(1, 2, 4, 8), moe_tokens=2048,
        moe_hidden=256, moe_expert_dim=128, moe_repeats=3,
        decode_contexts=(512, 1024, 2048), decode_batch=4, decode_repeats=5, decode_inner=4,
        fp8_steps=30, fp8_batch=16, fp8_seq_len=64,
        train_batch=8, train_seq_len=128, train_repeats=5, reference_steps=5,
        compare_backends=False,
    ),
    "full": Sizes(
        attn_seq_lens=(128, 256, 512, 1024, 2048), attn_batch=1, attn_repeats=7,
        moe_experts=(4, 8, 16, 32, 64, 256), moe_top_k=(1, 2, 4, 8), moe_tokens=2048,
        moe_hidden=256, moe_expert_dim=128, moe_repeats=5,
        decode_contexts=(512, 1024, 2048, 4096), decode_batch=4, decode_repeats=7, decode_inner=4,
        fp8_steps=30, fp8_batch=16, fp8_seq_len=64,
        train_batch=8, train_seq_len=128, train_repeats=7, reference_steps=7,
        compare_backends=False,
    ),
}


def attention_config(mode: str) -> DeepSeekV3Config:
    """MLA layer for mla_vs_mha (the MHA baseline: same heads, head dim = v_head_dim)."""
    if mode == "smoke":
        return DeepSeekV3Config(
            hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
            n_routed_experts=4, n_group=1, topk_group=1)
    return DeepSeekV3Config(
        hidden_size=512, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=8192,
        n_routed_experts=4, n_group=1, topk_group=1)


def decode_config(mode: str) -> DeepSeekV3Config:
    """Whole model for decode throughput: the latent cache is 160 numbers per
    token and layer against 8 x (96 + 64) = 1280 for the naive cache."""
    if mode == "smoke":
        return DeepSeekV3Config(
            vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
            q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    return DeepSeekV3Config(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=8192,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1)


def moe_config(num_experts: int, top_k: int, hidden: int, expert_dim: int) -> DeepSeekV3Config:
    """A one-layer model whose one decoder layer is DeepSeekMoE (what the
    engine's step trains under JAX; under TF the DeepSeekMoE layer of this
    config alone): routed experts only (no shared expert, whose constant cost
    would hide how the routed path scales), no group limit, the default
    (dropless) routing, and the cheapest attention and vocabulary the config
    allows (1 head, head dims 4, vocab 64, no MTP) so the routed experts
    dominate the step."""
    return DeepSeekV3Config(
        vocab_size=64, hidden_size=hidden, intermediate_size=8, moe_intermediate_size=expert_dim,
        num_hidden_layers=1, first_k_dense_replace=0, num_attention_heads=1,
        q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
        max_position_embeddings=256, n_routed_experts=num_experts, num_experts_per_tok=top_k,
        n_shared_experts=0, n_group=1, topk_group=1, num_nextn_predict_layers=0)


def fp8_config(mode: str) -> DeepSeekV3Config:
    if mode == "smoke":
        # One MoE layer: float8 compiles are the slowest part of the smoke run.
        return DeepSeekV3Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=1, first_k_dense_replace=0, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1)
    # The "mini" preset's widths (vocab 128 matches the Markov data) with 2
    # layers (one dense, one MoE): float8 compiles are slow (~1 min on 2 cores).
    return DeepSeekV3Config(
        vocab_size=128, hidden_size=96, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2)


def train_config(mode: str) -> DeepSeekV3Config:
    """The model trained by both us and the PyTorch reference."""
    if mode == "smoke":
        return DeepSeekV3Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1)
    return DeepSeekV3Config(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=1024,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, first_k_dense_replace=1)


def profile_config(name: str):
    """(config, batch, seq_len) a profile runs: `train_vs_reference`'s own
    config and shape, or a preset at batch 32 x seq 64 (the mini step)."""
    if name == "train_vs_reference":
        return train_config("quick"), SIZES["quick"].train_batch, SIZES["quick"].train_seq_len
    from model import get_preset

    return get_preset(name), 32, 64
