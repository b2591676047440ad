"""DeepSeekMoE: routing rules, grouped dropless compute, capacity, padding,
balancing, the sequence-wise loss."""

import keras
import numpy as np
import pytest
from keras import ops

from model import get_preset
from model.moe import DeepSeekMoE, router_bias_update

pytestmark = [pytest.mark.unit, pytest.mark.model]


def _moe(config, hidden=None, rng=None):
    layer = DeepSeekMoE(config)
    layer.build((None, None, hidden or config.hidden_size))
    if rng is not None:  # well-separated routing: no near-ties between experts
        layer.gate.weight.assign(
            rng.normal(scale=0.3, size=layer.gate.weight.shape).astype("float32"))
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



CASES = [  # (experts, top_k, n_group, topk_group)
    (8, 3, 2, 2), (4, 4, 1, 1), (8, 1, 4, 2), (16, 2, 4, 2), (64, 2, 8, 4)]


def _dense_keras(moe, x):
    """Every expert on every token, masked by the routing (keras.ops)."""
    c = moe.config
    idx, w, _ = moe.gate(x)
    combine = ops.sum(ops.one_hot(idx, c.n_routed_experts) * w[..., None], axis=1)  # [T, E]
    gate = ops.einsum("th,ehi->eti", x, moe.experts_gate_proj)
    up = ops.einsum("th,ehi->eti", x, moe.experts_up_proj)
    out = ops.einsum("eti,eih->eth", ops.silu(gate) * up, moe.experts_down_proj)
    return ops.einsum("te,eth->th", combine, out) + moe.shared_experts(x)


def _value_and_grads(fn, variables, x):
    """d sum(fn(x) * probe) / d (x, variables), on either backend."""
    probe = np.random.default_rng(7).normal(size=x.shape).astype("float32")
    if keras.backend.backend() == "jax":
        import jax

        def f(values, x):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return ops.sum(fn(x) * probe)

        gx, gv = jax.grad(f, argnums=(1, 0))(
            [v.value for v in variables], ops.convert_to_tensor(x))
        return [np.asarray(gx)] + [np.asarray(g) for g in gv]
    import tensorflow as tf

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = ops.sum(fn(xt) * probe)
    grads = tape.gradient(loss, [xt] + [v.value for v in variables])
    return [np.asarray(tf.convert_to_tensor(g)) for g in grads]  # gathers give IndexedSlices


@pytest.mark.parametrize("experts,top_k,n_group,topk_group", CASES)
def test_grouped_compute_equals_dense_reference_outputs_and_gradients(
        rng, experts, top_k, n_group, topk_group):
    c = get_preset("tiny", n_routed_experts=experts, num_experts_per_tok=top_k, n_group=n_group,
                   topk_group=topk_group, routed_scaling_factor=2.5)
    moe = _moe(c, rng=rng)
    x = rng.normal(size=(40, c.hidden_size)).astype("float32")
    for training in (False, True):
        out = np.asarray(moe(x[None], training=training))[0]
        np.testing.assert_allclose(out, np.asarray(_dense_keras(moe, x)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out, _dense_reference(moe, x), rtol=1e-4, atol=1e-6)
    assert float(moe.dropped_tokens) == 0.0
    variables = [moe.experts_gate_proj, moe.experts_up_proj, moe.experts_down_proj, moe.gate.weight]
    ours = _value_and_grads(lambda t: moe(t[None], training=True)[0], variables, x)
    ref = _value_and_grads(lambda t: _dense_keras(moe, t), variables, x)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_top1_weight_is_normalised_when_norm_topk_prob(rng):
    c = get_preset("tiny", num_experts_per_tok=1, norm_topk_prob=True, routed_scaling_factor=2.5)
    _, w, _ = _moe(c, rng=rng).gate(rng.normal(size=(10, c.hidden_size)).astype("float32"))
    np.testing.assert_allclose(np.asarray(w), 2.5, rtol=1e-6)


def test_train_output_ignores_row_order_and_drops_nothing_by_default(rng):
    c = get_preset("tiny", n_routed_experts=8, n_group=2, topk_group=2, num_experts_per_tok=2)
    assert c.expert_capacity_factor is None
    moe = _moe(c, rng=rng)
    row = rng.normal(size=(1, 16, c.hidden_size)).astype("float32")
    x = np.concatenate([row, rng.normal(size=(3, 16, c.hidden_size)).astype("float32"), row, row])
    out = np.asarray(moe(x, training=True))
    perm = np.array([5, 2, 0, 3, 1, 4])
    permuted = np.asarray(moe(x[perm], training=True))
    np.testing.assert_allclose(permuted, out[perm], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out[4], out[0], rtol=1e-6)  # identical rows agree
    np.testing.assert_allclose(out[5], out[0], rtol=1e-6)
    assert moe.get_expert_utilization()["dropped_fraction"] == 0.0


def _padded(x, pads, rng):
    """Left-pads each row with `pads` garbage tokens; returns (x, padding_mask)."""
    b, s, h = x.shape
    garbage = rng.normal(scale=5.0, size=(b, pads, h)).astype("float32")
    mask = np.concatenate([np.zeros((b, pads)), np.ones((b, s))], axis=1).astype("int32")
    return np.concatenate([garbage, x], axis=1), mask


def test_pads_change_neither_loads_nor_balance_loss(rng):
    c = get_preset("tiny", n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                   seq_aux_loss_alpha=0.1)
    moe = _moe(c, rng=rng)
    x = rng.normal(size=(3, 10, c.hidden_size)).astype("float32")
    out = np.asarray(moe(x, training=True))
    loss, load = float(moe.losses[0]), np.asarray(moe.expert_load)
    assert float(moe.tokens_seen) == 30
    moe.reset_expert_counts()
    xp, mask = _padded(x, 6, rng)
    out_p = np.asarray(moe(xp, training=True, padding_mask=mask))
    np.testing.assert_allclose(out_p[:, 6:], out, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(moe.expert_load), load)
    assert float(moe.tokens_seen) == 30
    assert float(moe.losses[0]) == pytest.approx(loss, rel=1e-5)


def test_capacity_drops_the_lowest_scores_and_pads_take_none(rng):
    c = get_preset("tiny", n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=1,
                   expert_capacity_factor=1.0, norm_topk_prob=False)
    moe = _moe(c)
    weight = np.zeros((c.hidden_size, 4), "float32")
    weight[0, 0] = 1.0  # every token with feature 0 > 0 prefers expert 0, by that feature
    moe.gate.weight.assign(weight)
    x = np.zeros((2, 16, c.hidden_size), "float32")
    x[..., 0] = rng.uniform(0.5, 3.0, size=(2, 16))
    x[..., 1:] = rng.normal(scale=0.1, size=(2, 16, c.hidden_size - 1))
    _, mask = _padded(x, 0, rng)
    moe(x, training=True)
    # 32 tokens on expert 0, capacity ceil(32 / 4) = 8: the 8 highest scores stay.
    assert float(moe.dropped_tokens) == 24
    out = np.asarray(moe(x, training=True))[..., :]
    shared = np.asarray(moe.shared_experts(x.reshape(-1, c.hidden_size))).reshape(out.shape)
    routed = np.abs(out - shared).max(-1).ravel() > 0
    top8 = np.argsort(-x[..., 0].ravel())[:8]
    assert set(np.flatnonzero(routed)) == set(top8)
    moe.reset_expert_counts()
    xp, mask = _padded(x, 8, rng)
    xp[:, :8, 0] = 10.0  # pads would win every slot if they competed
    out_p = np.asarray(moe(xp, training=True, padding_mask=mask))
    assert float(moe.dropped_tokens) == 24
    np.testing.assert_allclose(out_p[:, 8:], out, rtol=1e-5, atol=1e-7)
    moe.reset_expert_counts()
    moe(x, training=False)
    assert moe.get_expert_utilization()["dropped_fraction"] == 0.0  # inference is dropless


def test_forward_never_moves_the_bias_and_update_steps_by_gamma(rng):
    c = get_preset("tiny", n_routed_experts=8, n_group=1, topk_group=1, bias_update_speed=0.01)
    moe = _moe(c, rng=rng)
    start = rng.normal(scale=0.1, size=8).astype("float32")
    moe.gate.e_score_correction_bias.assign(start)
    moe(rng.normal(size=(2, 16, c.hidden_size)).astype("float32"), training=True)
    np.testing.assert_array_equal(np.asarray(moe.gate.e_score_correction_bias), start)
    load = np.array([10, 0, 4, 4, 4, 8, 1, 1], "float32")  # mean 4
    moe.apply_bias_update(load)
    step = np.asarray(moe.gate.e_score_correction_bias) - start
    np.testing.assert_allclose(step, 0.01 * np.sign(4 - load), atol=1e-7)
    assert set(np.round(step / 0.01).astype(int)) == {-1, 0, 1}
    np.testing.assert_allclose(np.asarray(router_bias_update(start, load, 0.5)),
                               start + 0.5 * np.sign(4 - load), rtol=1e-6)


def test_aux_loss_free_bias_balances_a_skewed_router(rng):
    c = get_preset("tiny", n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2,
                   bias_update_speed=0.01)
    moe = _moe(c)
    skew = rng.normal(size=(c.hidden_size, 8)).astype("float32") * 0.3
    skew[:, :2] += 0.6  # experts 0 and 1 start out favoured
    moe.gate.weight.assign(skew)
    x = np.abs(rng.normal(size=(4, 32, c.hidden_size))).astype("float32")
    moe(x, training=False)
    before = moe.get_expert_utilization()
    for _ in range(150):  # one optimizer step each: forward, then the trainer's update
        moe.reset_expert_counts()
        moe(x, training=True)
        moe.apply_bias_update(moe.expert_load)
    moe.reset_expert_counts()
    moe(x, training=False)
    after = moe.get_expert_utilization()
    assert before["cv"] > 0.5
    assert after["cv"] < before["cv"] / 3, (before["cv"], after["cv"])
    assert after["max_min_ratio"] < 2.0
    bias = np.array(after["bias"])
    assert bias[:2].max() < bias[2:].min()  # the favoured experts were pushed down


def _numpy_sequence_loss(scores, k, alpha, lengths):
    """Paper eqs. 17-20 per sequence, straight from the definitions."""
    losses = []
    for s in scores:  # s: [T, E] affinities of one sequence's real tokens
        t_len, e = s.shape
        top = np.argsort(-s, axis=1)[:, :k]
        f = np.array([(top == i).any(axis=1).sum() for i in range(e)]) * e / (k * t_len)
        p = (s / s.sum(axis=1, keepdims=True)).mean(axis=0)
        losses.append(alpha * (f * p).sum())
    return float(np.mean(losses))


def test_sequence_loss_matches_numpy_eqs_17_to_20(rng):
    c = get_preset("tiny", n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2,
                   seq_aux_loss_alpha=0.3)
    moe = _moe(c, rng=rng)
    # A bias that changes the routed (group-limited) choice must not change f_i.
    moe.gate.e_score_correction_bias.assign(rng.normal(scale=0.5, size=8).astype("float32"))
    x = rng.normal(size=(3, 12, c.hidden_size)).astype("float32")
    xp, mask = _padded(x, 4, rng)
    mask[1, 4:7] = 0  # a longer pad run in one sequence
    moe(xp, training=True, padding_mask=mask)
    _, _, scores = moe.gate(xp.reshape(-1, c.hidden_size))
    scores = np.asarray(scores).reshape(3, 16, 8)
    per_seq = [scores[b][mask[b] > 0] for b in range(3)]
    expected = _numpy_sequence_loss(per_seq, 2, 0.3, None)
    assert float(moe.losses[0]) == pytest.approx(expected, rel=1e-5)


def test_uniform_routing_gives_alpha(rng):
    c = get_preset("tiny", n_routed_experts=8, n_group=1, topk_group=1, seq_aux_loss_alpha=0.25)
    moe = _moe(c)
    moe.gate.weight.assign(np.zeros(moe.gate.weight.shape, "float32"))
    moe(rng.normal(size=(2, 8, c.hidden_size)).astype("float32"), training=True)
    assert float(moe.losses[0]) == pytest.approx(0.25, rel=1e-6)


def test_sequence_aux_loss_is_added_only_when_enabled(rng):
    x = rng.normal(size=(2, 8, 32)).astype("float32")
    with_loss = _moe(get_preset("tiny", seq_aux_loss_alpha=0.01))
    with_loss(x, training=True)
    assert len(with_loss.losses) == 1 and float(with_loss.losses[0]) > 0
    without = _moe(get_preset("tiny"))
    without(x, training=True)
    assert len(without.losses) == 0


@pytest.mark.parametrize("case", ["balanced", "overflow", "pads"])
def test_expert_buckets_equal_the_tile_loop_and_the_dense_reference(rng, monkeypatch, case):
    """model/expert_buckets.py: the same outputs and gradients as the tile
    loop alone and every-expert-on-every-token, whether every assignment
    fits its expert's bucket, two experts overflow theirs (the rest through
    the loop), or pads are in the batch."""
    from model import expert_buckets
    from model.grouped_matmul import use_fused_swiglu

    if not use_fused_swiglu():
        pytest.skip("the buckets run where the JAX tile loop runs (one CPU device)")
    c = get_preset("tiny", n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    moe = _moe(c, rng=rng)
    tokens = 128
    capacity = expert_buckets.bucket_rows(tokens * 2, 4)
    assert capacity == 80  # 1.25 x the mean of 64, a multiple of 8
    if case == "overflow":  # experts 0 and 1 take every token: 128 > 80 rows each
        moe.gate.e_score_correction_bias.assign(np.array([2.0, 2.0, 0.0, 0.0], "float32"))
    x = rng.normal(size=(2, tokens // 2, c.hidden_size)).astype("float32")
    mask = np.ones((2, tokens // 2), "int32")
    if case == "pads":
        mask[0, :9] = mask[1, :30] = 0
    calls = []
    wrapped = expert_buckets.bucketed_experts
    monkeypatch.setattr("model.moe.bucketed_experts", lambda *a: calls.append(a[8]) or wrapped(*a))

    def layer(t):
        return ops.reshape(moe(ops.reshape(t, x.shape), training=True, padding_mask=mask), (tokens, -1))

    variables = [moe.experts_gate_proj, moe.experts_up_proj, moe.experts_down_proj, moe.gate.weight,
                 moe.gate.e_score_correction_bias]
    flat = x.reshape(tokens, -1)
    moe(x, training=True, padding_mask=mask)
    load = np.asarray(moe.expert_load)
    assert (load.max() > capacity) == (case == "overflow"), load
    buckets = _value_and_grads(layer, variables[:4], flat)
    assert calls == [capacity] * 2
    monkeypatch.setattr(expert_buckets, "EXPERT_BUCKETS", [False])
    loop = _value_and_grads(layer, variables[:4], flat)
    assert calls == [capacity] * 2  # the loop alone this time
    for a, b in zip(buckets, loop):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    if case != "pads":
        np.testing.assert_allclose(np.asarray(layer(flat)), np.asarray(_dense_keras(moe, flat)),
                                   rtol=1e-4, atol=1e-6)
        dense = _value_and_grads(lambda t: _dense_keras(moe, t), variables[:4], flat)
        for a, b in zip(buckets, dense):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bucket_rows_leave_small_layers_to_the_tile_loop():
    from model.expert_buckets import bucket_rows

    assert bucket_rows(4096, 16) == 320 and bucket_rows(2048, 64) == 40
    assert bucket_rows(4096, 16) % 8 == 0 and bucket_rows(100, 2) <= 100
    assert bucket_rows(32 * 64 - 1, 64) is None  # fewer than 32 rows per expert
    assert bucket_rows(8, 64) is None  # decoding a few tokens
