"""The whole model: shapes, gradients, masks, save/load, learning."""

import keras
import numpy as np
import pytest
from conftest import gradients

from model import DeepSeekV3ForCausalLM, NextTokenLoss, get_preset

pytestmark = [pytest.mark.unit, pytest.mark.model]


def _ids(rng, config, batch=2, seq=12):
    return rng.integers(0, config.vocab_size, size=(batch, seq)).astype("int32")


@pytest.mark.parametrize("overrides", [
    {}, {"q_lora_rank": None}, {"attention_type": "mha"}, {"tie_word_embeddings": True},
    {"scoring_func": "softmax", "n_group": 1, "topk_group": 1}, {"num_nextn_predict_layers": 2}])
def test_forward_shapes_and_finiteness(rng, overrides):
    config = get_preset("tiny", **overrides)
    model = DeepSeekV3ForCausalLM(config)
    ids = _ids(rng, config)
    logits = np.asarray(model(ids))
    assert logits.shape == (2, 12, config.vocab_size)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()


def _loss(model, ids):
    logits = model(ids, training=True)
    return NextTokenLoss()(ids, logits)


def test_every_trainable_variable_receives_a_gradient(rng):
    config = get_preset("tiny", num_nextn_predict_layers=1, seq_aux_loss_alpha=0.01,
                        expert_capacity_factor=None)
    model = DeepSeekV3ForCausalLM(config)
    ids = _ids(rng, config, batch=4, seq=16)
    grads = gradients(model, _loss, ids)
    assert len(grads) == len(model.trainable_variables)
    for variable, grad in zip(model.trainable_variables, grads):
        assert grad is not None, variable.path
        assert np.isfinite(grad).all(), variable.path
        if variable.path.endswith(("experts_gate_proj", "experts_up_proj", "experts_down_proj")):
            # Per expert: each routed expert that saw a token gets a gradient.
            nonzero = np.abs(grad).reshape(grad.shape[0], -1).sum(1) > 0
            assert nonzero.all(), (variable.path, nonzero)
        else:
            assert np.abs(grad).sum() > 0, variable.path
    assert not any(v.trainable for v in model.variables if "e_score_correction_bias" in v.path)


def test_padding_mask_makes_left_padded_sequence_match_unpadded(rng):
    config = get_preset("tiny")
    model = DeepSeekV3ForCausalLM(config)
    ids = _ids(rng, config, batch=1, seq=7)
    plain = np.asarray(model(ids))
    padded = np.concatenate([np.zeros((1, 3), "int32"), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3), "int32"), np.ones((1, 7), "int32")], axis=1)
    out = np.asarray(model({"token_ids": padded, "padding_mask": mask}))
    np.testing.assert_allclose(out[:, 3:], plain, rtol=1e-4, atol=1e-5)


def test_keras_save_and_load_round_trip(rng, tmp_path):
    config = get_preset("tiny", num_nextn_predict_layers=1)
    model = DeepSeekV3ForCausalLM(config)
    model.decoder_layers[1].mlp.gate.e_score_correction_bias.assign(np.linspace(-1, 1, 4).astype("float32"))
    ids = _ids(rng, config)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.config == config
    np.testing.assert_allclose(np.asarray(loaded(ids)), np.asarray(model(ids)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(loaded.decoder_layers[1].mlp.gate.e_score_correction_bias),
                               np.linspace(-1, 1, 4), rtol=1e-6)


def test_mtp_adds_a_training_loss_only(rng):
    model = DeepSeekV3ForCausalLM(get_preset("tiny", num_nextn_predict_layers=2))
    ids = _ids(rng, model.config)
    model(ids, training=True)
    assert len(model.losses) == 1 and float(model.losses[0]) > 0
    model(ids, training=False)
    assert len(model.losses) == 0


def test_loss_falls_on_a_learnable_task():
    # Each sequence counts up from a random start modulo the vocab:
    # next token = previous + 1, learnable almost perfectly.
    config = get_preset("tiny", vocab_size=32)
    keras.utils.set_random_seed(0)
    model = DeepSeekV3ForCausalLM(config)
    starts = np.random.default_rng(0).integers(0, 32, size=(256, 1))
    ids = ((starts + np.arange(16)) % 32).astype("int32")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=NextTokenLoss())
    first = model.evaluate(ids, ids, batch_size=64, verbose=0)
    model.fit(ids, ids, batch_size=32, epochs=6, verbose=0)
    last = model.evaluate(ids, ids, batch_size=64, verbose=0)
    assert first > np.log(32) * 0.9
    assert last < 0.3 * first, (first, last)


def test_balance_bias_moves_by_gamma_under_mixed_bfloat16(rng):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = DeepSeekV3ForCausalLM(get_preset("tiny", bias_update_speed=0.001))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    bias = model.decoder_layers[1].mlp.gate.e_score_correction_bias
    bias.assign(np.full(4, 0.6, "float32"))
    moe = model.decoder_layers[1].mlp
    model(_ids(rng, model.config, batch=4, seq=16), training=True)
    np.testing.assert_array_equal(np.asarray(bias), np.float32(0.6))  # the forward leaves it alone
    moe.apply_bias_update(moe.expert_load)  # the trainer's once-per-step update
    value = np.asarray(bias)
    assert value.dtype == np.float32
    # A bf16 bias could only move in steps of 2**-8 near 0.6; gamma is 0.001.
    np.testing.assert_allclose(np.abs(value - 0.6), 0.001, rtol=1e-3)


def test_float8_training_reduces_the_loss(rng):
    keras.utils.set_random_seed(0)
    model = DeepSeekV3ForCausalLM(get_preset("tiny"))
    model.quantize("float8")
    ids = _ids(rng, model.config, batch=8, seq=16)
    model.compile(optimizer=keras.optimizers.AdamW(3e-3), loss=NextTokenLoss())
    losses = model.fit(ids, ids, epochs=5, verbose=0).history["loss"]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.2, losses
