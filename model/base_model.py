"""A base model to fine-tune from: a Hugging Face DeepSeek-V3 directory
(`config.json` + `*.safetensors`, as published or as our Trainer exports it
next to the SavedModel, `model.hf_export`), described without loading its
weights: the config, the tensor names and shapes of the safetensors headers,
and an identity digest (config.json bytes, each file's name, size,
and the data: whole up to 16 MiB a file, else 8 sampled 64 KiB windows)
that the training fingerprint carries.

The model config is the checkpoint's. An override that changes a weight
shape is refused (`SHAPE_FIELDS`); the others (routing, balancing, RoPE
reach, MTP loss weight, ...) stay free. No Keras, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from typing import Any, Dict, List, Mapping, Tuple

from .config import ConfigError, DeepSeekV3Config
from .hf_checkpoint import CheckpointError, config_from_hf, read_hf_config
from .safetensors_io import SafetensorsError, read_header

#: DeepSeekV3Config fields that fix a weight's shape (or which weights exist).
SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "attention_bias", "attention_type",
    "mha_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace",
    "tie_word_embeddings",
)

#: A SentencePiece model in the directory (our export of a run on text
#: writes one) is the base model's tokenizer.
TOKENIZER_FILE = "tokenizer.model"


class BaseModelError(ValueError):
    """A base-model directory that cannot start this training; one line naming the file."""




def expected_tensors(config: DeepSeekV3Config) -> List[Tuple[str, ...]]:
    """The tensors a checkpoint needs for `config`, each as its alternative
    key spellings (per-expert or fused routed experts)."""
    c = config
    names: List[Tuple[str, ...]] = [("model.embed_tokens.weight",), ("model.norm.weight",)]
    if not c.tie_word_embeddings:
        names.append(("lm_head.weight",))

    def linear(prefix, bias=False):
        names.append((prefix + ".weight",))
        if bias:
            names.append((prefix + ".bias",))

    def block(prefix, index):
        names.extend([(prefix + ".input_layernorm.weight",), (prefix + ".post_attention_layernorm.weight",)])
        a = prefix + ".self_attn"
        if c.q_lora_rank is None:
            linear(a + ".q_proj")
        else:
            linear(a + ".q_a_proj", c.attention_bias)
            names.append((a + ".q_a_layernorm.weight",))
            linear(a + ".q_b_proj")
        linear(a + ".kv_a_proj_with_mqa", c.attention_bias)
        names.append((a + ".kv_a_layernorm.weight",))
        linear(a + ".kv_b_proj")
        linear(a + ".o_proj", c.attention_bias)
        m = prefix + ".mlp"
        if index < c.first_k_dense_replace:
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear(f"{m}.{name}")
            return
        names.append((m + ".gate.weight",))
        for part, fused in (("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj"),
                            ("down_proj", "down_proj")):
            for e in range(c.n_routed_experts):
                names.append((f"{m}.experts.{e}.{part}.weight", f"{m}.experts.{fused}"))
        if c.n_shared_experts:
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear(f"{m}.shared_experts.{name}")

    for i in range(c.num_hidden_layers):
        block(f"model.layers.{i}", i)
    for k in range(c.num_nextn_predict_layers):
        index = c.num_hidden_layers + k
        prefix = f"model.layers.{index}"
        names.extend([(prefix + ".enorm.weight",), (prefix + ".hnorm.weight",),
                      (prefix + ".eh_proj.weight",), (prefix + ".shared_head.norm.weight",)])
        block(prefix, index)
    return names


#: Files up to this size are digested whole; larger ones by their header and
#: `_WINDOWS` evenly spaced windows of `_WINDOW` bytes (two checkpoints of one
#: architecture share headers; their weights differ everywhere).
_WHOLE_FILE_BYTES = 16 << 20
_WINDOWS, _WINDOW = 8, 64 << 10


def _digest_file(digest, file: str, data_start: int) -> None:
    """`data_start`: where the file's data section begins (read_header)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        if size <= _WHOLE_FILE_BYTES:
            for chunk in iter(lambda: f.read(_WINDOW), b""):
                digest.update(chunk)
            return
        digest.update(f.read(data_start))
        step = (size - data_start - _WINDOW) // (_WINDOWS - 1)
        for i in range(_WINDOWS):
            f.seek(data_start + i * step)
            digest.update(f.read(_WINDOW))


@dataclasses.dataclass(frozen=True)
class BaseModel:
    path: str                          # absolute
    hf: Mapping[str, Any]              # config.json
    shapes: Mapping[str, Tuple[int, ...]]  # every tensor of the safetensors headers
    identity: str                      # digest of config.json and the safetensors (`_digest_file`)

    @classmethod
    def read(cls, path: str) -> "BaseModel":
        """Reads config.json and the safetensors headers (not the weights)."""
        if "://" in str(path):
            raise BaseModelError(f"base_model: {path!r} must be a local directory (the engine reads "
                                 f"its safetensors by file)")
        if not os.path.isdir(path):
            raise BaseModelError(f"base_model: {path!r} is not a directory")
        path = os.path.abspath(path)
        try:
            hf = read_hf_config(path)
        except CheckpointError as e:
            raise BaseModelError(str(e)) from None
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise BaseModelError(f"{path}: no *.safetensors files beside config.json")
        digest = hashlib.sha256()
        with open(os.path.join(path, "config.json"), "rb") as f:
            digest.update(f.read())
        shapes: Dict[str, Tuple[int, ...]] = {}
        for file in files:
            try:
                header, data_start = read_header(file)
            except SafetensorsError as e:
                raise BaseModelError(str(e)) from None
            digest.update(f"\0{os.path.basename(file)}\0{os.path.getsize(file)}\0".encode())
            _digest_file(digest, file, data_start)
            for name, info in header.items():
                if name in shapes:
                    raise BaseModelError(f"{file}: tensor {name} appears in more than one shard")
                shapes[name] = tuple(info["shape"])
        return cls(path=path, hf=hf, shapes=shapes, identity=digest.hexdigest()[:20])

    @property
    def config_file(self) -> str:
        return os.path.join(self.path, "config.json")

    @property
    def mtp_layers(self) -> int:
        """MTP layers that config.json declares and the weights hold."""
        declared = self.hf.get("num_nextn_predict_layers") or 0
        layers = self.hf.get("num_hidden_layers") or 0
        present = 0
        while present < declared and f"model.layers.{layers + present}.eh_proj.weight" in self.shapes:
            present += 1
        return present

    @property
    def tokenizer_file(self):
        """Its SentencePiece model: `tokenizer.model`, or where our SavedModel
        export keeps it (`assets.extra/tokenizer.model`); else None."""
        for path in (os.path.join(self.path, TOKENIZER_FILE),
                     os.path.join(self.path, "assets.extra", TOKENIZER_FILE)):
            if os.path.isfile(path):
                return path
        return None

    def model_config(self, overrides: Mapping[str, Any] = None) -> DeepSeekV3Config:
        """The checkpoint's config with `overrides` (model_overrides): a
        shape-changing one is refused naming it; MTP layers are kept when
        the weights hold them (num_nextn_predict_layers 0 drops them)."""
        overrides = dict(overrides or {})
        try:
            own = config_from_hf(dict(self.hf), num_nextn_predict_layers=self.mtp_layers)
        except (ConfigError, TypeError) as e:
            raise BaseModelError(f"{self.config_file}: {e}") from None
        for name in SHAPE_FIELDS:
            if name in overrides and overrides[name] != getattr(own, name):
                raise BaseModelError(
                    f"model_overrides.{name}: {overrides[name]!r} would change a weight shape of the "
                    f"base model ({self.config_file} has {getattr(own, name)!r}); fine-tuning keeps "
                    f"the checkpoint's shapes")
        mtp = overrides.get("num_nextn_predict_layers", own.num_nextn_predict_layers)
        if isinstance(mtp, int) and mtp > self.mtp_layers:
            raise BaseModelError(f"model_overrides.num_nextn_predict_layers: {mtp} exceeds the "
                                 f"{self.mtp_layers} MTP layer(s) whose weights {self.path} holds")
        try:
            config = DeepSeekV3Config.from_dict({**own.to_dict(), **overrides})
        except (ConfigError, TypeError) as e:
            raise BaseModelError(f"model_overrides: {e}") from None
        self.check_fits(config)
        return config

    def check_fits(self, config: DeepSeekV3Config) -> None:
        """BaseModelError unless the safetensors hold every weight of `config`
        (names, and the embedding's shape)."""
        missing = [names[0] for names in expected_tensors(config)
                   if not any(name in self.shapes for name in names)]
        if missing:
            raise BaseModelError(f"{self.path}: the safetensors lack {len(missing)} tensor(s) that "
                                 f"config.json needs, e.g. {missing[:3]}")
        embed = self.shapes["model.embed_tokens.weight"]
        if tuple(embed) != (config.vocab_size, config.hidden_size):
            raise BaseModelError(f"{self.path}: model.embed_tokens.weight is {list(embed)}, config.json "
                                 f"says vocab_size {config.vocab_size} x hidden_size {config.hidden_size}")
