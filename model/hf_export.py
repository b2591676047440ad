"""Write our model in the Hugging Face DeepSeek-V3 layout (the inverse of
`model.hf_checkpoint`): `config.json` in the deepseek-ai spelling and one
float32 `model.safetensors` with per-expert keys, the router biases
(`e_score_correction_bias`) and the MTP layers at `model.layers.<L + k>`.

The Trainer writes these next to the SavedModel, so a pushed version is a
base model for the next fine-tune (`--base-model serving/<version>`) and
loads in transformers. NumPy + Keras only.
"""

from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np

from .hf_checkpoint import DIRECT_KEYS
from .safetensors_io import save_file

#: The file names a base-model directory holds.
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class ExportError(ValueError):
    """A model the Hugging Face layout cannot describe."""


def hf_config(config) -> dict:
    """config.json for a DeepSeekV3Config (what `config_from_hf` reads back)."""
    if config.attention_type != "mla" or config.scoring_func != "sigmoid":
        raise ExportError(f"the Hugging Face DeepSeek-V3 layout has MLA attention and sigmoid routing "
                          f"only (this model: {config.attention_type}, {config.scoring_func})")
    # The keys the importer maps one to one, and three it reads with care.
    keys = DIRECT_KEYS + ("n_shared_experts", "rope_theta", "num_nextn_predict_layers")
    out = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
           "hidden_act": "silu", "num_key_value_heads": config.num_attention_heads,
           "scoring_func": "sigmoid", "topk_method": "noaux_tc", "torch_dtype": "float32",
           **{key: getattr(config, key) for key in keys}}
    if config.rope_scaling:
        out["rope_scaling"] = dict(config.rope_scaling)  # config_from_hf reads either spelling
    return out


def _linear(out: dict, dense, key: str) -> None:
    out[key + ".weight"] = np.asarray(dense.kernel).T
    if dense.use_bias:
        out[key + ".bias"] = np.asarray(dense.bias)


def _block(out: dict, block, prefix: str, config) -> None:
    out[prefix + ".input_layernorm.weight"] = np.asarray(block.input_layernorm.scale)
    out[prefix + ".post_attention_layernorm.weight"] = np.asarray(block.post_attention_layernorm.scale)
    attn, a = block.self_attn, prefix + ".self_attn"
    if config.q_lora_rank is None:
        _linear(out, attn.q_proj, a + ".q_proj")
    else:
        _linear(out, attn.q_a_proj, a + ".q_a_proj")
        out[a + ".q_a_layernorm.weight"] = np.asarray(attn.q_a_layernorm.scale)
        _linear(out, attn.q_b_proj, a + ".q_b_proj")
    _linear(out, attn.kv_a_proj_with_mqa, a + ".kv_a_proj_with_mqa")
    out[a + ".kv_a_layernorm.weight"] = np.asarray(attn.kv_a_layernorm.scale)
    _linear(out, attn.kv_b_proj, a + ".kv_b_proj")
    _linear(out, attn.o_proj, a + ".o_proj")
    mlp, m = block.mlp, prefix + ".mlp"
    if not block.is_moe:
        for name in ("gate_proj", "up_proj", "down_proj"):
            _linear(out, getattr(mlp, name), f"{m}.{name}")
        return
    out[m + ".gate.weight"] = np.asarray(mlp.gate.weight).T
    out[m + ".gate.e_score_correction_bias"] = np.asarray(mlp.gate.e_score_correction_bias)
    for ours, theirs in (("experts_gate_proj", "gate_proj"), ("experts_up_proj", "up_proj"),
                         ("experts_down_proj", "down_proj")):
        stacked = np.asarray(getattr(mlp, ours))
        for e in range(config.n_routed_experts):
            out[f"{m}.experts.{e}.{theirs}.weight"] = stacked[e].T
    if mlp.shared_experts is not None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            _linear(out, getattr(mlp.shared_experts, name), f"{m}.shared_experts.{name}")


def hf_state_dict(model) -> Dict[str, np.ndarray]:
    """Every weight of a DeepSeekV3ForCausalLM under its Hugging Face key, float32."""
    c = model.config
    out = {"model.embed_tokens.weight": np.asarray(model.embed_tokens.embeddings),
           "model.norm.weight": np.asarray(model.norm.scale)}
    if model.lm_head is not None:
        _linear(out, model.lm_head, "lm_head")
    for i, layer in enumerate(model.decoder_layers):
        _block(out, layer, f"model.layers.{i}", c)
    for k, module in enumerate(model.mtp_modules):
        prefix = f"model.layers.{c.num_hidden_layers + k}"
        out[prefix + ".enorm.weight"] = np.asarray(module.enorm.scale)
        out[prefix + ".hnorm.weight"] = np.asarray(module.hnorm.scale)
        _linear(out, module.eh_proj, prefix + ".eh_proj")
        out[prefix + ".shared_head.norm.weight"] = np.asarray(module.shared_head_norm.scale)
        _block(out, module.block, prefix, c)
    return {key: np.ascontiguousarray(value, np.float32) for key, value in out.items()}


def save_hf_checkpoint(model, directory: str) -> str:
    """Writes config.json and model.safetensors into `directory` (a local
    path); returns it."""
    config = hf_config(model.config)
    os.makedirs(directory, exist_ok=True)
    save_file(hf_state_dict(model), os.path.join(directory, WEIGHTS_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return directory
