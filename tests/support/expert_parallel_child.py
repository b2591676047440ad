"""Child process of tests/integration/test_expert_parallel.py (8 virtual CPU
devices, KERAS_BACKEND=jax): one DeepSeekMoE layer's training forward and
backward on a padded batch, through training.expert_parallel on several
meshes and capacities and through the layer's own single-device code, and
a dense reference (every expert on every token, masked by the routing).

    python -m tests.support.expert_parallel_child OUT.npz
"""

from __future__ import annotations

import sys

import numpy as np

BATCH, SEQ = 8, 12
MESHES = ((8, 1), (2, 4), (1, 8))


def _config():
    from model import get_preset

    return get_preset("tiny", n_routed_experts=8, seq_aux_loss_alpha=0.01,
                      routed_scaling_factor=2.5)


def _layer(config, rng):
    from model.moe import DeepSeekMoE

    layer = DeepSeekMoE(config)
    layer.build((None, None, config.hidden_size))
    layer.gate.weight.assign(rng.normal(scale=0.3, size=layer.gate.weight.shape).astype("float32"))
    return layer


def _dense_routed(layer, x, valid):
    """Every expert on every token; each token keeps its routed experts'
    outputs. -> (output, the sequence-wise balance loss)."""
    from keras import ops

    from model.moe import sequence_aux_terms

    c = layer.config
    flat = ops.reshape(x, (-1, c.hidden_size))
    idx, w, scores = layer.gate(flat)
    per_sequence, has_tokens = sequence_aux_terms(c, scores, ops.reshape(valid, (-1,)),
                                                  *ops.shape(valid))
    aux = c.seq_aux_loss_alpha * ops.sum(per_sequence) / ops.sum(has_tokens)
    combine = ops.sum(ops.one_hot(idx, c.n_routed_experts) * w[..., None], axis=1)
    combine = combine * ops.cast(ops.reshape(valid, (-1, 1)), "float32")
    gate = ops.einsum("th,ehi->eti", flat, layer.experts_gate_proj)
    up = ops.einsum("th,ehi->eti", flat, layer.experts_up_proj)
    out = ops.einsum("eti,eih->eth", ops.silu(gate) * up, layer.experts_down_proj)
    routed = ops.einsum("te,eth->th", combine, out)
    if layer.shared_experts is not None:
        routed = routed + layer.shared_experts(flat)
    return ops.reshape(routed, ops.shape(x)), aux


def _run(layer, x, mask, probe, dispatch=None, dense=False):
    """-> dict of the loss, output, gradients (x, experts, router), expert
    load, real tokens and extra all-to-all rounds of one training call."""
    import jax
    import keras
    from keras import ops

    stats = [layer.expert_load, layer.dropped_tokens, layer.tokens_seen]
    trainable = [layer.experts_gate_proj, layer.experts_up_proj, layer.experts_down_proj,
                 layer.gate.weight]
    fixed = [v for v in layer.weights if all(v is not t for t in trainable + stats)]
    layer.expert_dispatch = dispatch

    def loss(values, x):
        mapping = list(zip(trainable, values)) + [(v, v.value) for v in fixed] + [
            (v, ops.zeros(v.shape, v.dtype)) for v in stats]
        if dispatch is not None:
            dispatch.start()
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            if dense:
                out, aux = _dense_routed(layer, x, mask)
            else:
                out, aux = layer(x, training=True, padding_mask=mask), sum(scope.losses)
            total = ops.sum(out * probe) + aux
            load = scope.get_current_value(layer.expert_load)
            tokens = scope.get_current_value(layer.tokens_seen)
        flags = dispatch.collect() if dispatch is not None else []
        return total, (out, load, tokens, sum(flags) if flags else jax.numpy.int32(-1))

    try:
        (total, (out, load, tokens, overflow)), (g_values, g_x) = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
                [v.value for v in trainable], ops.convert_to_tensor(x))
    finally:
        layer.expert_dispatch = None
    result = {"loss": total, "out": out, "grad_x": g_x, "load": load, "tokens": tokens,
              "overflow": overflow}
    for name, g in zip(("grad_gate_proj", "grad_up_proj", "grad_down_proj", "grad_router"),
                       g_values):
        result[name] = g
    return {k: np.asarray(v) for k, v in result.items()}


def _mesh(batch, expert):
    import jax

    devices = np.asarray(jax.devices()[:batch * expert]).reshape(batch, expert)
    return jax.sharding.Mesh(devices, ("batch", "expert"))


def _most_to_one_device(layer, x, mask, shards):
    """Largest number of assignments any device sends to one expert shard."""
    c = layer.config
    flat = np.asarray(x).reshape(-1, c.hidden_size)
    idx = np.asarray(layer.gate(flat)[0]).reshape(8, -1, c.num_experts_per_tok)  # per device
    real = np.asarray(mask).reshape(8, -1, 1).astype(bool)
    dest = idx // (c.n_routed_experts // shards)
    return max(int(np.sum((dest[d] == s) & real[d])) for d in range(8) for s in range(shards))


def main(out_path: str) -> int:
    from training.expert_parallel import ExpertDispatch

    rng = np.random.default_rng(0)
    config = _config()
    layer = _layer(config, rng)
    x = rng.normal(size=(BATCH, SEQ, config.hidden_size)).astype("float32")
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[::3, :4] = 0  # left padding on some rows
    probe = rng.normal(size=x.shape).astype("float32")
    results = {"reference": _run(layer, x, mask, probe),
               "dense": _run(layer, x, mask, probe, dense=True)}
    for batch, expert in MESHES:
        results[f"mesh_{batch}x{expert}"] = _run(layer, x, mask, probe,
                                                 ExpertDispatch(_mesh(batch, expert), 1.5))
    # The backward keeping the first round's activations instead of recomputing.
    results["mesh_2x4_kept"] = _run(layer, x, mask, probe,
                                    ExpertDispatch(_mesh(2, 4), 1.5, recompute=False))
    # 2 x 4: a capacity exactly at the largest need (no overflow) and one row short.
    need = _most_to_one_device(layer, x, mask, 4)
    even = SEQ * config.num_experts_per_tok / 4
    for name, rows, recompute in (("at_capacity", need, True), ("over_capacity", need - 1, True),
                                  ("over_capacity_kept", need - 1, False)):
        results[name] = _run(layer, x, mask, probe,
                             ExpertDispatch(_mesh(2, 4), (rows - 0.5) / even, recompute))
        results[name]["capacity_rows"] = np.asarray(rows)
    # Every token's choices forced onto experts 0 and 1 (the first device of
    # each expert group): the bias only steers the selection.
    bias = np.zeros(config.n_routed_experts, np.float32)
    bias[:2] = 10.0
    layer.gate.e_score_correction_bias.assign(bias)
    results["forced_reference"] = _run(layer, x, mask, probe)
    results["forced_ep4"] = _run(layer, x, mask, probe, ExpertDispatch(_mesh(2, 4), 1.5))
    results["forced_ep4_kept"] = _run(layer, x, mask, probe,
                                      ExpertDispatch(_mesh(2, 4), 1.5, recompute=False))
    np.savez(out_path, **{f"{case}/{k}": v for case, r in results.items() for k, v in r.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
