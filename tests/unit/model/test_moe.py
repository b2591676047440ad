"""DeepSeekMoE: routing rules, dispatch correctness, capacity, balancing."""

import math

import numpy as np
import pytest

from model import get_preset
from model.moe import DeepSeekMoE

pytestmark = [pytest.mark.unit, pytest.mark.model]


def _moe(config, hidden=None):
    layer = DeepSeekMoE(config)
    layer.build((None, None, hidden or config.hidden_size))
    return layer


def _reference_routing(x, weight, bias, c):
    """Straight-line NumPy version of the DeepSeek-V3 gate, one token at a time."""
    scores = 1 / (1 + np.exp(-(x @ weight)))
    choice = scores + bias
    per = c.n_routed_experts // c.n_group
    out_idx, out_w = [], []
    for s, ch in zip(scores, choice):
        groups = [np.sort(ch[g * per:(g + 1) * per])[-2:].sum() for g in range(c.n_group)]
        keep = np.argsort(groups)[::-1][: c.topk_group]
        masked = np.array([ch[e] if e // per in keep else -np.inf for e in range(len(ch))])
        idx = np.argsort(-masked, kind="stable")[: c.num_experts_per_tok]
        w = s[idx] / s[idx].sum() if c.norm_topk_prob else s[idx]
        out_idx.append(idx)
        out_w.append(w * c.routed_scaling_factor)
    return np.array(out_idx), np.array(out_w)


def test_router_matches_reference_rule(rng):
    c = get_preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                   routed_scaling_factor=2.5)
    moe = _moe(c)
    moe.gate.e_score_correction_bias.assign(rng.normal(scale=0.1, size=16).astype("float32"))
    moe.gate.weight.assign(rng.normal(size=(c.hidden_size, 16)).astype("float32"))
    x = rng.normal(size=(40, c.hidden_size)).astype("float32")
    idx, w, _ = moe.gate(x)
    ref_idx, ref_w = _reference_routing(x, np.asarray(moe.gate.weight),
                                        np.asarray(moe.gate.e_score_correction_bias), c)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), 1), np.sort(ref_idx, 1))
    order = np.argsort(np.asarray(idx), 1)
    ref_order = np.argsort(ref_idx, 1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1),
                               np.take_along_axis(ref_w, ref_order, 1), rtol=1e-5)


def _dense_reference(moe, x):
    """Every token through exactly its chosen experts, computed directly."""
    idx, w, _ = moe.gate(x)
    idx, w = np.asarray(idx), np.asarray(w)
    g, u, d = (np.asarray(v) for v in (moe.experts_gate_proj, moe.experts_up_proj, moe.experts_down_proj))
    silu = lambda z: z / (1 + np.exp(-z))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, weight in zip(idx[t], w[t]):
            out[t] += weight * ((silu(x[t] @ g[e]) * (x[t] @ u[e])) @ d[e])
    return out + np.asarray(moe.shared_experts(x))


def test_dispatch_equals_per_token_computation(rng):
    c = get_preset("tiny", n_routed_experts=8, n_group=2, topk_group=2, num_experts_per_tok=3)
    moe = _moe(c)
    x = rng.normal(size=(1, 24, c.hidden_size)).astype("float32")
    out = np.asarray(moe(x))[0]
    np.testing.assert_allclose(out, _dense_reference(moe, x[0]), rtol=1e-4, atol=1e-6)


def test_training_capacity_scales_with_top_k_not_experts():
    tokens = 1024
    for experts in (8, 64):
        for top_k in (1, 4):
            c = get_preset("tiny", n_routed_experts=experts, num_experts_per_tok=top_k, n_group=1,
                           topk_group=1, expert_capacity_factor=1.25)
            capacity = _moe(c)._capacity(tokens, training=True)
            # Expert buffers hold E * C slots: about factor * tokens * top_k, whatever E is.
            assert experts * capacity <= math.ceil(1.25 * tokens * top_k) + experts
    c = get_preset("tiny")
    assert _moe(c)._capacity(tokens, training=False) == tokens  # inference is dropless


def test_overflow_is_counted_in_training_and_absent_in_inference(rng):
    c = get_preset("tiny", n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=1,
                   expert_capacity_factor=1.0, bias_update_speed=0.0)
    moe = _moe(c)
    weight = np.zeros((c.hidden_size, 4), "float32")
    weight[:, 0] = 5.0  # every token prefers expert 0
    moe.gate.weight.assign(weight)
    x = np.abs(rng.normal(size=(2, 16, c.hidden_size))).astype("float32")
    moe(x, training=True)
    stats = moe.get_expert_utilization()
    # 32 tokens, capacity ceil(32 * 1 / 4) = 8 on expert 0: 24 dropped.
    assert stats["dropped_fraction"] == pytest.approx(24 / 32)
    moe.reset_expert_counts()
    moe(x, training=False)
    assert moe.get_expert_utilization()["dropped_fraction"] == 0.0


def test_aux_loss_free_bias_balances_a_skewed_router(rng):
    c = get_preset("tiny", n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2,
                   bias_update_speed=0.01, expert_capacity_factor=None)
    moe = _moe(c)
    skew = rng.normal(size=(c.hidden_size, 8)).astype("float32") * 0.3
    skew[:, :2] += 0.6  # experts 0 and 1 start out favoured
    moe.gate.weight.assign(skew)
    x = np.abs(rng.normal(size=(4, 32, c.hidden_size))).astype("float32")
    moe(x, training=False)
    before = moe.get_expert_utilization()
    for _ in range(150):
        moe.reset_expert_counts()
        moe(x, training=True)
    moe.reset_expert_counts()
    moe(x, training=False)
    after = moe.get_expert_utilization()
    assert before["cv"] > 0.5
    assert after["cv"] < before["cv"] / 3, (before["cv"], after["cv"])
    assert after["max_min_ratio"] < 2.0
    # The favoured experts were pushed down, the others up.
    bias = np.array(after["bias"])
    assert bias[:2].max() < bias[2:].min()


def test_sequence_aux_loss_is_added_only_when_enabled(rng):
    x = rng.normal(size=(2, 8, 32)).astype("float32")
    with_loss = _moe(get_preset("tiny", seq_aux_loss_alpha=0.01))
    with_loss(x, training=True)
    assert len(with_loss.losses) == 1 and float(with_loss.losses[0]) > 0
    without = _moe(get_preset("tiny"))
    without(x, training=True)
    assert len(without.losses) == 0
