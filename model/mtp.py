"""Multi-token prediction (DeepSeek-V3 paper, section 2.2).

Module k (1..D) keeps the causal chain: at position i it combines the
previous depth's hidden state h^{k-1}_i with the embedding of token t_{i+k},
    h'_i = W_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]
runs one decoder block over h', and predicts t_{i+k+1} through its own
RMSNorm and the main model's (shared) output head. Embedding and output head
are shared with the main model; the modules are used only for the training
loss (and may be dropped at inference).
"""

import keras
from keras import ops

from .config import DeepSeekV3Config
from .decoder_block import DecoderBlock
from .rms_norm import RMSNorm


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class MTPModule(keras.layers.Layer):
    def __init__(self, config: DeepSeekV3Config, depth: int, **kwargs):
        super().__init__(**kwargs)
        c = config
        self.config, self.depth = c, depth
        self.enorm = RMSNorm(c.rms_norm_eps, name="enorm")
        self.hnorm = RMSNorm(c.rms_norm_eps, name="hnorm")
        self.eh_proj = keras.layers.Dense(
            c.hidden_size, use_bias=False, name="eh_proj",
            kernel_initializer=keras.initializers.RandomNormal(stddev=c.initializer_range))
        self.block = DecoderBlock(c, c.num_hidden_layers + depth - 1, name="block")
        self.shared_head_norm = RMSNorm(c.rms_norm_eps, name="shared_head_norm")

    def build(self, input_shape):
        hidden = input_shape[-1]
        self.enorm.build(input_shape)
        self.hnorm.build(input_shape)
        self.eh_proj.build((None, 2 * hidden))
        self.block.build(input_shape)
        self.shared_head_norm.build(input_shape)

    def call(self, previous_hidden, next_embeddings, positions, mask, training=False,
             padding_mask=None):
        """previous_hidden, next_embeddings: [B, S', hidden] already aligned
        (h^{k-1}_i with Emb(t_{i+k})). Returns h^k normalised for the head."""
        merged = self.eh_proj(ops.concatenate(
            [self.enorm(next_embeddings), self.hnorm(previous_hidden)], axis=-1))
        hidden, _ = self.block(merged, positions, mask, training=training,
                               padding_mask=padding_mask)
        return hidden, self.shared_head_norm(hidden)
