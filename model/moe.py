"""DeepSeekMoE: shared experts plus top-k routed experts behind a gate with
auxiliary-loss-free load balancing (DeepSeek-V3 paper, section 2.1.2).

Routing (per token, logits in float32):
    s_i = sigmoid(u · e_i)                      (or softmax, DeepSeek-V2 style)
    selection uses s_i + b_i, where b_i is the non-trainable correction bias,
    restricted to the `topk_group` groups whose top-2 biased scores sum highest;
    gate weights use the *unbiased* s_i of the chosen experts, normalised to sum
    to 1 (norm_topk_prob) and multiplied by routed_scaling_factor.
Balancing: after each training step every b_i moves by gamma toward balance,
by the sign of (mean load - load_i). An optional sequence-wise balance loss
(alpha) complements it.

Only the chosen experts run: tokens are dispatched into per-expert buffers of
`capacity` slots ([E, C, hidden]) and the experts run as one batched matmul,
so compute grows with top_k, not with the number of experts. Training uses
C = ceil(capacity_factor * tokens * top_k / experts) and counts what overflows;
inference (and capacity_factor None) uses C = tokens, which drops nothing.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from .config import DeepSeekV3Config
from .mlp import SwiGLUMLP

# Experts of groups that were not selected can never be chosen (-inf, as in
# the official inference code and transformers 5; older transformers used 0.0,
# which lets a strongly negative bias pull in an expert from a dropped group).
_UNSELECTED_GROUP_SCORE = float("-inf")


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class TopkRouter(keras.layers.Layer):
    """The gate: returns (expert indices [T, K], weights [T, K], scores [T, E])."""

    def __init__(self, config: DeepSeekV3Config, **kwargs):
        kwargs.setdefault("dtype", "float32")  # routing stays in float32
        super().__init__(**kwargs)
        self.config = config

    def build(self, input_shape):
        c = self.config
        self.weight = self.add_weight(
            name="weight", shape=(input_shape[-1], c.n_routed_experts),
            initializer=keras.initializers.RandomNormal(stddev=c.initializer_range))
        # autocast=False: under mixed_bfloat16 an autocast variable would be
        # assigned in bf16, and gamma-sized bias steps would round away.
        self.e_score_correction_bias = self.add_weight(
            name="e_score_correction_bias", shape=(c.n_routed_experts,),
            initializer="zeros", trainable=False, aggregation="mean", autocast=False)

    def call(self, x):
        c = self.config
        logits = ops.matmul(ops.cast(x, "float32"), ops.cast(self.weight, "float32"))
        if c.scoring_func == "sigmoid":
            scores = ops.sigmoid(logits)
        else:
            scores = ops.softmax(logits, axis=-1)
        choice = scores + self.e_score_correction_bias
        if c.n_group > 1:
            per_group = c.n_routed_experts // c.n_group
            grouped = ops.reshape(choice, (-1, c.n_group, per_group))
            if c.scoring_func == "sigmoid":
                group_scores = ops.sum(ops.top_k(grouped, 2, sorted=False)[0], axis=-1)
            else:
                group_scores = ops.max(grouped, axis=-1)
            _, top_groups = ops.top_k(group_scores, c.topk_group, sorted=False)
            group_mask = ops.sum(ops.one_hot(top_groups, c.n_group, dtype="float32"), axis=1)
            expert_mask = ops.reshape(
                ops.repeat(group_mask[:, :, None], per_group, axis=2), (-1, c.n_routed_experts))
            choice = ops.where(expert_mask > 0, choice, _UNSELECTED_GROUP_SCORE)
        _, indices = ops.top_k(choice, c.num_experts_per_tok, sorted=True)
        weights = ops.take_along_axis(scores, indices, axis=-1)
        if c.num_experts_per_tok > 1 and c.norm_topk_prob:
            weights = weights / (ops.sum(weights, axis=-1, keepdims=True) + 1e-20)
        return indices, weights * c.routed_scaling_factor, scores


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class DeepSeekMoE(keras.layers.Layer):
    """Routed SwiGLU experts + shared experts, with load statistics."""

    def __init__(self, config: DeepSeekV3Config, **kwargs):
        super().__init__(**kwargs)
        c = config
        self.config = c
        self.gate = TopkRouter(c, name="gate")
        self.shared_experts = (
            SwiGLUMLP(c, c.moe_intermediate_size * c.n_shared_experts, name="shared_experts")
            if c.n_shared_experts else None)

    def build(self, input_shape):
        c = self.config
        hidden, inner, experts = input_shape[-1], c.moe_intermediate_size, c.n_routed_experts
        init = keras.initializers.RandomNormal(stddev=c.initializer_range)
        self.gate.build(input_shape)
        if self.shared_experts is not None:
            self.shared_experts.build(input_shape)
        self.experts_gate_proj = self.add_weight(
            name="experts_gate_proj", shape=(experts, hidden, inner), initializer=init)
        self.experts_up_proj = self.add_weight(
            name="experts_up_proj", shape=(experts, hidden, inner), initializer=init)
        self.experts_down_proj = self.add_weight(
            name="experts_down_proj", shape=(experts, inner, hidden), initializer=init)
        # Statistics since the last reset_expert_counts(): routed assignments
        # per expert, assignments dropped by the training capacity, tokens seen.
        stat = dict(initializer="zeros", trainable=False, aggregation="sum", autocast=False)
        self.expert_load = self.add_weight(name="expert_load", shape=(experts,), **stat)
        self.dropped_tokens = self.add_weight(name="dropped_tokens", shape=(), **stat)
        self.tokens_seen = self.add_weight(name="tokens_seen", shape=(), **stat)

    # -------------------------------------------------------------- routing
    def _capacity(self, num_tokens, training):
        c = self.config
        if not training or c.expert_capacity_factor is None:
            return num_tokens
        even_share = c.expert_capacity_factor * c.num_experts_per_tok / c.n_routed_experts
        if isinstance(num_tokens, int):
            return max(1, min(num_tokens, math.ceil(even_share * num_tokens)))
        cap = ops.cast(ops.ceil(even_share * ops.cast(num_tokens, "float32")), "int32")
        return ops.clip(cap, 1, num_tokens)

    def _slots(self, indices, capacity):
        """Assigns each (token, choice) a slot expert * C + position, in token
        order within each expert; choices past the capacity get the overflow
        slot E * C. Returns (slots [N], kept [N] bool, load [E])."""
        experts = self.config.n_routed_experts
        flat = ops.reshape(ops.cast(indices, "int32"), (-1,))
        n = ops.shape(flat)[0]
        arange = ops.arange(n, dtype="int32")
        load = ops.sum(ops.one_hot(flat, experts, dtype="int32"), axis=0)
        starts = ops.cumsum(load) - load
        # Unique sort keys make the order deterministic on every backend.
        order = ops.argsort(flat * n + arange)
        sorted_experts = ops.take(flat, order)
        position_sorted = arange - ops.take(starts, sorted_experts)
        position = ops.scatter(order[:, None], position_sorted, (n,))
        kept = position < capacity
        slots = ops.where(kept, flat * capacity + position, experts * capacity)
        return slots, kept, load

    def _routed(self, x, indices, weights, training):
        c = self.config
        num_tokens, hidden = ops.shape(x)[0], ops.shape(x)[1]
        k, experts = c.num_experts_per_tok, c.n_routed_experts
        capacity = self._capacity(num_tokens, training)
        slots, kept, load = self._slots(indices, capacity)
        token_of = ops.repeat(ops.arange(num_tokens, dtype="int32"), k)
        # Which token fills each slot (num_tokens = the zero row: empty slot).
        slot_token = ops.scatter_update(
            ops.full((experts * capacity + 1,), num_tokens, dtype="int32"),
            slots[:, None], token_of)
        x_padded = ops.concatenate([x, ops.zeros((1, hidden), x.dtype)], axis=0)
        dispatched = ops.reshape(ops.take(x_padded, slot_token[:-1], axis=0),
                                 (experts, capacity, hidden))
        dtype = x.dtype
        gate = ops.einsum("ech,ehi->eci", dispatched, ops.cast(self.experts_gate_proj, dtype))
        up = ops.einsum("ech,ehi->eci", dispatched, ops.cast(self.experts_up_proj, dtype))
        out = ops.einsum("eci,eih->ech", ops.silu(gate) * up, ops.cast(self.experts_down_proj, dtype))
        out = ops.concatenate([ops.reshape(out, (-1, hidden)), ops.zeros((1, hidden), dtype)], axis=0)
        per_choice = ops.take(out, slots, axis=0)  # overflow slot reads zeros
        w = ops.cast(ops.reshape(weights, (-1, 1)) * ops.cast(kept[:, None], "float32"), dtype)
        combined = ops.sum(ops.reshape(per_choice * w, (num_tokens, k, hidden)), axis=1)
        dropped = ops.sum(1 - ops.cast(kept, "int32"))
        return combined, load, dropped

    # --------------------------------------------------------------- losses
    def _sequence_aux_loss(self, indices, scores, batch, seq_len):
        """alpha * sum_i f_i P_i per sequence (paper eq. 17-20), batch mean."""
        c = self.config
        e, k = c.n_routed_experts, c.num_experts_per_tok
        picks = ops.sum(ops.one_hot(ops.reshape(indices, (batch, seq_len, k)), e), axis=2)
        f = ops.sum(picks, axis=1) * (e / (k * seq_len))  # [B, E]
        normed = scores / ops.sum(scores, axis=-1, keepdims=True)
        p = ops.mean(ops.reshape(normed, (batch, seq_len, e)), axis=1)  # [B, E]
        return c.seq_aux_loss_alpha * ops.mean(ops.sum(f * p, axis=-1))

    def call(self, x, training=False):
        c = self.config
        batch, seq_len, hidden = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2]
        flat = ops.reshape(x, (-1, hidden))
        indices, weights, scores = self.gate(flat)
        routed, load, dropped = self._routed(flat, indices, weights, training)
        out = routed
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        load_f = ops.cast(load, "float32")
        self.expert_load.assign_add(load_f)
        self.dropped_tokens.assign_add(ops.cast(dropped, "float32"))
        self.tokens_seen.assign_add(ops.cast(ops.shape(flat)[0], "float32"))
        if training:
            if c.bias_update_speed > 0:
                error = ops.mean(load_f) - load_f
                bias = self.gate.e_score_correction_bias
                bias.assign(ops.cast(bias, "float32") + c.bias_update_speed * ops.sign(error))
            if c.seq_aux_loss_alpha > 0:
                self.add_loss(self._sequence_aux_loss(indices, scores, batch, seq_len))
        return ops.reshape(out, (batch, seq_len, hidden))

    # ------------------------------------------------------------ statistics
    def get_expert_utilization(self) -> dict:
        """Load since the last reset: per-expert fraction of routed assignments,
        max/min ratio, coefficient of variation, dropped fraction, and the bias."""
        import numpy as np

        load = np.asarray(keras.ops.convert_to_numpy(self.expert_load), dtype=np.float64)
        total = load.sum()
        fraction = load / total if total else np.zeros_like(load)
        mean = load.mean()
        assignments = float(keras.ops.convert_to_numpy(self.tokens_seen)) * self.config.num_experts_per_tok
        return {
            "load": load.tolist(),
            "fraction": fraction.tolist(),
            "max_min_ratio": float(load.max() / load.min()) if load.min() > 0 else float("inf"),
            "cv": float(load.std() / mean) if mean > 0 else 0.0,
            "dropped_fraction": (float(keras.ops.convert_to_numpy(self.dropped_tokens)) / assignments
                                 if assignments else 0.0),
            "bias": np.asarray(keras.ops.convert_to_numpy(
                self.gate.e_score_correction_bias)).tolist(),
        }

    def reset_expert_counts(self) -> None:
        for v in (self.expert_load, self.dropped_tokens, self.tokens_seen):
            v.assign(ops.zeros(v.shape, v.dtype))
