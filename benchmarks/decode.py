"""Per-token decode throughput of the whole model with a filled KV cache:
naive MLA cache (per-head keys and values) against the absorbed latent cache.

Each timed call is one jitted `model.call_with_cache` step for `batch` new
tokens attending a cache of `context` slots (the naive cache in its
[B, H, T, D] layout, the fast one on XLA:CPU; `naive_layout_probe` times the
old [B, T, H, D] layout against it) (the caches are donated under
JAX, so the step updates them in place). The cache is filled with random
values: a step's cost does not depend on what the cache holds, and the
attention spans every slot of it."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from . import common
from .configs import SIZES, decode_config

TARGET_SPEEDUP_AT_4K = 3.0


def _step(model, token, positions, caches, index, key_mask):
    return model.call_with_cache(token, positions, caches, index, key_mask)


def _filled_caches(model, batch, context, mode, rng):
    from keras import ops

    caches = model.init_caches(batch, context, mode=mode, dtype="float32")
    return [tuple(ops.convert_to_tensor(rng.standard_normal(tuple(ops.shape(t))).astype("float32"))
                  for t in cache) for cache in caches]


def _attend(_, q, k, v, layout):
    from keras import ops

    if layout == "bthd":
        scores = ops.einsum("bshd,bthd->bhst", q, k)
        return ops.einsum("bhst,bthd->bshd", ops.softmax(scores, axis=-1), v)
    scores = ops.einsum("bshd,bhtd->bhst", q, k)
    return ops.einsum("bhst,bhtd->bshd", ops.softmax(scores, axis=-1), v)


def layout_probe(config, batch, context, repeats):
    """The naive cache's attention alone, for one new token, with the cache
    laid out [B, T, H, D] (the old layout) or [B, H, T, D] (model/attention.py's):
    separates the cost of the layout from the cost of the cache size."""
    import keras
    from keras import ops

    rng = np.random.default_rng(1)
    h, qk, v_dim = config.num_attention_heads, config.qk_head_dim, config.v_head_dim
    q = ops.convert_to_tensor(rng.standard_normal((batch, 1, h, qk)).astype("float32"))
    out = {"context": context, "batch": batch}
    for layout in ("bthd", "bhtd"):
        shape_k = (batch, context, h, qk) if layout == "bthd" else (batch, h, context, qk)
        shape_v = (batch, context, h, v_dim) if layout == "bthd" else (batch, h, context, v_dim)
        k = ops.convert_to_tensor(rng.standard_normal(shape_k).astype("float32"))
        v = ops.convert_to_tensor(rng.standard_normal(shape_v).astype("float32"))
        fn = common.InferenceFn(keras.layers.Layer(), lambda m, *a, _l=layout: _attend(m, *a, _l))
        out[f"{layout}_ms"] = common.time_calls(lambda: fn(q, k, v), repeats=repeats,
                                                warmup=2)["median_ms"]
    return out


def run(mode: str) -> Dict[str, Any]:
    import keras
    from keras import ops

    from model import DeepSeekV3ForCausalLM
    from model.analysis import kv_cache_bytes

    sizes = SIZES[mode]
    config = decode_config(mode)
    keras.utils.set_random_seed(0)
    model = DeepSeekV3ForCausalLM(config)
    batch = sizes.decode_batch
    rng = np.random.default_rng(0)
    rows: List[Dict[str, Any]] = []
    for context in sizes.decode_contexts:
        row: Dict[str, Any] = {"context": context, "batch": batch}
        key_mask = ops.convert_to_tensor(np.ones((batch, context), dtype="int32"))
        token = ops.convert_to_tensor(rng.integers(0, config.vocab_size, (batch, 1)).astype("int32"))
        for cache_mode in ("naive", "absorbed"):
            caches = _filled_caches(model, batch, context, cache_mode, rng)
            row[f"{cache_mode}_cache_bytes"] = sum(common.nbytes(t) for c in caches for t in c)
            row[f"{cache_mode}_cache_bytes_analytic"] = kv_cache_bytes(
                config, "mla_naive" if cache_mode == "naive" else "mla_absorbed", batch, context, 4)
            step = common.InferenceFn(model, _step, donate=(2,))
            state = {"caches": caches, "i": 0}
            # Cycle the write position over the last slots, as a generation loop would.
            indices = [np.int32(context - 1 - k) for k in range(min(16, context))]

            def call():
                index = indices[state["i"] % len(indices)]
                state["i"] += 1
                positions = ops.convert_to_tensor(np.full((batch, 1), index, dtype="int32"))
                logits, state["caches"] = step(token, positions, state["caches"], index, key_mask)
                return logits

            timing = common.time_calls(call, repeats=sizes.decode_repeats, warmup=3,
                                       inner=sizes.decode_inner)
            row[f"{cache_mode}_step_ms"] = timing["median_ms"]
            row[f"{cache_mode}_tokens_per_s"] = batch * 1e3 / timing["median_ms"]
            row[f"{cache_mode}_timing"] = timing
            row[f"{cache_mode}_compilations"] = step.compilations()
            if cache_mode == "absorbed" and context == sizes.decode_contexts[0] and mode != "smoke":
                # What model.generate does today: call_with_cache run eagerly,
                # op by op, once per token.
                caches = state["caches"]
                index = np.int32(context - 1)
                positions = ops.convert_to_tensor(np.full((batch, 1), index, dtype="int32"))
                eager = common.time_calls(
                    lambda: model.call_with_cache(token, positions, caches, index, key_mask)[0],
                    repeats=3, warmup=1)
                row["absorbed_eager_step_ms"] = eager["median_ms"]
            state.clear()  # drop this mode's caches before the next mode fills its own
        row["absorbed_speedup"] = row["absorbed_tokens_per_s"] / row["naive_tokens_per_s"]
        row["absorbed_speedup_of_min_times"] = (row["naive_timing"]["min_ms"]
                                                / row["absorbed_timing"]["min_ms"])
        rows.append(row)
    largest = rows[-1]
    probe = None if mode == "smoke" else layout_probe(config, batch, largest["context"],
                                                      sizes.decode_repeats)
    return {
        "rows": rows,
        "naive_layout_probe": probe,
        "target": {"context": 4096, "absorbed_over_naive": TARGET_SPEEDUP_AT_4K,
                   "measured_context": largest["context"],
                   "measured": largest["absorbed_speedup"],
                   "met": (largest["context"] >= 4096
                           and largest["absorbed_speedup"] >= TARGET_SPEEDUP_AT_4K)},
        "config": {"model": config.to_dict(), "batch": batch, "cache_dtype": "float32",
                   "tokens_per_s": "batch x steps / time (one step = one new token per sequence)",
                   "timed": "jitted model.call_with_cache, 1 token per sequence, cache of "
                            "`context` slots filled, caches donated (JAX)"},
    }
