"""Closed-form figures for a configuration: parameters, FLOPs, KV-cache size.

Nothing here allocates weights, so it works for the 671B preset too.
"""

from __future__ import annotations

from .config import DeepSeekV3Config


def _attention_params(c: DeepSeekV3Config) -> int:
    h = c.num_attention_heads
    if c.attention_type == "mha":
        d = c.baseline_head_dim
        return 4 * c.hidden_size * h * d
    if c.q_lora_rank is None:
        q = c.hidden_size * h * c.qk_head_dim
    else:
        q = c.hidden_size * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
    kv = (c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
          + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim))
    out = h * c.v_head_dim * c.hidden_size
    return q + kv + out


def _mlp_params(c: DeepSeekV3Config, intermediate: int) -> int:
    return 3 * c.hidden_size * intermediate


def parameter_count(config: DeepSeekV3Config, include_mtp: bool = False) -> dict:
    """Total and per-token activated parameters (embeddings and head included)."""
    c = config
    norms = 2 * c.hidden_size
    embed = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    attn = _attention_params(c)
    dense_layers = c.first_k_dense_replace
    moe_layers = c.num_hidden_layers - dense_layers
    dense = _mlp_params(c, c.intermediate_size)
    expert = _mlp_params(c, c.moe_intermediate_size)
    shared = _mlp_params(c, c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts else 0
    gate = c.n_routed_experts * c.hidden_size + c.n_routed_experts
    total_layer_moe = attn + norms + shared + gate + c.n_routed_experts * expert
    active_layer_moe = attn + norms + shared + gate + c.num_experts_per_tok * expert
    layer_dense = attn + norms + dense
    total = embed + head + c.hidden_size + dense_layers * layer_dense + moe_layers * total_layer_moe
    active = embed + head + c.hidden_size + dense_layers * layer_dense + moe_layers * active_layer_moe
    if include_mtp and c.num_nextn_predict_layers:
        # Each MTP module: two RMSNorms, a 2h->h projection, one MoE block
        # (embedding and output head are shared with the main model).
        mtp = 2 * c.hidden_size + 2 * c.hidden_size * c.hidden_size + total_layer_moe + c.hidden_size
        mtp_active = 2 * c.hidden_size + 2 * c.hidden_size * c.hidden_size + active_layer_moe + c.hidden_size
        total += c.num_nextn_predict_layers * mtp
        active += c.num_nextn_predict_layers * mtp_active
    return {"total": int(total), "activated": int(active)}


def kv_cache_elements_per_token_per_layer(config: DeepSeekV3Config, layout: str) -> int:
    """Elements one token adds to one layer's cache.

    layout: "mla_absorbed" (latent + shared rope key), "mla_naive" (full
    per-head keys and values) or "mha" (the standard baseline).
    """
    c = config
    h = c.num_attention_heads
    if layout == "mla_absorbed":
        return c.kv_lora_rank + c.qk_rope_head_dim
    if layout == "mla_naive":
        return h * c.qk_head_dim + h * c.v_head_dim
    if layout == "mha":
        return 2 * h * c.baseline_head_dim
    raise ValueError(f"unknown cache layout {layout!r}; use mla_absorbed, mla_naive or mha")


def kv_cache_bytes(config: DeepSeekV3Config, layout: str, batch: int, seq_len: int,
                   bytes_per_element: int = 2) -> int:
    per = kv_cache_elements_per_token_per_layer(config, layout)
    return per * config.num_hidden_layers * batch * seq_len * bytes_per_element


def train_flops_per_token(config: DeepSeekV3Config, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 x activated matmul parameters (embedding
    lookup excluded) plus causal attention, 6 * layers * heads * seq/2 * (qk + v)
    multiply-adds x2. This is the formula the MFU figures use."""
    c = config
    params = parameter_count(c)["activated"] - c.vocab_size * c.hidden_size
    attn = 6 * c.num_hidden_layers * c.num_attention_heads * (seq_len / 2) * (c.qk_head_dim + c.v_head_dim)
    return 6.0 * params + attn
