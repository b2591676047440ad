"""Model level: MTP alignment (depth k at position i sees tokens <= i + k) and
pad tokens that change neither the MoE loads nor the losses."""

import numpy as np
import pytest
from keras import ops

from model import DeepSeekV3ForCausalLM, NextTokenLoss, get_preset
from model.deepseek_v3 import causal_mask

pytestmark = [pytest.mark.unit, pytest.mark.model]


def _mtp_logits(model, ids):
    ids = ops.convert_to_tensor(ids.astype("int32"))
    s = ids.shape[1]
    positions = ops.broadcast_to(ops.arange(s, dtype="int32")[None], ids.shape)
    mask = causal_mask(s, s)
    hidden, _ = model.decode(ids, positions, mask)
    return [np.asarray(x) for x in model.mtp_logits(ids, hidden, positions, mask)]


def test_mtp_depth_k_sees_token_j_first_at_position_j_minus_k(rng):
    model = DeepSeekV3ForCausalLM(get_preset("tiny", num_nextn_predict_layers=2))
    ids = rng.integers(0, 64, size=(1, 12))
    base = _mtp_logits(model, ids)
    j = 8
    changed = ids.copy()
    changed[0, j] = (ids[0, j] + 7) % 64
    after = _mtp_logits(model, changed)
    for k, (a, b) in enumerate(zip(base, after), start=1):
        assert a.shape[1] == 12 - k - 1
        np.testing.assert_allclose(b[:, : j - k], a[:, : j - k], rtol=1e-6, atol=1e-7)
        assert np.abs(b[:, j - k] - a[:, j - k]).max() > 1e-6, k


def test_left_padding_changes_neither_moe_loads_nor_losses(rng):
    config = get_preset("tiny", num_nextn_predict_layers=1, seq_aux_loss_alpha=0.1)
    model = DeepSeekV3ForCausalLM(config)
    # Well-separated routing in every MoE (the MTP block's too): at init scale
    # float noise between two batch layouts could flip a near-tie.
    for moe in model.moe_layers() + [m.block.mlp for m in model.mtp_modules]:
        moe.gate.weight.assign(rng.normal(scale=1.0, size=moe.gate.weight.shape).astype("float32"))
    ids = rng.integers(2, 64, size=(2, 10)).astype("int32")
    pads = 5
    padded = np.concatenate([rng.integers(2, 64, size=(2, pads)), ids], axis=1).astype("int32")
    mask = np.concatenate([np.zeros((2, pads)), np.ones((2, 10))], axis=1).astype("int32")

    def run(inputs):
        model.reset_expert_counts()
        logits = model(inputs, training=True)
        moe = model.moe_layers()[0]
        return (np.asarray(logits), [float(x) for x in model.losses],
                np.asarray(moe.expert_load), float(moe.tokens_seen))

    logits, losses, load, seen = run(ids)
    logits_p, losses_p, load_p, seen_p = run({"token_ids": padded, "padding_mask": mask})
    np.testing.assert_allclose(logits_p[:, pads:], logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(losses_p, losses, rtol=1e-4)  # MTP + balance losses
    np.testing.assert_array_equal(load_p, load)
    assert seen_p == seen == 20
    plain = float(NextTokenLoss()(ids, logits))
    masked = float(NextTokenLoss()({"token_ids": padded, "padding_mask": mask}, logits_p))
    assert masked == pytest.approx(plain, rel=1e-4)
