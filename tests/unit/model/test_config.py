import math

import pytest

from model import ConfigError, DeepSeekV3Config, get_preset, parameter_count
from model.analysis import kv_cache_elements_per_token_per_layer

pytestmark = [pytest.mark.unit, pytest.mark.model]


@pytest.mark.parametrize("changes, field", [
    (dict(num_experts_per_tok=9, n_routed_experts=8), "num_experts_per_tok"),
    (dict(n_routed_experts=6, n_group=4), "n_group"),
    (dict(topk_group=3, n_group=2), "topk_group"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(q_lora_rank=-3), "q_lora_rank"),
    (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
    (dict(attention_type="gqa"), "attention_type"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(expert_capacity_factor=0.5), "expert_capacity_factor"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "factor": -1}), "rope_scaling"),
    (dict(num_experts_per_tok=4, n_routed_experts=8, n_group=4, topk_group=1), "num_experts_per_tok"),
])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"DeepSeekV3Config\.{field}"):
        DeepSeekV3Config(**changes)


def test_unknown_field_is_refused():
    with pytest.raises(ConfigError, match="unknown fields.*bogus"):
        DeepSeekV3Config.from_dict({"bogus": 1})


def test_json_round_trip_keeps_every_field():
    config = get_preset("deepseek-v3-671b")
    assert DeepSeekV3Config.from_json(config.to_json()) == config


def test_presets_are_valid_and_overridable():
    assert get_preset("tiny", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")


def test_671b_parameter_count_matches_the_paper():
    counts = parameter_count(get_preset("deepseek-v3-671b"))
    # Paper: 671B total, 37B activated per token (MTP module excluded).
    assert math.isclose(counts["total"] / 1e9, 671, rel_tol=0.01)
    assert math.isclose(counts["activated"] / 1e9, 37, rel_tol=0.03)


def test_671b_kv_cache_elements_per_token_per_layer():
    config = get_preset("deepseek-v3-671b")
    assert kv_cache_elements_per_token_per_layer(config, "mla_absorbed") == 576
    assert kv_cache_elements_per_token_per_layer(config, "mha") == 32768


def test_gpu_small_has_about_100m_activated_parameters():
    activated = parameter_count(get_preset("gpu-small"))["activated"]
    assert 80e6 < activated < 130e6
