"""One pre-norm decoder block: x + Attn(RMSNorm(x)), then h + FFN(RMSNorm(h)).
The feed-forward is a dense SwiGLU in the first `first_k_dense_replace`
layers and DeepSeekMoE after them."""

import keras

from .attention import MultiHeadAttention, MultiHeadLatentAttention
from .config import DeepSeekV3Config
from .mlp import SwiGLUMLP
from .moe import DeepSeekMoE
from .rms_norm import RMSNorm


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class DecoderBlock(keras.layers.Layer):
    def __init__(self, config: DeepSeekV3Config, layer_idx: int, **kwargs):
        super().__init__(**kwargs)
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.input_layernorm = RMSNorm(c.rms_norm_eps, name="input_layernorm")
        attention = MultiHeadLatentAttention if c.attention_type == "mla" else MultiHeadAttention
        self.self_attn = attention(c, name="self_attn")
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")
        if c.is_moe_layer(layer_idx):
            self.mlp = DeepSeekMoE(c, name="mlp")
        else:
            self.mlp = SwiGLUMLP(c, c.intermediate_size, name="mlp")

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, DeepSeekMoE)

    def build(self, input_shape):
        for layer in (self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp):
            layer.build(input_shape)

    def call(self, x, positions, mask, cache=None, cache_index=None, mode=None, training=False,
             padding_mask=None):
        attn_out, new_cache = self.self_attn(
            self.input_layernorm(x), positions, mask, cache=cache, cache_index=cache_index, mode=mode)
        h = x + attn_out
        normed = self.post_attention_layernorm(h)
        # padding_mask [B, S] (1 = real) keeps pad tokens out of MoE routing.
        ffn = (self.mlp(normed, training=training, padding_mask=padding_mask)
               if self.is_moe else self.mlp(normed))
        return h + ffn, new_cache
