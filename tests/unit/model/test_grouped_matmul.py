"""The grouped expert matmul (model/grouped_matmul.py): values and gradients
against a per-row reference, on either backend; under JAX also with the
expert weights sharded over devices."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

from model.grouped_matmul import grouped_matmul

pytestmark = [pytest.mark.unit, pytest.mark.model]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _reference(x, w, group_sizes):
    """Row r times the weights of the group it falls in; rows past the groups: 0."""
    expert = np.repeat(np.arange(len(group_sizes)), group_sizes)
    out = np.zeros((x.shape[0], w.shape[2]), "float32")
    out[:len(expert)] = np.einsum("nd,ndo->no", x[:len(expert)], w[expert])
    return out


def _grads(fn, x, w, probe):
    """d sum(fn(x, w) * probe) / d (x, w)."""
    if keras.backend.backend() == "jax":
        import jax

        return [np.asarray(g) for g in jax.grad(lambda a, b: ops.sum(fn(a, b) * probe),
                                                 argnums=(0, 1))(x, w)]
    import tensorflow as tf

    xt, wt = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        loss = ops.sum(fn(xt, wt) * probe)
    return [np.asarray(tf.convert_to_tensor(g)) for g in tape.gradient(loss, [xt, wt])]


@pytest.mark.parametrize("rows,groups,block,left_out", [
    (40, [5, 0, 17, 3, 0, 9, 6, 0], 4, 0),   # empty groups, ragged tails
    (40, [5, 0, 17, 3, 0, 9, 2, 0], 8, 4),   # the last 4 rows are in no group
    (7, [3, 4], 64, 0),                       # fewer rows than a block
    (33, [0] * 6 + [33], 16, 0),              # one group holds everything
    (12, [0, 0, 0], 4, 12),                   # nothing routed
    (600, [300, 0, 290], 64, 10),             # long groups: JAX takes the gathered tiles
])
def test_grouped_matmul_equals_per_row_reference(rng, rows, groups, block, left_out):
    assert sum(groups) + left_out == rows
    x = rng.normal(size=(rows, 6)).astype("float32")
    w = rng.normal(size=(len(groups), 6, 5)).astype("float32")
    sizes = np.array(groups, "int32")
    fn = lambda a, b: grouped_matmul(a, b, sizes, block)  # noqa: E731
    np.testing.assert_allclose(np.asarray(fn(x, w)), _reference(x, w, sizes), rtol=1e-5, atol=1e-5)
    probe = rng.normal(size=(rows, 5)).astype("float32")
    ours = _grads(fn, x, w, probe)
    expert = np.repeat(np.arange(len(groups)), sizes)
    n = len(expert)
    dx = np.zeros_like(x)
    dx[:n] = np.einsum("no,ndo->nd", probe[:n], w[expert])
    dw = np.zeros_like(w)
    np.add.at(dw, expert, np.einsum("nd,no->ndo", x[:n], probe[:n]))
    np.testing.assert_allclose(ours[0], dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1], dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [4, 64])
def test_groups_in_any_order_with_skipped_rows(rng, block):
    """group_expert: chunks of rows, each sorted by expert and padded, as
    the expert-parallel dispatch receives them (weight -1: padding, zeros)."""
    sizes = np.array([3, 0, 2, 5, 4, 1, 0, 3, 6, 2], "int32")
    group_expert = np.array([0, 1, -1, 0, 1, -1, 0, 1, -1, 2], "int32")
    rows = int(sizes.sum()) + 2  # and two rows past every group
    x = rng.normal(size=(rows, 6)).astype("float32")
    w = rng.normal(size=(3, 6, 5)).astype("float32")
    weight = np.repeat(group_expert, sizes)
    real = np.flatnonzero(weight >= 0)
    fn = lambda a, b: grouped_matmul(a, b, sizes, block, group_expert)  # noqa: E731
    expected = np.zeros((rows, 5), "float32")
    expected[real] = np.einsum("nd,ndo->no", x[real], w[weight[real]])
    np.testing.assert_allclose(np.asarray(fn(x, w)), expected, rtol=1e-5, atol=1e-5)
    probe = rng.normal(size=(rows, 5)).astype("float32")
    dx = np.zeros_like(x)
    dx[real] = np.einsum("no,ndo->nd", probe[real], w[weight[real]])
    dw = np.zeros_like(w)
    np.add.at(dw, weight[real], np.einsum("nd,no->ndo", x[real], probe[real]))
    ours = _grads(fn, x, w, probe)
    np.testing.assert_allclose(ours[0], dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1], dw, rtol=1e-5, atol=1e-5)


_SHARDED = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp, keras
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from model import get_preset
    from model.moe import DeepSeekMoE

    assert jax.device_count() == 8, jax.devices()
    c = get_preset("tiny", n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    keras.utils.set_random_seed(0)
    moe = DeepSeekMoE(c)
    moe.build((None, None, c.hidden_size))
    rng = np.random.default_rng(0)
    moe.gate.weight.assign(rng.normal(scale=0.3, size=moe.gate.weight.shape).astype("float32"))
    x = rng.normal(size=(2, 40, c.hidden_size)).astype("float32")
    names = [v.path for v in moe.trainable_variables]
    nv = [v.value for v in moe.non_trainable_variables]

    def loss(tv, x):
        y, _ = moe.stateless_call(tv, nv, x, training=True)
        return jnp.sum(y * jnp.cos(x)), y

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    plain = [np.asarray(v.value) for v in moe.trainable_variables]
    (l0, y0), g0 = step(plain, x)
    mesh = Mesh(np.array(jax.devices()[:4]), ("expert",))
    sharded = [jax.device_put(v, NamedSharding(mesh, P("expert")) if "experts_" in n
                              else NamedSharding(mesh, P()))
               for v, n in zip(plain, names)]
    assert sum("experts_" in n for n in names) == 3
    assert all(len(v.sharding.device_set) == 4 for v in sharded)
    (l1, y1), g1 = step(sharded, jax.device_put(x, NamedSharding(mesh, P())))
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-6)
    for n, a, b in zip(names, g0, g1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=n)
        assert np.abs(np.asarray(a)).max() > 0, n
    print("sharded ok")
""")


def test_sharded_expert_weights_give_the_unsharded_result():
    """Expert weights [E, ...] sharded on axis 0 over 4 of 8 CPU devices (as
    the training engine shards them): the while-loop kernel and its custom
    VJP give the same outputs and gradients as unsharded."""
    if keras.backend.backend() != "jax":
        pytest.skip("expert sharding is a JAX (training engine) feature")
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "sharded ok" in proc.stdout, proc.stderr[-3000:]


def _swiglu_reference(x, wg, wu, wd, weight, probe):
    """Per row r of expert weight[r] (< 0: zeros): y = silu(x Wg) * (x Wu) Wd,
    and the gradients of sum(y * probe) by x, Wg, Wu, Wd, in numpy."""
    real = np.flatnonzero(weight >= 0)
    e = weight[real]
    xr = x[real].astype("float64")
    a = np.einsum("nd,ndi->ni", xr, wg[e])
    b = np.einsum("nd,ndi->ni", xr, wu[e])
    sig = 1 / (1 + np.exp(-a))
    h = a * sig * b
    y = np.zeros((x.shape[0], wd.shape[2]))
    y[real] = np.einsum("ni,nid->nd", h, wd[e])
    dy = probe[real].astype("float64")
    dh = np.einsum("nd,nid->ni", dy, wd[e])
    db = dh * a * sig
    da = dh * b * sig * (1 + a * (1 - sig))
    dx = np.zeros(x.shape)
    dx[real] = np.einsum("ni,ndi->nd", da, wg[e]) + np.einsum("ni,ndi->nd", db, wu[e])
    grads = [dx] + [np.zeros(w.shape) for w in (wg, wu, wd)]
    np.add.at(grads[1], e, np.einsum("nd,ni->ndi", xr, da))
    np.add.at(grads[2], e, np.einsum("nd,ni->ndi", xr, db))
    np.add.at(grads[3], e, np.einsum("ni,nd->nid", h, dy))
    return y, grads


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", ["by_expert", "chunks"])
def test_grouped_swiglu_equals_per_row_reference(rng, fused, case):
    """The experts' SwiGLU on rows grouped by expert (MoE: one group per
    expert; expert-parallel chunks: groups in any order, -1 = padding):
    values and all four gradients. Fused: the tile loop under JAX on one
    device, the gathered-tiles SwiGLU elsewhere (TensorFlow); else three
    grouped matmuls. All must agree with the reference."""
    import model.grouped_matmul as gm
    from model.moe import grouped_swiglu

    if case == "by_expert":
        sizes, group_expert = np.array([5, 0, 17, 3, 9, 6], "int32"), None
        weight = np.repeat(np.arange(6), sizes)
    else:
        sizes = np.array([3, 0, 2, 5, 4, 1, 0, 3, 6, 2], "int32")
        group_expert = np.array([0, 1, -1, 0, 1, -1, 0, 5, -1, 2], "int32")
        weight = np.repeat(group_expert, sizes)
    rows = len(weight) + 3  # rows past every group get zeros
    weight = np.concatenate([weight, -np.ones(3, int)])
    x = rng.normal(size=(rows, 8)).astype("float32")
    wg, wu = (rng.normal(scale=0.5, size=(6, 8, 4)).astype("float32") for _ in range(2))
    wd = rng.normal(scale=0.5, size=(6, 4, 8)).astype("float32")
    probe = rng.normal(size=(rows, 8)).astype("float32")
    expected, expected_grads = _swiglu_reference(x, wg, wu, wd, weight, probe)
    previous = gm.FUSED_SWIGLU[0]
    gm.FUSED_SWIGLU[0] = fused
    try:
        if keras.backend.backend() == "jax":
            import jax

            if jax.device_count() == 1:
                assert gm.use_fused_swiglu() == fused
            fn = lambda *a: grouped_swiglu(a[0], sizes, *a[1:], group_expert=group_expert)  # noqa: E731
            y = fn(x, wg, wu, wd)
            grads = jax.grad(lambda *a: ops.sum(fn(*a) * probe), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
        else:
            import tensorflow as tf

            args = [tf.constant(a) for a in (x, wg, wu, wd)]
            with tf.GradientTape() as tape:
                tape.watch(args)
                y = grouped_swiglu(args[0], sizes, *args[1:], group_expert=group_expert)
                loss = ops.sum(y * probe)
            grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, args)]
    finally:
        gm.FUSED_SWIGLU[0] = previous
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-5)
    for name, got, want in zip(("x", "gate", "up", "down"), grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5, err_msg=name)
