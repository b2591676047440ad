"""Hugging Face DeepSeek-V3 import: logits equal transformers'
DeepseekV3ForCausalLM on checkpoints made by tests/fixtures/hf/make_hf_fixtures.py
(no torch needed here: the reference logits are stored with each fixture)."""

import glob
import json
import os
import shutil
import struct

import numpy as np
import pytest

from model import load_hf_checkpoint
from model.hf_checkpoint import CheckpointError, config_from_hf
from model.safetensors_io import load_file, save_file

pytestmark = [pytest.mark.unit, pytest.mark.model]

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "hf")
CASES = sorted(os.path.basename(os.path.dirname(p))
               for p in glob.glob(os.path.join(FIXTURES, "*", "reference.npz")))


def test_fixtures_are_present():
    assert len(CASES) >= 6, CASES


def _relative_error(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    path = os.path.join(FIXTURES, case)
    reference = np.load(os.path.join(path, "reference.npz"))
    model = load_hf_checkpoint(path)
    for ids_key, logits_key in (("input_ids", "logits"), ("input_ids_long", "logits_long")):
        if ids_key not in reference:
            continue
        logits = np.asarray(model(reference[ids_key].astype("int32")))
        assert logits.dtype == np.float32
        assert logits.shape == reference[logits_key].shape
        assert _relative_error(logits, reference[logits_key]) < 1e-4, case


def test_both_config_spellings_give_the_same_rope():
    base = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "q_lora_rank": None,
            "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
            "n_routed_experts": 4, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2,
            "vocab_size": 64, "intermediate_size": 64, "moe_intermediate_size": 16}
    yarn = {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    deepseek = config_from_hf({**base, "rope_theta": 5000.0, "rope_scaling": {"type": "yarn", **yarn}})
    transformers5 = config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, **yarn}})
    assert deepseek.rope_theta == transformers5.rope_theta == 5000.0
    assert deepseek.yarn["factor"] == transformers5.yarn["factor"] == 4.0
    plain = config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    assert plain.yarn is None and plain.q_lora_rank is None


def test_missing_or_misshapen_tensors_are_named(tmp_path):
    source = os.path.join(FIXTURES, "baseline")
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    shard = sorted(glob.glob(str(target / "*.safetensors")))[0]
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("kv_a_layernorm.weight"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="kv_a_layernorm.weight: shape"):
        load_hf_checkpoint(str(target))
    del tensors[key]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=f"lacks tensor {key}"):
        load_hf_checkpoint(str(target))
    os.remove(target / "config.json")
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_hf_checkpoint(str(target))


def _raw_safetensors(path, name, dtype, shape, payload: bytes):
    header = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, len(payload)]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + payload)


def test_reader_widens_bfloat16_and_float8(tmp_path):
    values = np.array([1.0, -2.5, 0.15625, 448.0], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    _raw_safetensors(tmp_path / "a.safetensors", "w", "BF16", [4], bf16)
    np.testing.assert_array_equal(load_file(str(tmp_path / "a.safetensors"))["w"], values)
    # e4m3fn bit patterns: 1.0 = 0x38, -2.5 = 0xC2, 0.15625 = 0x22, 448 = 0x7E.
    _raw_safetensors(tmp_path / "b.safetensors", "w", "F8_E4M3", [2, 2], bytes([0x38, 0xC2, 0x22, 0x7E]))
    np.testing.assert_array_equal(load_file(str(tmp_path / "b.safetensors"))["w"], values.reshape(2, 2))


def test_float8_tables_match_ml_dtypes_for_every_bit_pattern():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from model.safetensors_io import _float8_e4m3_table, _float8_e5m2_table

    patterns = np.arange(256, dtype=np.uint8)
    for ours, theirs in ((_float8_e4m3_table(), ml_dtypes.float8_e4m3fn),
                         (_float8_e5m2_table(), ml_dtypes.float8_e5m2)):
        expected = patterns.view(theirs).astype(np.float32)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected))
        np.testing.assert_array_equal(ours[~np.isnan(ours)], expected[~np.isnan(expected)])
