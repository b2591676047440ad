"""Attention layers: DeepSeek-V3's Multi-head Latent Attention and the standard
multi-head baseline, with the same call interface and KV cache contract.

Contract for both layers:
    out, cache = layer(x, positions, mask, cache=None, cache_index=None)
x [B, S, hidden]; positions [B, S] int (RoPE positions); mask [B, S, T] bool,
True where query s may attend key t (T = S without a cache, else the cache
length). With a cache (a tuple of fixed-size tensors, see `init_cache`, or a
`CacheSlot` holding one) the new keys are written at `cache_index` and the
queries attend the whole cache. The returned cache keeps the dtype it came in.

Cache layouts: absorbed MLA ([B, T, r], [B, T, rope]); naive MLA and MHA
per-head keys and values [B, H, T, D] (heads outside time: attention reads
each head's keys contiguously, the fast einsum path on XLA:CPU).
"""

from __future__ import annotations

import keras
from keras import ops

from .config import DeepSeekV3Config
from .rms_norm import RMSNorm
from .rotary import RotaryEmbedding, softmax_scale

_MASKED = -1e9  # finite, so a fully masked (padding) row stays NaN-free
# The latent RMSNorms use a fixed epsilon (DeepSeek-V3's inference code and
# transformers alike), whatever rms_norm_eps says.
_LATENT_NORM_EPS = 1e-6


def _dense(units, use_bias, config, name):
    return keras.layers.Dense(
        units, use_bias=use_bias, name=name,
        kernel_initializer=keras.initializers.RandomNormal(stddev=config.initializer_range))


def masked_softmax(scores, mask):
    """Softmax over the last axis in float32; `mask` broadcasts to `scores`."""
    scores = ops.where(mask, ops.cast(scores, "float32"), _MASKED)
    return ops.softmax(scores, axis=-1)


def write_cache(cache, update, cache_index, time_axis=1):
    """Writes `update` into `cache` at time `cache_index` along `time_axis`
    (1 for [B, T, ...], 2 for [B, H, T, D]), in the cache's own dtype."""
    start = [0] * len(cache.shape)
    start[time_axis] = cache_index
    return ops.slice_update(cache, start, ops.cast(update, cache.dtype))


class CacheSlot:
    """Carries one layer's cache tensors through `Layer.__call__`.

    Keras autocasts every floating tensor argument of a call (nested tuples
    included) to the layer's compute dtype, so a bfloat16 cache passed as a
    plain tuple comes back float32. An object Keras does not traverse keeps
    the tensors as they are."""

    __slots__ = ("tensors",)

    def __init__(self, tensors):
        self.tensors = tuple(tensors)


def unwrap_cache(cache):
    return cache.tensors if isinstance(cache, CacheSlot) else cache


def _heads_first(t):
    """[B, S, H, D] -> [B, H, S, D]."""
    return ops.transpose(t, (0, 2, 1, 3))


def _is_prefill(x, cache_index):
    """A multi-token chunk written from slot 0 (static: decided at trace time)."""
    seq_len = x.shape[1]
    return isinstance(cache_index, int) and cache_index == 0 and (seq_len is None or seq_len > 1)


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class MultiHeadLatentAttention(keras.layers.Layer):
    """MLA (DeepSeek-V2/V3): low-rank joint KV compression plus one decoupled,
    shared RoPE key.

    Queries: q = W_qb · RMSNorm(W_qa · x) (or a single W_q when q_lora_rank is
    None), split per head into a no-rope part and a rope part. Keys/values:
    [c_kv | k_rope] = W_kva · x; c_kv is RMSNorm-ed and up-projected by W_kvb
    into per-head no-rope keys and values; k_rope is shared by all heads.

    "naive" mode materialises per-head keys/values (and caches them);
    "absorbed" mode folds W_kvb into the query and the output so attention
    runs in the latent space and the cache holds only [c_kv, k_rope].
    """

    def __init__(self, config: DeepSeekV3Config, **kwargs):
        super().__init__(**kwargs)
        c = config
        self.config = c
        self.num_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        h = self.num_heads
        if c.q_lora_rank is None:
            self.q_proj = _dense(h * c.qk_head_dim, False, c, "q_proj")
        else:
            self.q_a_proj = _dense(c.q_lora_rank, c.attention_bias, c, "q_a_proj")
            self.q_a_layernorm = RMSNorm(_LATENT_NORM_EPS, name="q_a_layernorm")
            self.q_b_proj = _dense(h * c.qk_head_dim, False, c, "q_b_proj")
        self.kv_a_proj_with_mqa = _dense(c.kv_lora_rank + c.qk_rope_head_dim, c.attention_bias, c,
                                         "kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(_LATENT_NORM_EPS, name="kv_a_layernorm")
        self.kv_b_proj = _dense(h * (c.qk_nope_head_dim + c.v_head_dim), False, c, "kv_b_proj")
        self.o_proj = _dense(c.hidden_size, c.attention_bias, c, "o_proj")
        self.rotary = RotaryEmbedding(c.qk_rope_head_dim, c.rope_theta, c.yarn,
                                      c.max_position_embeddings, c.rope_interleave)
        self.scale = softmax_scale(c.qk_head_dim, c.yarn)

    def build(self, input_shape):
        c = self.config
        hidden = input_shape[-1]
        if c.q_lora_rank is None:
            self.q_proj.build((None, hidden))
        else:
            self.q_a_proj.build((None, hidden))
            self.q_a_layernorm.build((None, c.q_lora_rank))
            self.q_b_proj.build((None, c.q_lora_rank))
        self.kv_a_proj_with_mqa.build((None, hidden))
        self.kv_a_layernorm.build((None, c.kv_lora_rank))
        self.kv_b_proj.build((None, c.kv_lora_rank))
        self.o_proj.build((None, self.num_heads * self.v_dim))

    # ---------------------------------------------------------------- pieces
    def _queries(self, x, cos, sin):
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        b, s = ops.shape(x)[0], ops.shape(x)[1]
        q = ops.reshape(q, (b, s, self.num_heads, self.nope_dim + self.rope_dim))
        q_nope, q_rope = q[..., : self.nope_dim], q[..., self.nope_dim:]
        return q_nope, self.rotary.apply(q_rope, cos, sin)

    def _latent(self, x, cos, sin):
        """-> normalised latent c_kv [B, S, r] and roped shared key [B, S, rope]."""
        kv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(kv[..., : self.kv_lora_rank])
        k_rope = self.rotary.apply(kv[..., self.kv_lora_rank:], cos, sin)
        return latent, k_rope

    def _expand(self, latent):
        """Up-projects c_kv into per-head no-rope keys and values."""
        b, t = ops.shape(latent)[0], ops.shape(latent)[1]
        kv = ops.reshape(self.kv_b_proj(latent), (b, t, self.num_heads, self.nope_dim + self.v_dim))
        return kv[..., : self.nope_dim], kv[..., self.nope_dim:]

    def _up_weights(self, dtype):
        """W_kvb split per head: W_uk [r, H, nope], W_uv [r, H, v]."""
        w = ops.cast(self.kv_b_proj.kernel, dtype)
        w = ops.reshape(w, (self.kv_lora_rank, self.num_heads, self.nope_dim + self.v_dim))
        return w[..., : self.nope_dim], w[..., self.nope_dim:]

    def _output(self, attended):
        b, s = ops.shape(attended)[0], ops.shape(attended)[1]
        return self.o_proj(ops.reshape(attended, (b, s, self.num_heads * self.v_dim)))

    # -------------------------------------------------------------- attention
    def _attend_naive(self, q_nope, q_rope, k_nope, k_rope, v, mask):
        # k_rope [B, T, rope] is shared by every head.
        k_nope, k_rope, v = (ops.cast(t, q_nope.dtype) for t in (k_nope, k_rope, v))
        scores = ops.einsum("bshd,bthd->bhst", q_nope, k_nope)
        if len(k_rope.shape) == 3:
            scores = scores + ops.einsum("bshd,btd->bhst", q_rope, k_rope)
        else:
            scores = scores + ops.einsum("bshd,bthd->bhst", q_rope, k_rope)
        probs = masked_softmax(ops.cast(scores, "float32") * self.scale, mask[:, None])
        return ops.einsum("bhst,bthd->bshd", ops.cast(probs, v.dtype), v)

    def _attend_cached_heads(self, q, keys, values, mask):
        """q [B, S, H, qk]; keys [B, H, T, qk], values [B, H, T, v] (the naive cache)."""
        keys, values = ops.cast(keys, q.dtype), ops.cast(values, q.dtype)
        scores = ops.einsum("bshd,bhtd->bhst", q, keys)
        probs = masked_softmax(ops.cast(scores, "float32") * self.scale, mask[:, None])
        return ops.einsum("bhst,bhtd->bshd", ops.cast(probs, values.dtype), values)

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, mask):
        w_uk, w_uv = self._up_weights(q_nope.dtype)
        latent, k_rope = ops.cast(latent, q_nope.dtype), ops.cast(k_rope, q_nope.dtype)
        q_latent = ops.einsum("bshd,rhd->bshr", q_nope, w_uk)
        scores = (ops.einsum("bshr,btr->bhst", q_latent, latent)
                  + ops.einsum("bshd,btd->bhst", q_rope, k_rope))
        probs = masked_softmax(ops.cast(scores, "float32") * self.scale, mask[:, None])
        out_latent = ops.einsum("bhst,btr->bshr", ops.cast(probs, latent.dtype), latent)
        return ops.einsum("bshr,rhd->bshd", out_latent, w_uv)

    def call(self, x, positions, mask, cache=None, cache_index=None, mode=None):
        # Without a cache (training, scoring) the naive form is the cheaper one
        # and keeps every projection an ordinary (quantizable) Dense call; with
        # a cache, the cache's layout decides.
        mode = mode or "naive"
        cache = unwrap_cache(cache)
        cos, sin = self.rotary.cos_sin(positions)
        q_nope, q_rope = self._queries(x, cos, sin)
        latent, k_rope = self._latent(x, cos, sin)
        new_cache = None
        if cache is not None:
            if len(cache) == 2 and len(cache[0].shape) == 3:  # absorbed layout
                new_cache = (write_cache(cache[0], latent, cache_index),
                             write_cache(cache[1], k_rope, cache_index))
                if not _is_prefill(x, cache_index):
                    out = self._attend_absorbed(q_nope, q_rope, new_cache[0], new_cache[1], mask)
                    return self._output(ops.cast(out, x.dtype)), new_cache
                # A prompt from slot 0 attends only itself: the naive form over
                # its own S keys (cheaper per head than the absorbed form over
                # the whole cache), while the cache receives only the latent.
                mask = mask[:, :, : ops.shape(x)[1]]
                mode = "naive"
            else:  # naive layout: full per-head keys and values [B, H, T, D]
                k_nope_new, v_new = self._expand(latent)
                k_rope_heads = ops.broadcast_to(
                    k_rope[:, :, None, :], ops.shape(k_rope)[:2] + (self.num_heads, self.rope_dim))
                new_keys = _heads_first(ops.concatenate([k_nope_new, k_rope_heads], -1))
                keys = write_cache(cache[0], new_keys, cache_index, time_axis=2)
                values = write_cache(cache[1], _heads_first(v_new), cache_index, time_axis=2)
                new_cache = (keys, values)
                # One einsum over the whole cached key (no slice of the cache:
                # slicing its last axis would copy all of it every step).
                out = self._attend_cached_heads(ops.concatenate([q_nope, q_rope], -1), keys,
                                                values, mask)
                return self._output(ops.cast(out, x.dtype)), new_cache
        if mode == "absorbed":
            out = self._attend_absorbed(q_nope, q_rope, latent, k_rope, mask)
        else:
            k_nope, v = self._expand(latent)
            out = self._attend_naive(q_nope, q_rope, k_nope, k_rope, v, mask)
        return self._output(ops.cast(out, x.dtype)), new_cache

    def init_cache(self, batch_size, max_length, dtype="float32", mode=None):
        """Zeroed cache: absorbed ([B,T,r], [B,T,rope]) or naive ([B,H,T,qk], [B,H,T,v])."""
        mode = mode or self.config.mla_mode
        if mode == "absorbed":
            return (ops.zeros((batch_size, max_length, self.kv_lora_rank), dtype),
                    ops.zeros((batch_size, max_length, self.rope_dim), dtype))
        return (ops.zeros((batch_size, self.num_heads, max_length, self.nope_dim + self.rope_dim), dtype),
                ops.zeros((batch_size, self.num_heads, max_length, self.v_dim), dtype))


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class MultiHeadAttention(keras.layers.Layer):
    """The standard baseline: per-head q/k/v projections, RoPE over the whole
    head, a cache of full keys and values (2 x heads x head_dim per token)."""

    def __init__(self, config: DeepSeekV3Config, **kwargs):
        super().__init__(**kwargs)
        c = config
        self.config = c
        self.num_heads, self.head_dim = c.num_attention_heads, c.baseline_head_dim
        width = self.num_heads * self.head_dim
        self.q_proj = _dense(width, c.attention_bias, c, "q_proj")
        self.k_proj = _dense(width, c.attention_bias, c, "k_proj")
        self.v_proj = _dense(width, c.attention_bias, c, "v_proj")
        self.o_proj = _dense(c.hidden_size, c.attention_bias, c, "o_proj")
        self.rotary = RotaryEmbedding(self.head_dim, c.rope_theta, c.yarn,
                                      c.max_position_embeddings, c.rope_interleave)
        self.scale = softmax_scale(self.head_dim, c.yarn)

    def build(self, input_shape):
        hidden = input_shape[-1]
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.build((None, hidden))
        self.o_proj.build((None, self.num_heads * self.head_dim))

    def _heads(self, t):
        return ops.reshape(t, (ops.shape(t)[0], ops.shape(t)[1], self.num_heads, self.head_dim))

    def call(self, x, positions, mask, cache=None, cache_index=None, mode=None):
        cos, sin = self.rotary.cos_sin(positions)
        q = self.rotary.apply(self._heads(self.q_proj(x)), cos, sin)
        k = self.rotary.apply(self._heads(self.k_proj(x)), cos, sin)
        v = self._heads(self.v_proj(x))
        cache = unwrap_cache(cache)
        new_cache = None
        kv = "bthd"
        if cache is not None:  # [B, H, T, D]
            k = write_cache(cache[0], _heads_first(k), cache_index, time_axis=2)
            v = write_cache(cache[1], _heads_first(v), cache_index, time_axis=2)
            new_cache, kv = (k, v), "bhtd"
        scores = ops.einsum(f"bshd,{kv}->bhst", q, ops.cast(k, q.dtype))
        probs = masked_softmax(ops.cast(scores, "float32") * self.scale, mask[:, None])
        out = ops.einsum(f"bhst,{kv}->bshd", ops.cast(probs, x.dtype), ops.cast(v, x.dtype))
        b, s = ops.shape(out)[0], ops.shape(out)[1]
        return self.o_proj(ops.reshape(out, (b, s, self.num_heads * self.head_dim))), new_cache

    def init_cache(self, batch_size, max_length, dtype="float32", mode=None):
        shape = (batch_size, self.num_heads, max_length, self.head_dim)
        return ops.zeros(shape, dtype), ops.zeros(shape, dtype)
