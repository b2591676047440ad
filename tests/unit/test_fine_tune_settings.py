"""Fine-tuning settings, before anything runs: what a base-model directory
fixes (the model config) or refuses (shape-changing overrides, broken
files, a vocabulary too small for the data), its identity in the training
fingerprint, and the CLI's `--base-model`. (The TFX venv: pipeline settings.)"""

import json
import os
import shutil

import pytest

from model.base_model import SHAPE_FIELDS, BaseModel
from model.safetensors_io import load_file, save_file

HF = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
ORIGINAL = os.path.join(HF, "deepseek_original")  # 3 layers, YaRN, one MTP layer on disk


def _copy(tmp_path, name="deepseek_original"):
    target = tmp_path / name
    shutil.copytree(os.path.join(HF, name), target)
    return target


def _settings(tmp_path, **changes):
    from pipeline.settings import PipelineSettings

    values = dict(run_dir=str(tmp_path / "run"), base_model=ORIGINAL, seq_len=16, batch_size=8,
                  train_examples=64, eval_examples=16, train_steps=2)
    values.update(changes)
    return PipelineSettings(**values)


def test_a_shape_changing_override_is_refused_naming_it(tmp_path):
    from pipeline.settings import SettingsError

    for name, value in (("hidden_size", 64), ("num_hidden_layers", 2), ("n_routed_experts", 16),
                        ("vocab_size", 128), ("kv_lora_rank", 8), ("v_head_dim", 8)):
        assert name in SHAPE_FIELDS
        with pytest.raises(SettingsError, match=rf"^model_overrides\.{name}: .*weight shape"):
            _settings(tmp_path, model_overrides={name: value})
    with pytest.raises(SettingsError, match="num_nextn_predict_layers: 2 exceeds the 1 MTP"):
        _settings(tmp_path, model_overrides={"num_nextn_predict_layers": 2})


def test_non_shape_settings_stay_free_and_seq_len_is_bounded_by_max_positions(tmp_path):
    from pipeline.settings import SettingsError

    s = _settings(tmp_path, learning_rate=1e-4, train_steps=3, batch_size=4,
                  model_overrides={"bias_update_speed": 0.0, "mtp_loss_weight": 0.1,
                                   "num_nextn_predict_layers": 0, "hidden_size": 32})
    c = s.model_config
    assert (c.bias_update_speed, c.mtp_loss_weight, c.num_nextn_predict_layers) == (0.0, 0.1, 0)
    assert s.trainer_custom_config()["model_config"]["hidden_size"] == 32
    with pytest.raises(SettingsError, match="seq_len: 300 exceeds the model's max_position_embeddings 256"):
        _settings(tmp_path, seq_len=300)


def test_the_base_models_identity_keys_the_checkpoint_directory(tmp_path):
    other = _copy(tmp_path)
    tensors = load_file(str(other / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1e-3  # same shapes, other weights
    save_file(tensors, str(other / "model.safetensors"))
    a, b = _settings(tmp_path), _settings(tmp_path, base_model=str(other))
    assert BaseModel.read(ORIGINAL).identity != BaseModel.read(str(other)).identity
    assert a.model_config == b.model_config
    assert a.training_fingerprint() != b.training_fingerprint()
    plain = _settings(tmp_path, base_model=None, preset="tiny")
    assert "base_model" not in json.dumps(plain.training_fingerprint())


@pytest.mark.parametrize("breakage, message", [
    ("no_config", r"config\.json: not found"),
    ("bad_json", r"config\.json: not valid JSON"),
    ("missing_tensor", r"lack 1 tensor\(s\) that config\.json needs, e\.g\. \['model\.layers\.1\.self_attn\.o_proj\.weight'\]"),
    ("no_weights", r"no \*\.safetensors files"),
    ("bad_header", r"model\.safetensors: header size"),
])
def test_a_broken_directory_is_one_line_naming_the_file(tmp_path, breakage, message):
    from pipeline.settings import SettingsError

    d = _copy(tmp_path)
    if breakage == "no_config":
        os.remove(d / "config.json")
    elif breakage == "bad_json":
        (d / "config.json").write_text('{"hidden_size": 32,')
    elif breakage == "missing_tensor":
        tensors = load_file(str(d / "model.safetensors"))
        del tensors["model.layers.1.self_attn.o_proj.weight"]
        save_file(tensors, str(d / "model.safetensors"))
    elif breakage == "no_weights":
        os.remove(d / "model.safetensors")
    else:
        (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(SettingsError, match=message) as error:
        _settings(tmp_path, base_model=str(d))
    assert "\n" not in str(error.value) and str(d) in str(error.value)


def test_a_vocabulary_smaller_than_the_tokenizers_fails_before_anything_runs(tmp_path):
    """The data's token ids come from the tokenizer: 512 ids cannot index a
    64-row embedding."""
    from pipeline.settings import SettingsError

    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("some words to read\n" * 10)
    with pytest.raises(SettingsError, match=r"^base_model: its vocabulary \(64 ids, .*config\.json\) is "
                                            r"smaller than the tokenizer's 512"):
        _settings(tmp_path, text_dir=str(text), vocab_size=512)


def test_a_pushed_models_tokenizer_is_the_text_runs_and_its_ids_are_checked(tmp_path):
    """Our export of a run on text keeps its SentencePiece model in
    assets.extra/: a fine-tune on text uses it (here: 400 ids, too many for
    the 64-row embedding, refused)."""
    from data import text_corpus, text_tokenizer
    from pipeline.settings import SettingsError

    kjv = os.path.join(HF, "..", "text", "kjv")
    d = _copy(tmp_path)
    (d / "assets.extra").mkdir()
    lines = text_corpus.iter_lines(kjv, text_corpus.list_documents(kjv)[:2])
    (d / "assets.extra" / "tokenizer.model").write_bytes(text_tokenizer.train_bpe(lines, 400))
    assert BaseModel.read(str(d)).tokenizer_file == str(d / "assets.extra" / "tokenizer.model")
    with pytest.raises(SettingsError, match=r"^base_model: its vocabulary \(64 ids, .*smaller than the tokenizer's 400"):
        _settings(tmp_path, base_model=str(d), text_dir=kjv)


def test_the_cli_refuses_a_preset_beside_a_base_model(tmp_path):
    import argparse

    from app.cli import _add_settings_args, _settings_from_args

    p = argparse.ArgumentParser()
    _add_settings_args(p)
    p.add_argument("--run-dir", default=str(tmp_path))
    for name in ("pipeline_root", "metadata_path", "serving_dir", "beam_arg"):
        p.add_argument("--" + name.replace("_", "-"), dest=name)
    args = p.parse_args(["--base-model", ORIGINAL, "--seq-len", "16", "--batch-size", "8",
                         "--eval-examples", "16"])
    assert _settings_from_args(args).model_config.hidden_size == 32
    with pytest.raises(ValueError, match="--preset and --base-model"):
        _settings_from_args(p.parse_args(["--base-model", ORIGINAL, "--preset", "tiny"]))


