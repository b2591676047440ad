"""DeepSeekMoE: shared experts plus top-k routed experts behind a gate with
auxiliary-loss-free load balancing (DeepSeek-V3 paper, section 2.1.2).

Routing (per token, logits in float32):
    s_i = sigmoid(u · e_i)                      (or softmax, DeepSeek-V2 style)
    selection uses s_i + b_i, where b_i is the non-trainable correction bias,
    restricted to the `topk_group` groups whose top-2 biased scores sum highest;
    gate weights use the *unbiased* s_i of the chosen experts, normalised to sum
    to 1 (norm_topk_prob) and multiplied by routed_scaling_factor.
Balancing: once per optimizer step the trainer calls
`apply_bias_update(load of that step)`, which moves every b_i by gamma toward
balance, by the sign of (mean load - load_i) (`router_bias_update`). The
forward pass never touches the bias: with gradient accumulation it would move
once per micro-batch. An optional sequence-wise balance loss (alpha, eqs.
17-20) complements it; its f_i counts the plain top-k of s_i.

Dropless grouped compute (the default, training and inference, "No
Token-Dropping"): the T*K (token, choice) assignments are sorted by expert
(not kept ones last) and each expert's rows run its SwiGLU through
`grouped_matmul` (model/grouped_matmul.py): tiles of a few rows inside one
expert's group, about T*K + E*tile rows of work, so compute follows top_k,
not the number of experts; nothing is [experts x tokens]. Under JAX the tiles
run in a while loop over the tiles actually used with the expert weights
indexed in place (custom VJP); under TF a keras.ops version over the static
tile bound. Expert weights are expert-major [E, ...], so they can be sharded.
`jax.lax.ragged_dot` was measured and not used: on XLA:CPU (JAX 0.4.30) it
costs like every expert on every row (55 ms at 8 experts, 407 ms at 64, vs
7 / 11 ms blocked, 4096 rows x 256 x 128) and has no differentiation rule.

Pad tokens (padding_mask 0) are not routed: they add nothing to the load
counters, the balance loss or capacity, and their routed output is zero.
Optional capacity (expert_capacity_factor, training only): each expert keeps
its C = ceil(factor * real tokens * K / E) highest-scoring assignments, the
rest are dropped and counted.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from .config import DeepSeekV3Config
from .expert_buckets import bucket_rows, bucketed_experts
from .grouped_matmul import FUSED_SWIGLU, fused_grouped_swiglu, grouped_matmul, tile_rows, unsort_rows, use_fused_swiglu
from .mlp import SwiGLUMLP
from .sharding import EXPERT, REPLICATED

# Experts of groups that were not selected can never be chosen (-inf, as in
# the official inference code and transformers 5; older transformers used 0.0,
# which lets a strongly negative bias pull in an expert from a dropped group).
_UNSELECTED_GROUP_SCORE = float("-inf")

def router_bias_update(bias, load, gamma):
    """One aux-loss-free balancing step: b_i + gamma * sign(mean(load) - load_i)."""
    bias = ops.cast(bias, "float32")
    load = ops.cast(load, "float32")
    return bias + gamma * ops.sign(ops.mean(load) - load)


def block_rows(assignments, experts):
    """Rows per tile of the grouped expert compute (the backend's choice)."""
    return tile_rows(assignments, experts)


def grouped_swiglu(rows, group_sizes, gate_proj, up_proj, down_proj, group_expert=None):
    """SwiGLU of rows sorted by expert (group_sizes [E] rows each, the rest
    get zeros) through the expert-major weights [E, ...]; with group_expert,
    groups in any order (model/grouped_matmul.py)."""
    groups = gate_proj.shape[0] if group_expert is None else group_sizes.shape[0]
    block = block_rows(rows.shape[0], groups)
    dtype = rows.dtype

    if FUSED_SWIGLU[0]:
        return fused_grouped_swiglu(rows, *(ops.cast(w, dtype) for w in (gate_proj, up_proj, down_proj)),
                                    group_sizes, block, group_expert)

    def expert_matmul(x, weight):
        return grouped_matmul(x, ops.cast(weight, dtype), group_sizes, block, group_expert)

    hidden = ops.silu(expert_matmul(rows, gate_proj)) * expert_matmul(rows, up_proj)
    return expert_matmul(hidden, down_proj)


def routed_expert_outputs(x, flat_experts, kept, k, gate_proj, up_proj, down_proj):
    """x [T, hidden]; flat_experts, kept [T*K] (assignment a is token a // k).
    Returns each assignment's expert output [T*K, hidden] (zeros where not
    kept): assignments sorted by expert, grouped_swiglu, unsorted."""
    experts = gate_proj.shape[0]
    n = ops.shape(flat_experts)[0]
    # Sort assignments by expert (not kept: sentinel E, last, outside every
    # group); unique keys keep the order deterministic on every backend.
    key_expert = ops.where(kept, flat_experts, experts)
    order = ops.argsort(key_expert * n + ops.arange(n, dtype="int32"))
    group = ops.segment_sum(ops.cast(kept, "int32"), flat_experts, num_segments=experts)
    out = grouped_swiglu(ops.take(x, order // k, axis=0), group, gate_proj, up_proj, down_proj)
    position = ops.scatter_update(ops.zeros((n,), "int32"), order[:, None],
                                  ops.arange(n, dtype="int32"))
    if use_fused_swiglu():  # the JAX loop path (model/grouped_matmul.py)
        return unsort_rows(out, ops.cast(order, "int32"), position)
    return ops.take(out, position, axis=0)


def routed_expert_sum(x, flat_experts, kept, weights, k, gate_proj, up_proj, down_proj):
    """sum_j weights[t, j] * (assignment (t, j)'s expert output) over t's kept
    assignments -> [T, hidden], by routed_expert_outputs (the tile loop);
    weights [T*K] or [T, K]."""
    per_choice = routed_expert_outputs(x, flat_experts, kept, k, gate_proj, up_proj, down_proj)
    w = ops.cast(ops.reshape(weights, (-1, k)), per_choice.dtype)
    return ops.sum(ops.reshape(per_choice, (-1, k, ops.shape(per_choice)[-1])) * w[..., None], axis=1)


def topk_route(c: DeepSeekV3Config, x, weight, bias):
    """The gate as a function of its weights (the per-device dispatch calls it
    on each device's tokens): (expert indices [T, K], weights [T, K], scores [T, E])."""
    logits = ops.matmul(ops.cast(x, "float32"), ops.cast(weight, "float32"))
    if c.scoring_func == "sigmoid":
        scores = ops.sigmoid(logits)
    else:
        scores = ops.softmax(logits, axis=-1)
    choice = scores + ops.cast(bias, "float32")
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
    if c.norm_topk_prob:  # K = 1 included, as transformers does
        weights = weights / (ops.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return indices, weights * c.routed_scaling_factor, scores


def sequence_aux_terms(c: DeepSeekV3Config, scores, valid, batch, seq_len):
    """Sequence-wise balance loss (paper eqs. 17-20) per sequence: (sum_i f_i
    P_i [B], 1 if the sequence has real tokens [B]); the loss is alpha times
    the first's sum over the second's. f_i counts the plain top-k of s_i (no
    bias, no group limit); pads are left out of both sums and T."""
    e, k = c.n_routed_experts, c.num_experts_per_tok
    real = ops.reshape(ops.cast(valid, "float32"), (batch, seq_len))
    length = ops.sum(real, axis=1)  # T per sequence
    _, plain_topk = ops.top_k(scores, k)
    picks = ops.sum(ops.one_hot(ops.reshape(plain_topk, (batch, seq_len, k)), e), axis=2)
    safe_length = ops.maximum(length, 1.0)[:, None]
    f = ops.sum(picks * real[..., None], axis=1) * e / (k * safe_length)  # [B, E]
    normed = scores / ops.sum(scores, axis=-1, keepdims=True)
    p = ops.sum(ops.reshape(normed, (batch, seq_len, e)) * real[..., None], axis=1) / safe_length
    has_tokens = ops.cast(length > 0, "float32")
    return ops.sum(f * p, axis=-1) * has_tokens, has_tokens


def routed_assignments(c: DeepSeekV3Config, flat, valid, weight, bias):
    """Routes [T, hidden] tokens: (experts [T*K] int32, gate weights [T*K],
    valid_choice [T*K] (pads: False), scores [T, E])."""
    indices, weights, scores = topk_route(c, flat, weight, bias)
    k = c.num_experts_per_tok
    valid_choice = ops.reshape(ops.repeat(valid[:, None], k, axis=1), (-1,))
    return (ops.reshape(ops.cast(indices, "int32"), (-1,)), ops.reshape(weights, (-1,)),
            valid_choice, scores)


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class TopkRouter(keras.layers.Layer):
    """The gate: returns (expert indices [T, K], weights [T, K], scores [T, E])."""

    WEIGHT_AXES = {"weight": REPLICATED, "e_score_correction_bias": REPLICATED}  # (model.sharding)

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
        return topk_route(self.config, x, self.weight, self.e_score_correction_bias)


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class DeepSeekMoE(keras.layers.Layer):
    """Routed SwiGLU experts + shared experts, with load statistics."""

    # The mesh layout (model.sharding): the routed experts' weights [E, ...]
    # split over the "expert" axis (expert parallelism); the counters are
    # replicated (every device holds the global count).
    WEIGHT_AXES = {"experts_gate_proj": (EXPERT, None, None), "experts_up_proj": (EXPERT, None, None),
                   "experts_down_proj": (EXPERT, None, None), "expert_load": REPLICATED,
                   "dropped_tokens": REPLICATED, "tokens_seen": REPLICATED}

    # Set by the training engine on a JAX mesh (training/expert_parallel.py):
    # f(layer, x [B, S, hidden], valid [B*S], training) -> (routed output,
    # load [E], real tokens, aux-loss sum, sequences) of the whole batch,
    # computed per device. None: `_routed` (dropless runs only).
    expert_dispatch = None

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
        # per expert (pads excluded), assignments dropped by the optional
        # capacity, real tokens seen.
        stat = dict(initializer="zeros", trainable=False, aggregation="sum", autocast=False)
        self.expert_load = self.add_weight(name="expert_load", shape=(experts,), **stat)
        self.dropped_tokens = self.add_weight(name="dropped_tokens", shape=(), **stat)
        self.tokens_seen = self.add_weight(name="tokens_seen", shape=(), **stat)

    # -------------------------------------------------------------- routing
    def _capacity(self, num_tokens, training):
        """Slots per expert, or None (dropless: the default, and all inference)."""
        c = self.config
        if not training or c.expert_capacity_factor is None:
            return None
        even_share = c.expert_capacity_factor * c.num_experts_per_tok / c.n_routed_experts
        if isinstance(num_tokens, int):
            return max(1, min(num_tokens, math.ceil(even_share * num_tokens)))
        cap = ops.cast(ops.ceil(even_share * ops.cast(num_tokens, "float32")), "int32")
        return ops.clip(cap, 1, ops.maximum(ops.cast(num_tokens, "int32"), 1))

    def _keep_by_score(self, flat_experts, flat_weights, valid, capacity):
        """Each expert keeps its `capacity` highest-scoring real assignments."""
        experts = self.config.n_routed_experts
        n = ops.shape(flat_experts)[0]
        # Unique integer keys: expert first, then descending score (ties by
        # index), pads last; the rank inside an expert is the position.
        score_rank = ops.cast(ops.argsort(ops.argsort(-flat_weights)), "int32")
        key_expert = ops.where(valid, flat_experts, experts)
        order = ops.argsort(key_expert * n + score_rank)
        sorted_expert = ops.take(key_expert, order)
        counts = ops.segment_sum(ops.cast(valid, "int32"), flat_experts, num_segments=experts)
        starts = ops.concatenate([ops.cumsum(counts) - counts, ops.zeros((1,), "int32")])
        position_sorted = ops.arange(n, dtype="int32") - ops.take(starts, sorted_expert)
        position = ops.scatter_update(ops.zeros((n,), "int32"), order[:, None], position_sorted)
        return ops.logical_and(valid, position < capacity)

    def expert_weights(self, dtype):
        """The routed experts' (gate, up, down) weights [E, ...] in `dtype`."""
        return tuple(ops.cast(v, dtype) for v in
                     (self.experts_gate_proj, self.experts_up_proj, self.experts_down_proj))

    # --------------------------------------------------------------- losses
    def call(self, x, training=False, padding_mask=None):
        """x [B, S, hidden]; padding_mask [B, S] (1 = real token) or None."""
        c = self.config
        batch, seq_len, hidden = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2]
        flat = ops.reshape(x, (-1, hidden))
        if padding_mask is None:
            valid = ops.ones((ops.shape(flat)[0],), "bool")
        else:
            valid = ops.reshape(ops.cast(padding_mask, "bool"), (-1,))
        dropless = not training or c.expert_capacity_factor is None
        if self.expert_dispatch is not None and dropless:
            # Per device (training/expert_parallel.py): routing, experts and
            # the statistics' partial sums, summed over the mesh.
            out, load, real_tokens, aux_sum, aux_sequences = self.expert_dispatch(
                self, x, valid, training)
            out = ops.reshape(out, (-1, hidden))
            dropped = ops.zeros((), "float32")
        else:
            out, load, dropped, real_tokens, aux_sum, aux_sequences = self._routed(
                flat, valid, training, batch, seq_len, padding_mask is not None)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.expert_load.assign_add(load)
        self.dropped_tokens.assign_add(dropped)
        self.tokens_seen.assign_add(real_tokens)
        if training and c.seq_aux_loss_alpha > 0:
            self.add_loss(c.seq_aux_loss_alpha * aux_sum / ops.maximum(aux_sequences, 1.0))
        return ops.reshape(out, (batch, seq_len, hidden))

    def _routed(self, flat, valid, training, batch, seq_len, masked):
        """The routed experts on this process's arrays (one device, TF)."""
        c = self.config
        experts, k = c.n_routed_experts, c.num_experts_per_tok
        flat_experts, flat_weights, valid_choice, scores = routed_assignments(
            c, flat, valid, self.gate.weight, self.gate.e_score_correction_bias)
        real_tokens = ops.sum(ops.cast(valid, "float32"))
        capacity = self._capacity(ops.cast(real_tokens, "int32") if masked
                                  else ops.shape(flat)[0], training)
        if capacity is None:
            kept = valid_choice
        else:
            kept = self._keep_by_score(flat_experts, flat_weights, valid_choice, capacity)
        w = ops.cast(flat_weights * ops.cast(kept, "float32"), flat.dtype)
        bucket = bucket_rows(ops.shape(flat_experts)[0], experts) if use_fused_swiglu() else None
        if bucket is None:
            out = routed_expert_sum(flat, flat_experts, kept, w, k, self.experts_gate_proj,
                                    self.experts_up_proj, self.experts_down_proj)
        else:  # model/expert_buckets.py; the assignments past a full bucket take the loop
            out = bucketed_experts(flat, flat_experts, kept, w, k, *self.expert_weights(flat.dtype),
                                   bucket)
        load = ops.segment_sum(ops.cast(valid_choice, "float32"), flat_experts, num_segments=experts)
        dropped = ops.sum(ops.cast(valid_choice, "float32")) - ops.sum(ops.cast(kept, "float32"))
        aux_sum = aux_sequences = ops.zeros((), "float32")
        if training and c.seq_aux_loss_alpha > 0:
            aux_sum, aux_sequences = (ops.sum(t) for t in sequence_aux_terms(
                c, scores, valid, batch, seq_len))
        return out, load, dropped, real_tokens, aux_sum, aux_sequences

    # ------------------------------------------------------------- balancing
    def apply_bias_update(self, load) -> None:
        """Moves the router bias one balancing step from `load` (the [E]
        routed assignments of one optimizer step); called by the trainer."""
        bias = self.gate.e_score_correction_bias
        bias.assign(router_bias_update(bias, load, self.config.bias_update_speed))

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
