"""MLA (absorbed latent cache) against standard multi-head attention with the
same head count (MHA head dim = v_head_dim): KV-cache bytes measured on the
real cache tensors after one prefill, and the jitted prefill time."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from . import common
from .configs import SIZES, attention_config

# float32: the dtype init_cache defaults to. A bfloat16 cache keeps its dtype
# when passed in a CacheSlot, as the model passes it (see `_dtype_probe`).
CACHE_DTYPE = "float32"


def _prefill(layer, x, positions, mask, cache):
    return layer(x, positions, mask, cache=cache, cache_index=0)


def _forward(layer, x, positions, mask, mode):
    out, _ = layer(x, positions, mask, mode=mode)
    return out


def _cache_bytes(cache) -> int:
    return sum(common.nbytes(t) for t in cache)


def _dtype_probe(layer, hidden, seq_len=8):
    """Prefills a bfloat16 cache through the layer's __call__ and reports the
    dtype and bytes of what comes back. Keras casts floating-point call
    arguments to the layer's compute dtype, nested tuples included; the
    CacheSlot the model wraps each cache in is not traversed, so the
    bfloat16 cache survives."""
    import keras
    from keras import ops

    from model.attention import CacheSlot
    from model.deepseek_v3 import causal_mask

    x = ops.ones((1, seq_len, hidden), "float32")
    positions = ops.arange(seq_len, dtype="int32")[None]
    cache = layer.init_cache(1, seq_len, "bfloat16", mode="absorbed")
    _, new_cache = common.InferenceFn(
        layer, lambda l, *a: l(a[0], a[1], a[2], cache=CacheSlot(a[3]), cache_index=0))(
        x, positions, causal_mask(seq_len, seq_len), cache)
    return {
        "requested_dtype": "bfloat16",
        "init_dtypes": [keras.backend.standardize_dtype(t.dtype) for t in cache],
        "returned_dtypes": [keras.backend.standardize_dtype(t.dtype) for t in new_cache],
        "init_bytes": _cache_bytes(cache),
        "returned_bytes": _cache_bytes(new_cache),
        "dtype_preserved": all(keras.backend.standardize_dtype(a.dtype)
                               == keras.backend.standardize_dtype(b.dtype)
                               for a, b in zip(cache, new_cache)),
    }


def run(mode: str) -> Dict[str, Any]:
    import keras
    from keras import ops

    from model.analysis import kv_cache_bytes
    from model.attention import MultiHeadAttention, MultiHeadLatentAttention
    from model.deepseek_v3 import causal_mask

    sizes = SIZES[mode]
    mla_config = attention_config(mode)
    mha_config = mla_config.replace(attention_type="mha")
    keras.utils.set_random_seed(0)
    layers = {
        "mla": MultiHeadLatentAttention(mla_config, name="mla"),
        "mha": MultiHeadAttention(mha_config, name="mha"),
    }
    for layer in layers.values():
        layer.build((None, None, mla_config.hidden_size))
    itemsize = common.itemsize(CACHE_DTYPE)
    rng = np.random.default_rng(0)
    batch = sizes.attn_batch
    rows: List[Dict[str, Any]] = []
    for seq_len in sizes.attn_seq_lens:
        x = ops.convert_to_tensor(
            rng.standard_normal((batch, seq_len, mla_config.hidden_size)).astype("float32"))
        positions = ops.convert_to_tensor(
            np.broadcast_to(np.arange(seq_len, dtype="int32"), (batch, seq_len)).copy())
        mask = causal_mask(seq_len, seq_len)
        row: Dict[str, Any] = {"seq_len": seq_len, "batch": batch, "tokens": batch * seq_len}
        for name, layer in layers.items():
            cache = layer.init_cache(batch, seq_len, CACHE_DTYPE, mode="absorbed")
            init_bytes = _cache_bytes(cache)
            prefill = common.InferenceFn(layer, _prefill)
            _, new_cache = prefill(x, positions, mask, cache)
            common.block(new_cache)
            row[f"{name}_cache_bytes"] = _cache_bytes(new_cache)
            row[f"{name}_cache_shapes"] = [list(map(int, ops.shape(t))) for t in new_cache]
            row[f"{name}_cache_written"] = bool(
                all(np.any(ops.convert_to_numpy(ops.cast(t, "float32")) != 0) for t in new_cache))
            row[f"{name}_init_cache_bytes"] = init_bytes
            timing = common.time_calls(lambda: prefill(x, positions, mask, cache),
                                       repeats=sizes.attn_repeats, warmup=2)
            row[f"{name}_ms"] = timing["median_ms"]
            row[f"{name}_timing"] = timing
            row[f"{name}_compilations"] = prefill.compilations()
        # The same MLA layer without a cache, in naive mode (per-head keys
        # materialised): what a training forward or a prefill that does not
        # write a latent cache would cost.
        naive = common.InferenceFn(layers["mla"], lambda l, *a: _forward(l, *a, "naive"))
        timing = common.time_calls(lambda: naive(x, positions, mask),
                                   repeats=sizes.attn_repeats, warmup=2)
        row["mla_naive_nocache_ms"] = timing["median_ms"]
        row["mla_naive_nocache_timing"] = timing

        tokens = batch * seq_len
        row["mla_bytes_analytic"] = (
            (mla_config.kv_lora_rank + mla_config.qk_rope_head_dim) * itemsize * tokens)
        row["mha_bytes_analytic"] = (
            2 * mha_config.num_attention_heads * mha_config.baseline_head_dim * itemsize * tokens)
        one_layer = dict(num_hidden_layers=1, first_k_dense_replace=0)
        row["mla_bytes_model_analysis"] = kv_cache_bytes(
            mla_config.replace(**one_layer), "mla_absorbed", batch, seq_len, itemsize)
        row["mha_bytes_model_analysis"] = kv_cache_bytes(
            mha_config.replace(**one_layer), "mha", batch, seq_len, itemsize)
        row["mla_bytes_equal_analytic"] = (
            row["mla_cache_bytes"] == row["mla_bytes_analytic"] == row["mla_bytes_model_analysis"])
        row["mha_bytes_equal_analytic"] = (
            row["mha_cache_bytes"] == row["mha_bytes_analytic"] == row["mha_bytes_model_analysis"])
        row["cache_ratio_mha_over_mla"] = row["mha_cache_bytes"] / row["mla_cache_bytes"]
        rows.append(row)
    probe = {name: _dtype_probe(layer, mla_config.hidden_size) for name, layer in layers.items()}
    return {
        "rows": rows,
        "bfloat16_cache_probe": probe,
        "config": {"mla": mla_config.to_dict(), "mha_head_dim": mha_config.baseline_head_dim,
                   "cache_dtype": CACHE_DTYPE, "bytes_per_element": itemsize, "batch": batch,
                   "timed": "jitted layer call: prefill of seq_len tokens into a fresh cache "
                            "(MLA: latent cache written, attention in the naive form over "
                            "the prompt)"},
    }
