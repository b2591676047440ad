"""A base-model directory read without its weights (model.base_model), and
the Hugging Face copy our export writes (model.hf_export), which is a base
model again. Model only: runs under both backends; the settings side is
tests/unit/test_fine_tune_settings.py."""

import json
import os

import numpy as np
import pytest

from model.base_model import BaseModel, expected_tensors

HF = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "hf")
ORIGINAL = os.path.join(HF, "deepseek_original")  # 3 layers, YaRN, one MTP layer on disk


def test_the_model_config_is_the_checkpoints_with_its_mtp_layer():
    base = BaseModel.read(ORIGINAL)
    hf = json.load(open(os.path.join(ORIGINAL, "config.json")))
    config = base.model_config()
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "kv_lora_rank", "n_routed_experts"):
        assert getattr(config, name) == hf[name]
    assert config.yarn["factor"] == hf["rope_scaling"]["factor"]
    assert base.mtp_layers == config.num_nextn_predict_layers == 1
    # config.json declares one MTP layer but the baseline's weights hold none: not kept.
    assert BaseModel.read(os.path.join(HF, "baseline")).model_config().num_nextn_predict_layers == 0


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(HF) if os.path.isdir(os.path.join(HF, n))))
def test_every_fixture_layout_reads_as_a_base_model_with_all_its_tensors(name):
    """Per-expert and fused experts, shards, tied heads, no query LoRA,
    attention biases: the header check finds every tensor config.json needs,
    and each tensor it asks for is on disk (no weights read)."""
    base = BaseModel.read(os.path.join(HF, name))
    config = base.model_config()
    for alternatives in expected_tensors(config):
        assert any(key in base.shapes for key in alternatives), alternatives
    assert base.shapes["model.embed_tokens.weight"] == (config.vocab_size, config.hidden_size)


# ------------------------------------------------------------ our export as a base
def test_the_hf_export_loads_back_as_the_same_model(tmp_path):
    from model.hf_checkpoint import load_hf_checkpoint
    from model.hf_export import hf_state_dict, save_hf_checkpoint

    model = load_hf_checkpoint(ORIGINAL, load_mtp=True)
    # The router bias moves in training: it must travel too.
    bias = model.decoder_layers[1].mlp.gate.e_score_correction_bias
    bias.assign(np.linspace(-0.3, 0.3, bias.shape[0]).astype("float32"))
    out = save_hf_checkpoint(model, str(tmp_path / "export"))
    names = set(hf_state_dict(model))
    assert {alternatives[0] for alternatives in expected_tensors(model.config)} <= names

    base = BaseModel.read(out)
    assert base.model_config() == model.config
    again = load_hf_checkpoint(out, load_mtp=True)
    ids = np.load(os.path.join(ORIGINAL, "reference.npz"))["input_ids"].astype("int32")
    for a, b in zip(model.weights, again.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    np.testing.assert_allclose(np.asarray(again(ids)), np.asarray(model(ids)), atol=1e-6)


def test_the_hf_export_is_refused_for_a_layout_it_cannot_hold():
    from model import get_preset
    from model.hf_export import ExportError, hf_config

    with pytest.raises(ExportError, match="MLA attention and sigmoid routing only"):
        hf_config(get_preset("tiny", attention_type="mha"))
