"""The DeepSeek-V3 causal language model in Keras 3.

embedding -> N decoder blocks (MLA + dense/MoE FFN) -> RMSNorm -> LM head,
with optional multi-token-prediction modules whose loss is added in training.
`model(token_ids)` returns float32 logits [B, S, V]; a dict input
{"token_ids", "padding_mask"} adds a key padding mask (left padding keeps
RoPE positions starting at 0 for every sequence).
"""

from __future__ import annotations

from typing import Optional

import keras
from keras import ops

from .config import DeepSeekV3Config
from .decoder_block import DecoderBlock
from .moe import DeepSeekMoE
from .mtp import MTPModule
from .rms_norm import RMSNorm


def causal_mask(query_length, key_length, cache_index=0, key_padding_mask=None):
    """[B or 1, S, T] bool: key t visible to query s iff t <= cache_index + s
    and the key is not padding."""
    q = ops.arange(query_length, dtype="int32")[:, None] + cache_index
    k = ops.arange(key_length, dtype="int32")[None, :]
    mask = (k <= q)[None]
    if key_padding_mask is not None:
        mask = ops.logical_and(mask, ops.cast(key_padding_mask, "bool")[:, None, :])
    return mask


def positions_from_padding(padding_mask):
    """RoPE positions that start at 0 at each sequence's first real token."""
    m = ops.cast(padding_mask, "int32")
    return ops.maximum(ops.cumsum(m, axis=1) - 1, 0)


def sparse_ce(logits, targets):
    """Per-token cross-entropy in nats, float32."""
    return keras.losses.sparse_categorical_crossentropy(
        targets, ops.cast(logits, "float32"), from_logits=True)


def masked_mean(values, target_mask=None):
    """Mean over real targets (target_mask 1); a plain mean without a mask."""
    if target_mask is None:
        return ops.mean(values)
    m = ops.cast(target_mask, "float32")
    return ops.sum(values * m) / ops.maximum(ops.sum(m), 1.0)


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class DeepSeekV3ForCausalLM(keras.Model):
    def __init__(self, config: DeepSeekV3Config, **kwargs):
        if isinstance(config, dict):
            config = DeepSeekV3Config.from_dict(config)
        super().__init__(**kwargs)
        c = config
        self.config = c
        self.embed_tokens = keras.layers.Embedding(
            c.vocab_size, c.hidden_size, name="embed_tokens",
            embeddings_initializer=keras.initializers.RandomNormal(stddev=c.initializer_range))
        self.decoder_layers = [DecoderBlock(c, i, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, name="norm")
        self.lm_head = None if c.tie_word_embeddings else keras.layers.Dense(
            c.vocab_size, use_bias=False, name="lm_head",
            kernel_initializer=keras.initializers.RandomNormal(stddev=c.initializer_range))
        self.mtp_modules = [MTPModule(c, k + 1, name=f"mtp_{k}") for k in range(c.num_nextn_predict_layers)]
        self.build((None, None))

    def build(self, input_shape=None):
        if self.built:
            return
        hidden_shape = (None, None, self.config.hidden_size)
        self.embed_tokens.build((None, None))
        for layer in self.decoder_layers:
            layer.build(hidden_shape)
        self.norm.build(hidden_shape)
        if self.lm_head is not None:
            self.lm_head.build(hidden_shape)
        for module in self.mtp_modules:
            module.build(hidden_shape)
        self.built = True

    # ------------------------------------------------------------------ parts
    def logits_from_hidden(self, normed_hidden, training=False):
        if self.lm_head is None:
            table = ops.cast(self.embed_tokens.embeddings, normed_hidden.dtype)
            logits = ops.matmul(normed_hidden, ops.transpose(table))
        else:
            # `training` must reach the head explicitly: a float8-quantized Dense
            # only trains its scales in training mode (JAX's stateless_call
            # carries no call context).
            logits = self.lm_head(normed_hidden, training=training)
        return ops.cast(logits, "float32")

    @staticmethod
    def _unpack(inputs):
        if isinstance(inputs, dict):
            return inputs["token_ids"], inputs.get("padding_mask")
        return inputs, None

    def decode(self, token_ids, positions, mask, caches=None, cache_index=None, mode=None,
               training=False, padding_mask=None):
        """Runs the backbone; returns (final hidden before norm, new caches)."""
        x = self.embed_tokens(token_ids)
        new_caches = []
        for i, layer in enumerate(self.decoder_layers):
            x, cache = layer(x, positions, mask, cache=None if caches is None else caches[i],
                             cache_index=cache_index, mode=mode, training=training,
                             padding_mask=padding_mask)
            new_caches.append(cache)
        return x, (new_caches if caches is not None else None)

    def call(self, inputs, training=False, mode=None):
        token_ids, padding_mask = self._unpack(inputs)
        token_ids = ops.cast(token_ids, "int32")
        seq_len = ops.shape(token_ids)[1]
        if padding_mask is None:
            positions = ops.broadcast_to(ops.arange(seq_len, dtype="int32")[None], ops.shape(token_ids))
        else:
            positions = positions_from_padding(padding_mask)
        mask = causal_mask(seq_len, seq_len, 0, padding_mask)
        hidden, _ = self.decode(token_ids, positions, mask, mode=mode, training=training,
                                padding_mask=padding_mask)
        logits = self.logits_from_hidden(self.norm(hidden), training=training)
        if training and self.mtp_modules:
            self.add_loss(self._mtp_loss(token_ids, hidden, positions, mask, training, padding_mask))
        return logits

    def mtp_logits(self, token_ids, hidden, positions, mask, training=False, padding_mask=None):
        """Depth-k logits [B, S-k-1, V] for k = 1..D: position i predicts t_{i+k+1}."""
        out = []
        previous = hidden
        for k, module in enumerate(self.mtp_modules, start=1):
            span = ops.shape(token_ids)[1] - k
            previous = previous[:, :span]
            next_embeddings = self.embed_tokens(token_ids[:, k:])
            previous, normed = module(
                previous, next_embeddings, positions[:, :span], mask[:, :span, :span],
                training=training,
                padding_mask=None if padding_mask is None else padding_mask[:, :span])
            out.append(self.logits_from_hidden(normed[:, :-1], training=training))
        return out

    def _mtp_loss(self, token_ids, hidden, positions, mask, training, padding_mask=None):
        """lambda / D * sum_k CE(module k's prediction of t_{i+k+1}), averaged
        over real (position, target) pairs (pad targets ignored)."""
        c = self.config
        total = 0.0
        for k, logits in enumerate(self.mtp_logits(token_ids, hidden, positions, mask, training,
                                                   padding_mask), start=1):
            # A target counts when it and the position predicting it are real
            # (with left padding the last pad would otherwise predict t_0..t_k).
            target_mask = None if padding_mask is None else (
                ops.cast(padding_mask[:, k + 1:], "float32")
                * ops.cast(padding_mask[:, : ops.shape(padding_mask)[1] - k - 1], "float32"))
            total = total + masked_mean(sparse_ce(logits, token_ids[:, k + 1:]), target_mask)
        return c.mtp_loss_weight / len(self.mtp_modules) * total

    # ------------------------------------------------------------ KV caching
    def init_caches(self, batch_size: int, max_length: int, mode: Optional[str] = None,
                    dtype: str = "float32"):
        """One zeroed cache per layer; absorbed MLA caches only the latent."""
        return [layer.self_attn.init_cache(batch_size, max_length, dtype, mode)
                for layer in self.decoder_layers]

    def call_with_cache(self, token_ids, positions, caches, cache_index, key_padding_mask):
        """Feeds S new tokens written at `cache_index`; returns (logits, caches).
        key_padding_mask [B, T] marks valid cache slots (the new ones included)."""
        token_ids = ops.cast(token_ids, "int32")
        seq_len = ops.shape(token_ids)[1]
        max_length = ops.shape(caches[0][0])[1]
        mask = causal_mask(seq_len, max_length, cache_index, key_padding_mask)
        hidden, caches = self.decode(token_ids, positions, mask, caches, cache_index)
        return self.logits_from_hidden(self.norm(hidden)), caches

    # ------------------------------------------------------------ statistics
    def moe_layers(self):
        return [layer.mlp for layer in self.decoder_layers if isinstance(layer.mlp, DeepSeekMoE)]

    def get_expert_utilization(self) -> dict:
        return {layer.name: layer.mlp.get_expert_utilization()
                for layer in self.decoder_layers if isinstance(layer.mlp, DeepSeekMoE)}

    def reset_expert_counts(self) -> None:
        for moe in self.moe_layers():
            moe.reset_expert_counts()

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(DeepSeekV3Config.from_dict(config["config"]), name=config.get("name"))
