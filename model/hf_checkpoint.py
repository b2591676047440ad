"""Import a DeepSeek-V3 checkpoint in the Hugging Face layout.

`load_hf_checkpoint(path)` reads `config.json` (the deepseek-ai spelling with
`rope_scaling`, or transformers 5's `rope_parameters`), every `*.safetensors`
shard, and fills a `DeepSeekV3ForCausalLM`. Expert weights may be stored per
expert (`mlp.experts.E.gate_proj.weight`) or fused (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`); block-quantized FP8 weights with `weight_scale_inv`
are dequantized. Multi-token-prediction layers (`model.layers.N..`) are
loaded when the model keeps MTP modules and skipped otherwise.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict

import numpy as np

from .config import ConfigError, DeepSeekV3Config
from .safetensors_io import iter_tensors

# HF config keys that map one to one onto DeepSeekV3Config fields.
DIRECT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
    "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "rope_interleave", "initializer_range",
)


# transformers' DeepseekV3Config defaults, used for keys a config.json omits
# (they are the published 671B dimensions, not ours).
_HF_DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "rope_interleave": True, "attention_bias": False,
    "tie_word_embeddings": False, "initializer_range": 0.02,
}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or our model."""


def config_from_hf(hf: dict, **overrides) -> DeepSeekV3Config:
    """Translates a Hugging Face DeepSeek-V3 config dict into our config."""
    values = {key: hf[key] if hf.get(key) is not None else _HF_DEFAULTS[key]
              for key in DIRECT_KEYS}
    if "q_lora_rank" in hf:
        values["q_lora_rank"] = hf["q_lora_rank"]  # None is meaningful: no query LoRA
    shared = hf.get("n_shared_experts", _HF_DEFAULTS["n_shared_experts"])
    values["n_shared_experts"] = shared or 0
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    # DeepSeek-V3 (and transformers' DeepseekV3 model) always score experts with
    # a sigmoid and route with noaux_tc; a V2-style `scoring_func` is ignored there.
    values["scoring_func"] = "sigmoid"
    # transformers 5 folds rope_theta and the scaling into rope_parameters.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    values["rope_theta"] = float(theta)
    if scaling is None and rope:
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", None):
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in ("default", None):
            scaling = None
        else:
            scaling = {k: v for k, v in scaling.items() if v is not None and k != "rope_theta"}
    values["rope_scaling"] = scaling
    values["num_nextn_predict_layers"] = 0  # MTP weights are opt-in, see load_hf_checkpoint
    values["expert_capacity_factor"] = None
    values.update(overrides)
    return DeepSeekV3Config(**values)


def _dequantize_blockwise(weight: np.ndarray, scale_inv: np.ndarray, block) -> np.ndarray:
    rows, cols = weight.shape
    br, bc = block
    full = np.repeat(np.repeat(scale_inv, br, axis=0), bc, axis=1)[:rows, :cols]
    return (weight.astype(np.float32) * full).astype(np.float32)


def read_state_dict(path: str, block=(128, 128)) -> Dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as float32/int NumPy arrays."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    tensors: Dict[str, np.ndarray] = {}
    for file in files:
        for name, array in iter_tensors(file):
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name} appears in more than one shard")
            tensors[name] = array
    for name in [n for n in tensors if n.endswith("_scale_inv")]:
        weight_name = name[: -len("_scale_inv")]
        if weight_name not in tensors:
            raise CheckpointError(f"{path}: {name} has no weight {weight_name}")
        tensors[weight_name] = _dequantize_blockwise(tensors[weight_name], tensors.pop(name), block)
    return tensors


class _Assigner:
    """Copies checkpoint tensors into model variables, checking shapes, and
    remembers what was filled so nothing is silently left at its init."""

    def __init__(self, tensors: Dict[str, np.ndarray]):
        self.tensors = tensors
        self.used = set()
        self.filled = set()

    def take(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise CheckpointError(f"checkpoint lacks tensor {key}")
        self.used.add(key)
        return self.tensors[key]

    def has(self, key: str) -> bool:
        return key in self.tensors

    def assign(self, variable, value: np.ndarray, key: str) -> None:
        if tuple(variable.shape) != tuple(value.shape):
            raise CheckpointError(f"{key}: shape {tuple(value.shape)} does not fit "
                                  f"{variable.path} {tuple(variable.shape)}")
        variable.assign(value.astype(np.float32))
        self.filled.add(id(variable))

    def linear(self, dense, prefix: str) -> None:
        self.assign(dense.kernel, self.take(prefix + ".weight").T, prefix + ".weight")
        if dense.use_bias:
            self.assign(dense.bias, self.take(prefix + ".bias"), prefix + ".bias")

    def norm(self, layer, prefix: str) -> None:
        self.assign(layer.scale, self.take(prefix + ".weight"), prefix + ".weight")


def _load_attention(a: _Assigner, attn, prefix: str, config: DeepSeekV3Config) -> None:
    if config.q_lora_rank is None:
        a.linear(attn.q_proj, prefix + ".q_proj")
    else:
        a.linear(attn.q_a_proj, prefix + ".q_a_proj")
        a.norm(attn.q_a_layernorm, prefix + ".q_a_layernorm")
        a.linear(attn.q_b_proj, prefix + ".q_b_proj")
    a.linear(attn.kv_a_proj_with_mqa, prefix + ".kv_a_proj_with_mqa")
    a.norm(attn.kv_a_layernorm, prefix + ".kv_a_layernorm")
    a.linear(attn.kv_b_proj, prefix + ".kv_b_proj")
    a.linear(attn.o_proj, prefix + ".o_proj")


def _load_mlp(a: _Assigner, mlp, prefix: str) -> None:
    for name in ("gate_proj", "up_proj", "down_proj"):
        a.linear(getattr(mlp, name), f"{prefix}.{name}")


def _load_moe(a: _Assigner, moe, prefix: str, config: DeepSeekV3Config) -> None:
    a.assign(moe.gate.weight, a.take(prefix + ".gate.weight").T, prefix + ".gate.weight")
    bias_key = prefix + ".gate.e_score_correction_bias"
    if a.has(bias_key):
        a.assign(moe.gate.e_score_correction_bias, a.take(bias_key), bias_key)
    else:
        a.filled.add(id(moe.gate.e_score_correction_bias))  # zero bias: plain top-k
    experts = config.n_routed_experts
    if a.has(prefix + ".experts.gate_up_proj"):
        # Fused layout: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
        gate_up = a.take(prefix + ".experts.gate_up_proj")
        inner = gate_up.shape[1] // 2
        a.assign(moe.experts_gate_proj, np.transpose(gate_up[:, :inner], (0, 2, 1)), prefix + ".experts.gate_up_proj")
        a.assign(moe.experts_up_proj, np.transpose(gate_up[:, inner:], (0, 2, 1)), prefix + ".experts.gate_up_proj")
        a.assign(moe.experts_down_proj, np.transpose(a.take(prefix + ".experts.down_proj"), (0, 2, 1)),
                 prefix + ".experts.down_proj")
    else:
        for ours, theirs in (("experts_gate_proj", "gate_proj"), ("experts_up_proj", "up_proj"),
                             ("experts_down_proj", "down_proj")):
            stacked = np.stack([a.take(f"{prefix}.experts.{e}.{theirs}.weight").T for e in range(experts)])
            a.assign(getattr(moe, ours), stacked, f"{prefix}.experts.*.{theirs}.weight")
    if moe.shared_experts is not None:
        _load_mlp(a, moe.shared_experts, prefix + ".shared_experts")


def _load_block(a: _Assigner, block, prefix: str, config: DeepSeekV3Config) -> None:
    a.norm(block.input_layernorm, prefix + ".input_layernorm")
    a.norm(block.post_attention_layernorm, prefix + ".post_attention_layernorm")
    _load_attention(a, block.self_attn, prefix + ".self_attn", config)
    if block.is_moe:
        _load_moe(a, block.mlp, prefix + ".mlp", config)
    else:
        _load_mlp(a, block.mlp, prefix + ".mlp")


def read_hf_config(path: str) -> dict:
    """The parsed `config.json` of a checkpoint directory; CheckpointError
    (one line naming the file) when it is missing or does not parse."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: not found (a Hugging Face checkpoint directory "
                              f"holds config.json and *.safetensors)")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path}: must hold a JSON object, got {type(hf).__name__}")
    return hf


def load_hf_checkpoint(path: str, load_mtp: bool = False, **config_overrides):
    """Builds our model from a Hugging Face DeepSeek-V3 checkpoint directory.

    load_mtp: also load the multi-token-prediction layers stored after the
    main layers (`num_nextn_predict_layers` in config.json).
    """
    from .deepseek_v3 import DeepSeekV3ForCausalLM  # keras import only when used

    hf = read_hf_config(path)
    if load_mtp:
        config_overrides.setdefault("num_nextn_predict_layers", hf.get("num_nextn_predict_layers", 0))
    model = DeepSeekV3ForCausalLM(config_from_hf(hf, **config_overrides))
    load_weights(model, path, hf)
    return model


def load_weights(model, path: str, hf: dict = None) -> None:
    """Fills an existing `DeepSeekV3ForCausalLM` from the checkpoint at
    `path` (each *.safetensors file read in turn). Every model variable must
    be filled and every tensor used, except MTP layers beyond the model's
    own `num_nextn_predict_layers`; CheckpointError otherwise."""
    hf = read_hf_config(path) if hf is None else hf
    config = model.config
    block = tuple((hf.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    tensors = read_state_dict(path, block)
    a = _Assigner(tensors)

    a.assign(model.embed_tokens.embeddings, a.take("model.embed_tokens.weight"), "model.embed_tokens.weight")
    a.norm(model.norm, "model.norm")
    if model.lm_head is not None:
        a.linear(model.lm_head, "lm_head")
    for i, layer in enumerate(model.decoder_layers):
        _load_block(a, layer, f"model.layers.{i}", config)
    for k, module in enumerate(model.mtp_modules):
        prefix = f"model.layers.{config.num_hidden_layers + k}"
        a.norm(module.enorm, prefix + ".enorm")
        a.norm(module.hnorm, prefix + ".hnorm")
        a.linear(module.eh_proj, prefix + ".eh_proj")
        a.norm(module.shared_head_norm, prefix + ".shared_head.norm")
        _load_block(a, module.block, prefix, config)
        # The MTP module shares the main embedding and head; stored copies are
        # duplicates of those.
        a.used.update(key for key in tensors if key.startswith(prefix + ".embed_tokens")
                      or key.startswith(prefix + ".shared_head.head"))

    kept_layers = config.num_hidden_layers + len(model.mtp_modules)
    mtp_prefix = re.compile(r"model\.layers\.(\d+)\.")
    unused = []
    for key in tensors:
        if key in a.used or key.endswith("rotary_emb.inv_freq"):
            continue
        match = mtp_prefix.match(key)
        if match and int(match.group(1)) >= kept_layers:
            continue  # MTP layers present but not kept by the model
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if ".shared_experts." in key and tensors[key].size == 0:
            continue  # n_shared_experts = 0 leaves zero-width tensors behind
        unused.append(key)
    if unused:
        raise CheckpointError(f"{path}: tensors not used by the model: {sorted(unused)[:10]}")
    stats = {"expert_load", "dropped_tokens", "tokens_seen"}
    missing = [v.path for v in model.variables
               if id(v) not in a.filled and v.path.split("/")[-1] not in stats]
    if missing:
        raise CheckpointError(f"{path}: model variables not in the checkpoint: {missing[:10]}")
