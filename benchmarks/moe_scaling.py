"""Training-step time of one DeepSeekMoE layer as the number of routed
experts grows at a fixed token count and top-k. The dropless grouped
(blocked) expert compute should make the cost depend on top_k, not on the
number of experts: the targets are step_ms(64 experts) <= 1.25 x step_ms(8)
and forward_inference_ms(64) <= 1.2 x forward_inference_ms(8); 256 experts
are in the sweep too (ratio_256_over_8_experts)."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from . import common
from .configs import SIZES, moe_config

TARGET_RATIO = 1.25


def _loss(layer, x, target):
    from keras import ops

    out = layer(x, training=True)
    return ops.mean(ops.square(ops.cast(out, "float32") - target))


def _forward(layer, x):
    return layer(x, training=True)


def _forward_inference(layer, x):
    return layer(x, training=False)


def _optimizer_ms(layer, repeats):
    """One jitted AdamW update of the layer's variables alone (fixed gradients)."""
    import keras
    from keras import ops

    optimizer = keras.optimizers.AdamW(1e-3)
    variables = layer.trainable_variables
    optimizer.build(variables)
    grads = [ops.ones(v.shape, v.dtype) * 1e-3 for v in variables]
    if common.backend() == "jax":
        import jax

        apply = jax.jit(optimizer.stateless_apply)
        state = {"opt": [v.value for v in optimizer.variables], "vars": [v.value for v in variables]}

        def call():
            state["vars"], state["opt"] = apply(state["opt"], grads, state["vars"])
            return state["vars"]
    else:
        import tensorflow as tf

        fn = tf.function(lambda: optimizer.apply(grads, variables) or 0, jit_compile=True)

        def call():
            return fn()
    return common.time_calls(call, repeats=repeats, warmup=2)


def run(mode: str) -> Dict[str, Any]:
    import keras
    from keras import ops

    from model.moe import DeepSeekMoE, block_rows

    sizes = SIZES[mode]
    tokens, hidden = sizes.moe_tokens, sizes.moe_hidden
    seq = min(256, tokens)
    batch = tokens // seq
    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.standard_normal((batch, seq, hidden)).astype("float32"))
    target = ops.convert_to_tensor(rng.standard_normal((batch, seq, hidden)).astype("float32"))
    rows: List[Dict[str, Any]] = []
    for experts in sizes.moe_experts:
        for top_k in sizes.moe_top_k:
            if top_k > experts:
                continue
            config = moe_config(experts, top_k, hidden, sizes.moe_expert_dim)
            keras.utils.set_random_seed(0)
            layer = DeepSeekMoE(config, name="moe")
            layer.build((None, None, hidden))
            step = common.TrainStep(layer, keras.optimizers.AdamW(1e-3), _loss)
            timing = common.time_calls(lambda: step(x, target), repeats=sizes.moe_repeats, warmup=2)
            step.sync_to_module()
            util = layer.get_expert_utilization()
            capacity = layer._capacity(tokens, True)  # None: dropless (the default)
            rows_bound = tokens * top_k + experts * (block_rows(tokens * top_k, experts) - 1)
            breakdown = {}
            if mode != "smoke" and experts in (8, 64, max(sizes.moe_experts)):
                forward = common.InferenceFn(layer, _forward)
                breakdown["forward_ms"] = common.time_calls(
                    lambda: forward(x), repeats=sizes.moe_repeats, warmup=2)["median_ms"]
                forward = common.InferenceFn(layer, _forward_inference)
                breakdown["forward_inference_ms"] = common.time_calls(
                    lambda: forward(x), repeats=sizes.moe_repeats, warmup=2)["median_ms"]
                breakdown["optimizer_ms"] = _optimizer_ms(layer, sizes.moe_repeats)["median_ms"]
            rows.append({
                **breakdown,
                "num_experts": experts, "top_k": top_k, "step_ms": timing["median_ms"],
                "timing": timing, "compilations": step.compilations(),
                "capacity_per_expert": None if capacity is None else int(capacity),
                # Rows the grouped compute runs: T*K + E*(block-1) bound when
                # dropless, E*C with a capacity.
                "dispatch_slots": rows_bound if capacity is None else int(capacity) * experts,
                "dropped_fraction": util["dropped_fraction"],
                "routed_params": 3 * experts * hidden * sizes.moe_expert_dim,
            })
    by_key = {(r["num_experts"], r["top_k"]): r["step_ms"] for r in rows}
    by_key_min = {(r["num_experts"], r["top_k"]): r["timing"]["min_ms"] for r in rows}

    def ratios_to(hi):
        ratios = {}
        for top_k in sizes.moe_top_k:
            lo = min(sizes.moe_experts)
            # 8 of 8 experts is the dense case: top_k 8 compares from 16.
            base = next((e for e in (8, 16) if e > top_k or e == 16), lo)
            base = base if (base, top_k) in by_key else lo
            if (base, top_k) in by_key and (hi, top_k) in by_key and hi != base:
                ratios[str(top_k)] = {
                    "experts": [base, hi],
                    "ratio": by_key[(hi, top_k)] / by_key[(base, top_k)],
                    "ratio_of_min_times": by_key_min[(hi, top_k)] / by_key_min[(base, top_k)],
                    "target": TARGET_RATIO,
                    "met": by_key[(hi, top_k)] / by_key[(base, top_k)] <= TARGET_RATIO,
                }
        return ratios

    ratios = ratios_to(64 if 64 in sizes.moe_experts else max(sizes.moe_experts))
    return {
        "rows": rows,
        "ratio_max_over_8_experts": ratios,
        "ratio_256_over_8_experts": ratios_to(256) if 256 in sizes.moe_experts else {},
        "config": {"tokens": tokens, "batch": batch, "seq_len": seq, "hidden": hidden,
                   "expert_dim": sizes.moe_expert_dim, "optimizer": "AdamW(1e-3)",
                   "layer": moe_config(8, 2, hidden, sizes.moe_expert_dim).to_dict(),
                   "timed": "jitted training step of one DeepSeekMoE layer (training=True: "
                            "dropless grouped expert compute), MSE loss"},
    }
