"""Training-step time of a DeepSeekMoE layer as the number of routed
experts grows at a fixed token count and top-k. The dropless grouped
(blocked) expert compute should make the cost depend on top_k, not on the
number of experts: the targets are step_ms(64 experts) <= 1.25 x step_ms(8)
and forward_inference_ms(64) <= 1.2 x forward_inference_ms(8); 256 experts
are in the sweep too (ratio_256_over_8_experts).

Under JAX step_ms times the engine's own step (`Engine.step_runner`: forward +
backward, AdamW with the warmup-cosine schedule and clipping, the router-bias
update) of a one-layer model whose one decoder layer is that MoE layer, with
the cheapest attention and vocabulary the config allows (benchmarks.configs.
moe_config) so the routed experts dominate. Under TensorFlow (the engine is
JAX-only) it times common.TrainStep (a bare AdamW) over the DeepSeekMoE layer
alone with an MSE loss. Each row says which in "step". The breakdown rows'
forward_ms / forward_inference_ms / optimizer_ms time the MoE layer alone
(under JAX the very layer the engine trained)."""

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


def _settings(sizes, batch: int, seq: int):
    """The engine's settings: its defaults (schedule, clipping, weight decay)
    at the old bare step's learning rate. train_steps covers every call
    time_calls makes (warmup included)."""
    from training.settings import TrainingSettings

    return TrainingSettings(batch_size=batch, seq_len=seq, train_steps=sizes.moe_repeats + 2,
                            learning_rate=1e-3)


def _numpy(value) -> np.ndarray:
    from keras import ops

    return np.asarray(ops.convert_to_numpy(value), np.float64)


def _engine_row(config, sizes, batch: int, seq: int) -> Dict[str, Any]:
    """The engine's own step on one fixed batch: its timing, compile time,
    dropped fraction (the engine's metric for the last timed step) and the
    model's MoE layer (its variables written back)."""
    from training.engine import Engine
    from training.metrics import expert_summary

    engine = Engine(config, _settings(sizes, batch, seq), log_fn=lambda line: None)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch, seq)).astype("int32")
    run, compile_s = engine.step_runner(ids)
    timing = common.time_calls(run, repeats=sizes.moe_repeats, warmup=2)
    # The step donates its state: the model's variables are valid again
    # only after this write-back.
    run.sync()
    (layer,) = engine.model.moe_layers()
    # The step zeroes load and dropped at its start, so the synced counters
    # are the last step's; expert_summary is the engine's own definition.
    summary = expert_summary(_numpy(layer.expert_load), float(_numpy(layer.dropped_tokens)),
                             _numpy(layer.gate.e_score_correction_bias))
    return {"timing": timing, "compile_ms": compile_s * 1e3, "layer": layer,
            "dropped_fraction": summary["dropped_fraction"], "policy": engine.policy,
            # Compiled ahead of time once (lower().compile()): a call with
            # another signature would fail, never retrace.
            "compilations": 1}


def _train_step_row(config, sizes, x, target) -> Dict[str, Any]:
    """TensorFlow: common.TrainStep (bare AdamW, MSE loss) over the layer alone."""
    import keras

    from model.moe import DeepSeekMoE

    keras.utils.set_random_seed(0)
    layer = DeepSeekMoE(config, name="moe")
    layer.build((None, None, config.hidden_size))
    step = common.TrainStep(layer, keras.optimizers.AdamW(1e-3), _loss)
    timing = common.time_calls(lambda: step(x, target), repeats=sizes.moe_repeats, warmup=2)
    step.sync_to_module()
    # TrainStep compiles inside its first call: timing["first_call_ms"]
    # holds compile + one step, there is no separate compile time.
    return {"timing": timing, "compile_ms": None, "layer": layer,
            "dropped_fraction": layer.get_expert_utilization()["dropped_fraction"],
            "compilations": step.compilations()}


def run(mode: str) -> Dict[str, Any]:
    import keras
    from keras import ops

    from model.moe import block_rows

    sizes = SIZES[mode]
    tokens, hidden = sizes.moe_tokens, sizes.moe_hidden
    seq = min(256, tokens)
    batch = tokens // seq
    engine = common.backend() == "jax"  # the engine is JAX-only
    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.standard_normal((batch, seq, hidden)).astype("float32"))
    target = ops.convert_to_tensor(rng.standard_normal((batch, seq, hidden)).astype("float32"))
    rows: List[Dict[str, Any]] = []
    # The engine picks its own policy (precision "auto"); TF runs in the global one.
    policy = keras.config.dtype_policy().name
    for experts in sizes.moe_experts:
        for top_k in sizes.moe_top_k:
            if top_k > experts:
                continue
            config = moe_config(experts, top_k, hidden, sizes.moe_expert_dim)
            if engine:
                got = _engine_row(config, sizes, batch, seq)
                policy = got["policy"]
            else:
                got = _train_step_row(config, sizes, x, target)
            layer, timing = got["layer"], got["timing"]
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
                "step": "training.engine" if engine else "common.TrainStep",
                "timing": timing, "compile_ms": got["compile_ms"],
                "compilations": got["compilations"],
                "capacity_per_expert": None if capacity is None else int(capacity),
                # Rows the grouped compute runs: T*K + E*(block-1) bound when
                # dropless, E*C with a capacity.
                "dispatch_slots": rows_bound if capacity is None else int(capacity) * experts,
                "dropped_fraction": got["dropped_fraction"],
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

    settings = _settings(sizes, batch, seq)
    ratios = ratios_to(64 if 64 in sizes.moe_experts else max(sizes.moe_experts))
    return {
        "rows": rows,
        "ratio_max_over_8_experts": ratios,
        "ratio_256_over_8_experts": ratios_to(256) if 256 in sizes.moe_experts else {},
        "config": {"tokens": tokens, "batch": batch, "seq_len": seq, "hidden": hidden,
                   "expert_dim": sizes.moe_expert_dim,
                   "optimizer": (f"the engine's AdamW({settings.learning_rate}, "
                                 f"wd={settings.weight_decay}): warmup-cosine schedule "
                                 f"({settings.warmup_steps} warmup steps), global-norm clip "
                                 f"{settings.grad_clip_norm}, router-bias update"
                                 if engine else "AdamW(1e-3)"),
                   "step": "training.engine" if engine else "common.TrainStep",
                   "policy": policy,
                   # No shared expert (n_shared_experts=0 is valid), no group limit.
                   "layer": moe_config(8, 2, hidden, sizes.moe_expert_dim).to_dict(),
                   "timed": (
                       "step_ms: the training engine's own jitted step (training.engine "
                       "Engine.step_runner: forward + backward + AdamW with schedule and clipping "
                       "+ router-bias update) of a 1-layer model whose decoder layer is this "
                       "DeepSeekMoE (training=True: dropless grouped expert compute) under "
                       "next-token cross-entropy; attention is 1 head with head dims 4, vocab 64, "
                       "no MTP, so the routed experts dominate. forward_ms / forward_inference_ms "
                       "/ optimizer_ms: the MoE layer alone (that same layer)"
                       if engine else
                       "step_ms: common.TrainStep (jitted forward + backward + bare AdamW, no "
                       "schedule, clipping or router-bias update) of one DeepSeekMoE layer alone "
                       "(training=True: dropless grouped expert compute), MSE loss; the engine "
                       "is JAX-only")},
    }
