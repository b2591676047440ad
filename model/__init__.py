"""DeepSeek-V3 in Keras 3 (keras.ops only: runs under TensorFlow and JAX)."""

from .analysis import kv_cache_bytes, kv_cache_elements_per_token_per_layer, parameter_count
from .config import ConfigError, DeepSeekV3Config
from .presets import PRESETS, get_preset


def __getattr__(name):
    # Keras-dependent symbols load lazily so `model.config` works without Keras.
    if name == "DeepSeekV3ForCausalLM":
        from .deepseek_v3 import DeepSeekV3ForCausalLM
        return DeepSeekV3ForCausalLM
    if name == "load_hf_checkpoint":
        from .hf_checkpoint import load_hf_checkpoint
        return load_hf_checkpoint
    if name == "generate":
        from .generation import generate
        return generate
    if name == "NextTokenLoss":
        from .losses import NextTokenLoss
        return NextTokenLoss
    raise AttributeError(name)


__all__ = [
    "ConfigError", "DeepSeekV3Config", "DeepSeekV3ForCausalLM", "NextTokenLoss", "PRESETS",
    "generate", "get_preset", "kv_cache_bytes", "kv_cache_elements_per_token_per_layer",
    "load_hf_checkpoint", "parameter_count",
]
