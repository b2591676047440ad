"""Exports of the trained model: a float32 inference copy, the Keras-native
`model.keras`, and a TF SavedModel (Keras 3 `ExportArchive`) with three
signatures:

* ``serving_default(examples: tf.string [B])`` -- serialized tf.Examples with
  an int64 `input_ids` feature of length seq_len -> ``logits`` float32
  [B, L, V] and ``token_loss`` float32 [B, L-1], the next-token
  cross-entropy of each position (position i scored against token i+1).
* ``generate(token_ids int32 [B, P] (left-padded), padding_mask int32 [B, P],
  max_new_tokens int32 [], temperature float32 [], top_k int32 [] (0 = off),
  seed int32 [])`` -> ``tokens`` int32 [B, max_new_tokens]. The graph
  mirrors `model.generation.generate`: one prefill over the prompt into a KV
  cache of length P + max_new_tokens, then a `tf.while_loop` of one-token
  decode steps. temperature <= 0 is greedy; otherwise the logits are divided
  by the temperature, optionally restricted to the top_k, and sampled with
  `tf.random.stateless_categorical` seeded by (seed, step) -- reproducible
  for a given seed, though not the same draws as the NumPy reference.
  There is no EOS handling: every row gets exactly max_new_tokens tokens.
* ``token_metrics(examples: tf.string [B])`` -- the per-example scalars
  TensorFlow Model Analysis aggregates (`components.evaluation`):
  ``example_loss`` float32 [B], the mean next-token cross-entropy of the
  example over its target positions, ``token_count`` float32 [B], the
  number of those positions (the weight that turns the mean of example
  losses into the corpus per-token loss), and ``correct_tokens`` float32
  [B], how many targets are the argmax of the logits. Every `input_ids`
  value is a real token (fixed-length records, no padding id), so every
  position after the first is a target.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from components.training_loop import dtype_policy, relative_variable_path


# -------------------------------------------------------------- the copy
def inference_model(trained, config):
    """A float32, non-quantized, non-distributed copy of `trained`.

    Mixed-precision and float8 training keep float32 master weights, so the
    copy holds exactly the trained values; float8 scale / amax-history
    variables (training-time bookkeeping of the quantized Dense layers) have
    no counterpart and are dropped. The MoE load counters are reset."""
    from model.deepseek_v3 import DeepSeekV3ForCausalLM

    if tf.distribute.in_cross_replica_context() and tf.distribute.has_strategy():
        raise RuntimeError("inference_model: build the copy outside the training strategy's scope")
    with dtype_policy("float32"):
        copy = DeepSeekV3ForCausalLM(config)
    source = {relative_variable_path(v): v for v in trained.weights}
    missing = []
    for variable in copy.weights:
        key = relative_variable_path(variable)
        if key not in source:
            missing.append(key)
            continue
        variable.assign(tf.cast(source[key].numpy(), variable.dtype))
    if missing:
        raise ValueError(f"inference_model: the trained model has no variables {missing}")
    copy.reset_expert_counts()
    return copy


def save_keras_model(model, path: str) -> str:
    tf.io.gfile.makedirs(os.path.dirname(path))
    model.save(path)
    return path


# ------------------------------------------------------------ signatures
def serving_fn(model, seq_len: int):
    from model.deepseek_v3 import sparse_ce

    spec = {"input_ids": tf.io.FixedLenFeature([int(seq_len)], tf.int64)}

    def serve(examples):
        parsed = tf.io.parse_example(examples, spec)
        ids = tf.cast(parsed["input_ids"], tf.int32)
        logits = tf.cast(model(ids, training=False), tf.float32)
        token_loss = tf.cast(sparse_ce(logits[:, :-1], ids[:, 1:]), tf.float32)
        return {"logits": logits, "token_loss": token_loss}

    return serve


def token_metrics_fn(model, seq_len: int):
    from model.deepseek_v3 import sparse_ce

    spec = {"input_ids": tf.io.FixedLenFeature([int(seq_len)], tf.int64)}

    def token_metrics(examples):
        ids = tf.cast(tf.io.parse_example(examples, spec)["input_ids"], tf.int32)
        logits = tf.cast(model(ids, training=False), tf.float32)[:, :-1]
        targets = ids[:, 1:]
        losses = tf.cast(sparse_ce(logits, targets), tf.float32)
        count = tf.cast(tf.shape(targets)[1], tf.float32)
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), targets), tf.float32)
        return {"example_loss": tf.reduce_mean(losses, axis=1),
                "token_count": tf.fill(tf.shape(losses)[:1], count),
                "correct_tokens": tf.reduce_sum(correct, axis=1)}

    return token_metrics


def _sample(logits, temperature, top_k, seed, step):
    """Next tokens [B] from logits [B, V]: greedy when temperature <= 0."""
    logits = tf.cast(logits, tf.float32)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    vocab = tf.shape(logits)[-1]
    scaled = logits / tf.where(temperature > 0, temperature, tf.ones_like(temperature))

    def restrict():
        kth = tf.math.top_k(scaled, k=top_k).values[:, -1:]
        return tf.where(scaled < kth, tf.constant(-float("inf"), scaled.dtype), scaled)

    filtered = tf.cond(tf.logical_and(top_k > 0, top_k < vocab), restrict, lambda: scaled)
    sampled = tf.random.stateless_categorical(
        filtered, 1, seed=tf.stack([seed, step]), dtype=tf.int32)[:, 0]
    return tf.where(temperature > 0, sampled, greedy)


def generate_fn(model):
    max_positions = model.config.max_position_embeddings

    def generate(token_ids, padding_mask, max_new_tokens, temperature, top_k, seed):
        token_ids = tf.cast(token_ids, tf.int32)
        padding_mask = tf.cast(padding_mask, tf.int32)
        batch, width = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
        max_new = tf.maximum(max_new_tokens, 0)
        total = width + max_new
        checks = [
            tf.debugging.assert_less_equal(
                total, max_positions,
                message=f"generate: prompt length + max_new_tokens exceeds "
                        f"max_position_embeddings={max_positions}"),
            tf.debugging.assert_equal(tf.shape(padding_mask), tf.shape(token_ids),
                                      message="generate: padding_mask must match token_ids"),
        ]
        with tf.control_dependencies(checks):
            total = tf.identity(total)

        caches = model.init_caches(batch, total)
        key_mask = tf.concat([padding_mask, tf.zeros([batch, max_new], tf.int32)], axis=1)
        positions = tf.maximum(tf.cumsum(padding_mask, axis=1) - 1, 0)
        lengths = tf.reduce_sum(padding_mask, axis=1)
        logits, caches = model.call_with_cache(token_ids, positions, caches, 0, key_mask)
        last = tf.cast(logits[:, -1], tf.float32)
        tokens = tf.zeros([batch, max_new], tf.int32)

        def cond(step, *_):
            return step < max_new

        def body(step, last, caches, key_mask, tokens):
            token = _sample(last, temperature, top_k, seed, step)
            tokens = tokens + token[:, None] * tf.one_hot(step, max_new, dtype=tf.int32)[None, :]

            def decode():
                index = width + step
                mask = tf.maximum(key_mask, tf.one_hot(index, total, dtype=tf.int32)[None, :])
                out, new_caches = model.call_with_cache(
                    token[:, None], (lengths + step)[:, None], caches, index, mask)
                return tf.cast(out[:, -1], tf.float32), new_caches, mask

            last, caches, key_mask = tf.cond(step + 1 < max_new, decode,
                                             lambda: (last, caches, key_mask))
            return step + 1, last, caches, key_mask, tokens

        _, _, _, _, tokens = tf.while_loop(
            cond, body, (tf.constant(0, tf.int32), last, caches, key_mask, tokens))
        return {"tokens": tokens}

    return generate


def export_saved_model(model, seq_len: int, export_dir: str) -> str:
    """Writes the SavedModel of `model` (the signatures above) to `export_dir`."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serving_fn(model, seq_len),
        input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    archive.add_endpoint(
        "token_metrics", token_metrics_fn(model, seq_len),
        input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    archive.add_endpoint(
        "generate", generate_fn(model),
        input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="token_ids"),
            tf.TensorSpec([None, None], tf.int32, name="padding_mask"),
            tf.TensorSpec([], tf.int32, name="max_new_tokens"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.int32, name="top_k"),
            tf.TensorSpec([], tf.int32, name="seed"),
        ])
    archive.write_out(export_dir, verbose=False)
    return export_dir
