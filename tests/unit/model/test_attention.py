"""MLA and MHA: naive = absorbed, cached decoding = full forward, cache size."""

import numpy as np
import pytest

from model import get_preset
from model.attention import MultiHeadAttention, MultiHeadLatentAttention
from model.deepseek_v3 import causal_mask
from model.rotary import RotaryEmbedding, rope_parameters

pytestmark = [pytest.mark.unit, pytest.mark.model]


def _inputs(rng, config, batch=2, seq=9):
    x = rng.normal(size=(batch, seq, config.hidden_size)).astype("float32")
    positions = np.broadcast_to(np.arange(seq, dtype="int32"), (batch, seq))
    return x, positions, causal_mask(seq, seq)


@pytest.mark.parametrize("q_lora_rank", [16, None])
def test_mla_naive_equals_absorbed(rng, q_lora_rank):
    config = get_preset("tiny", q_lora_rank=q_lora_rank)
    layer = MultiHeadLatentAttention(config)
    x, positions, mask = _inputs(rng, config)
    naive, _ = layer(x, positions, mask, mode="naive")
    absorbed, _ = layer(x, positions, mask, mode="absorbed")
    assert naive.shape == x.shape
    np.testing.assert_allclose(np.asarray(naive), np.asarray(absorbed), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention, mode", [
    (MultiHeadLatentAttention, "absorbed"), (MultiHeadLatentAttention, "naive"),
    (MultiHeadAttention, None)])
def test_incremental_decoding_equals_full_forward(rng, attention, mode):
    config = get_preset("tiny", rope_scaling={"type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 16,
                                              "mscale": 1.0, "mscale_all_dim": 1.0})
    layer = attention(config)
    seq = 11
    x, positions, mask = _inputs(rng, config, seq=seq)
    full, _ = layer(x, positions, mask)
    cache = layer.init_cache(2, seq + 3, mode=mode)
    prefix = 6
    out, cache = layer(x[:, :prefix], positions[:, :prefix],
                       causal_mask(prefix, seq + 3, 0), cache=cache, cache_index=0)
    pieces = [np.asarray(out)]
    for t in range(prefix, seq):
        out, cache = layer(x[:, t:t + 1], positions[:, t:t + 1],
                           causal_mask(1, seq + 3, t), cache=cache, cache_index=t)
        pieces.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), np.asarray(full), rtol=1e-4, atol=1e-5)


def test_absorbed_cache_holds_only_latent_and_rope_key():
    config = get_preset("tiny")
    layer = MultiHeadLatentAttention(config)
    latent, rope_key = layer.init_cache(3, 20, mode="absorbed")
    assert tuple(latent.shape) == (3, 20, config.kv_lora_rank)
    assert tuple(rope_key.shape) == (3, 20, config.qk_rope_head_dim)


def test_mla_cache_is_over_80_percent_smaller_than_mha():
    # Test-size model with DeepSeek-V3's ratios: 8 heads of 64, latent 64 + rope 16.
    config = get_preset("tiny", hidden_size=256, num_attention_heads=8, kv_lora_rank=64,
                        qk_nope_head_dim=64, qk_rope_head_dim=16, v_head_dim=64)
    mla = MultiHeadLatentAttention(config).init_cache(2, 512, mode="absorbed")
    mha = MultiHeadAttention(config).init_cache(2, 512)
    mla_bytes, mha_bytes = sum(np.asarray(t).nbytes for t in mla), sum(np.asarray(t).nbytes for t in mha)
    reduction = 1 - mla_bytes / mha_bytes
    assert reduction > 0.8, reduction
    # ... and equals the analytic (kv_lora_rank + rope) * 4 bytes per token.
    assert mla_bytes == 2 * 512 * (64 + 16) * 4


def test_rope_scores_depend_only_on_relative_position(rng):
    rotary = RotaryEmbedding(8, 10000.0, None, 128, interleave=True)
    q = rng.normal(size=(1, 1, 8)).astype("float32")
    k = rng.normal(size=(1, 1, 8)).astype("float32")

    def score(pq, pk):
        cq, sq = rotary.cos_sin(np.array([[pq]], "int32"))
        ck, sk = rotary.cos_sin(np.array([[pk]], "int32"))
        return float(np.sum(np.asarray(rotary.apply(q, cq, sq)) * np.asarray(rotary.apply(k, ck, sk))))

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    base, _ = rope_parameters(64, 10000.0, None, 4096)
    yarn = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1}
    scaled, attention_factor = rope_parameters(64, 10000.0, yarn, 163840)
    np.testing.assert_allclose(scaled[:4], base[:4])  # fastest dims unchanged
    np.testing.assert_allclose(scaled[-4:], base[-4:] / 40.0)  # slowest dims divided by factor
    assert np.all(np.diff(scaled) < 0)
    assert attention_factor == pytest.approx(0.1 * np.log(40.0) + 1.0)


def test_naive_and_mha_caches_put_heads_before_time():
    config = get_preset("tiny")
    h = config.num_attention_heads
    keys, values = MultiHeadLatentAttention(config).init_cache(3, 20, mode="naive")
    assert tuple(keys.shape) == (3, h, 20, config.qk_head_dim)
    assert tuple(values.shape) == (3, h, 20, config.v_head_dim)
    keys, values = MultiHeadAttention(config).init_cache(3, 20)
    assert tuple(keys.shape) == tuple(values.shape) == (3, h, 20, config.baseline_head_dim)


@pytest.mark.parametrize("attention, mode", [
    (MultiHeadLatentAttention, "absorbed"), (MultiHeadLatentAttention, "naive"),
    (MultiHeadAttention, None)])
def test_a_cache_in_a_cache_slot_keeps_its_dtype(rng, attention, mode):
    import keras

    from model.attention import CacheSlot

    config = get_preset("tiny")
    layer = attention(config)
    x, positions, _ = _inputs(rng, config, seq=4)
    cache = layer.init_cache(2, 6, "bfloat16", mode=mode)
    out, new_cache = layer(x, positions, causal_mask(4, 6, 0), cache=CacheSlot(cache), cache_index=0)
    assert [keras.backend.standardize_dtype(t.dtype) for t in new_cache] == ["bfloat16"] * 2
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
