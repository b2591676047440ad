"""The gate's expert-balance check as the aux-loss-free balancing paper means
it: MaxVio of the expert load on eval tokens with the router bias as
trained, and no worse than without the bias."""

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def _model_and_tokens():
    from model import get_preset
    from model.deepseek_v3 import DeepSeekV3ForCausalLM

    config = get_preset("tiny", n_routed_experts=8, n_group=1, topk_group=1, bias_update_speed=0.002)
    model = DeepSeekV3ForCausalLM(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(64, 16))
    model(tokens[:1].astype("int32"))
    return model, tokens.astype("int32")


def _checks(model, tokens, **thresholds):
    from components.validation_checks import GateThresholds, IntegrationChecks

    return IntegrationChecks(model, tokens, GateThresholds(eval_batches=1, batch_size=64, **thresholds))


def test_a_bias_that_unbalances_the_load_is_refused():
    model, tokens = _model_and_tokens()
    moe = model.moe_layers()[0]
    bias = np.zeros(moe.gate.e_score_correction_bias.shape, "float32")
    bias[0] = 10.0  # every token to expert 0
    moe.gate.e_score_correction_bias.assign(bias)
    result = _checks(model, tokens).expert_utilization()
    layer = result["layers"]["layers_1"]
    assert not result["passed"]
    assert layer["max_violation"] == pytest.approx(8 / 2 - 1)  # expert 0 holds N of the 2N assignments
    assert layer["max_violation_without_bias"] < layer["max_violation"]
    assert "unbalances the load" in result["reason"] and "MaxVio 3.00 > 1.5" in result["reason"]
    np.testing.assert_array_equal(np.asarray(moe.gate.e_score_correction_bias), bias)  # restored


def test_the_aux_loss_free_bias_balances_the_eval_load():
    model, tokens = _model_and_tokens()
    checks = _checks(model, tokens)
    before = checks.expert_utilization()["layers"]["layers_1"]["max_violation"]
    moe = model.moe_layers()[0]
    for _ in range(30):  # the training engine's update, on the load of each batch
        moe.reset_expert_counts()
        model(tokens, training=False)
        moe.apply_bias_update(np.asarray(moe.get_expert_utilization()["load"], "float32"))
    result = checks.expert_utilization()
    layer = result["layers"]["layers_1"]
    assert result["passed"], result["reason"]
    assert layer["max_violation"] < before and layer["max_violation"] < layer["max_violation_without_bias"]
    # a stricter MaxVio than the balanced load reaches is refused, naming it
    strict = _checks(model, tokens, max_expert_load_violation=layer["max_violation"] / 2).expert_utilization()
    assert not strict["passed"] and "load MaxVio" in strict["reason"]
