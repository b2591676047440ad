"""Exports of the trained model: the Keras-native `model.keras`, and a TF SavedModel (Keras 3 `ExportArchive`) with three
signatures:

* ``serving_default(examples: tf.string [B])`` -- serialized tf.Examples with
  an int64 `input_ids` feature of length seq_len -> ``logits`` float32
  [B, L, V] and ``token_loss`` float32 [B, L-1], the next-token
  cross-entropy of each position (position i scored against token i+1).
* ``generate(token_ids int32 [B, P] (left-padded), padding_mask int32 [B, P],
  max_new_tokens int32 [], temperature float32 [], top_k int32 [] (0 = off),
  top_p float32 [] (1 = off), eos_id int32 [] (-1 = none), seed int32 [])``
  -> ``tokens`` int32 [B, max_new_tokens] (0 after a sequence's EOS) and
  ``lengths`` int32 [B] (new tokens per sequence, EOS included). The graph is
  `model.generation.decode_loop`, the one `model.generation.generate` compiles:
  one prefill over the prompt into a KV cache of length P + max_new_tokens,
  then a `tf.while_loop` of one-token decode steps that stops once every
  sequence has produced EOS. temperature 0 is greedy (the same tokens as
  `generate`); otherwise top-k / top-p filtered sampling from
  `tf.random.stateless_uniform` keyed by (seed, step): reproducible per seed.
  Bad requests fail with InvalidArgumentError naming the problem.
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


def save_keras_model(model, path: str) -> str:
    tf.io.gfile.makedirs(os.path.dirname(path))
    model.save(path)
    return path


# ------------------------------------------------------------ signatures
def logits_fn(model, seq_len: int):
    """The model's float32 logits of int32 ids [B, seq_len], one traced graph
    that both example signatures call (the model traced once, not twice)."""
    return tf.function(lambda ids: tf.cast(model(ids, training=False), tf.float32),
                       input_signature=[tf.TensorSpec([None, int(seq_len)], tf.int32)])


def serving_fn(logits_of, seq_len: int):
    from model.deepseek_v3 import sparse_ce

    spec = {"input_ids": tf.io.FixedLenFeature([int(seq_len)], tf.int64)}

    def serve(examples):
        parsed = tf.io.parse_example(examples, spec)
        ids = tf.cast(parsed["input_ids"], tf.int32)
        logits = logits_of(ids)
        token_loss = tf.cast(sparse_ce(logits[:, :-1], ids[:, 1:]), tf.float32)
        return {"logits": logits, "token_loss": token_loss}

    return serve


def token_metrics_fn(logits_of, seq_len: int):
    from model.deepseek_v3 import sparse_ce

    spec = {"input_ids": tf.io.FixedLenFeature([int(seq_len)], tf.int64)}

    def token_metrics(examples):
        ids = tf.cast(tf.io.parse_example(examples, spec)["input_ids"], tf.int32)
        logits = logits_of(ids)[:, :-1]
        targets = ids[:, 1:]
        losses = tf.cast(sparse_ce(logits, targets), tf.float32)
        count = tf.cast(tf.shape(targets)[1], tf.float32)
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), targets), tf.float32)
        return {"example_loss": tf.reduce_mean(losses, axis=1),
                "token_count": tf.fill(tf.shape(losses)[:1], count),
                "correct_tokens": tf.reduce_sum(correct, axis=1)}

    return token_metrics


def _request_checks(config, token_ids, padding_mask, max_new_tokens, temperature, top_k,
                    top_p, eos_id):
    """tf.debugging asserts for every request the Python API refuses too."""
    vocab, max_positions = config.vocab_size, config.max_position_embeddings
    real = padding_mask > 0
    lengths = tf.reduce_sum(padding_mask, axis=1)
    assert_ = tf.debugging
    return [
        assert_.assert_equal(tf.shape(padding_mask), tf.shape(token_ids),
                             message="generate: padding_mask must have token_ids' shape [B, P]"),
        assert_.assert_greater(tf.size(token_ids), 0,
                               message="generate: token_ids is empty; send at least one prompt"),
        assert_.assert_equal(tf.reduce_all((padding_mask == 0) | (padding_mask == 1)), True,
                             message="generate: padding_mask must hold only 0 and 1"),
        assert_.assert_equal(tf.reduce_all(padding_mask[:, 1:] >= padding_mask[:, :-1]), True,
                             message="generate: prompts must be left-padded (padding_mask 0...0 1...1)"),
        assert_.assert_greater(tf.reduce_min(lengths), 0,
                               message="generate: a prompt is empty; every prompt needs at least one token"),
        assert_.assert_equal(tf.reduce_all(~real | ((token_ids >= 0) & (token_ids < vocab))), True,
                             message=f"generate: a token id is outside the vocabulary [0, {vocab})"),
        assert_.assert_greater_equal(max_new_tokens, 0, message="generate: max_new_tokens must be >= 0"),
        assert_.assert_less_equal(
            tf.reduce_max(lengths) + max_new_tokens, max_positions,
            message=f"generate: prompt length + max_new_tokens exceeds "
                    f"max_position_embeddings={max_positions}"),
        assert_.assert_equal(tf.math.is_finite(temperature) & (temperature >= 0), True,
                             message="generate: temperature must be a finite number >= 0 (0 = greedy)"),
        assert_.assert_greater_equal(top_k, 0, message="generate: top_k must be >= 0 (0 = off)"),
        assert_.assert_equal((top_p > 0) & (top_p <= 1), True,
                             message="generate: top_p must be in (0, 1] (1 = off)"),
        assert_.assert_equal((eos_id >= -1) & (eos_id < vocab), True,
                             message=f"generate: eos_id must be -1 (none) or a token id in [0, {vocab})"),
    ]


def sampling_specs():
    """The scalar sampling inputs shared by `generate` and `generate_text`."""
    return [tf.TensorSpec([], tf.int32, name="max_new_tokens"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.int32, name="top_k"),
            tf.TensorSpec([], tf.float32, name="top_p"),
            tf.TensorSpec([], tf.int32, name="eos_id"),
            tf.TensorSpec([], tf.int32, name="seed")]


def generate_fn(model):
    from model.generation import decode_loop

    def generate(token_ids, padding_mask, max_new_tokens, temperature, top_k, top_p, eos_id, seed):
        checks = _request_checks(model.config, token_ids, padding_mask, max_new_tokens,
                                 temperature, top_k, top_p, eos_id)
        with tf.control_dependencies(checks):
            token_ids, padding_mask = tf.identity(token_ids), tf.identity(padding_mask)
        tokens, lengths = decode_loop(model, token_ids, padding_mask, max_new_tokens, temperature,
                                      top_k, top_p, eos_id, seed)
        return {"tokens": tokens, "lengths": lengths}

    return generate


def export_hf_checkpoint(model, export_dir: str, log_fn=print) -> list:
    """config.json + model.safetensors (model.hf_export) into `export_dir`,
    beside the SavedModel, so the pushed version is a base model too;
    -> the file names written ([] for a model that layout cannot hold)."""
    import shutil
    import tempfile

    from model.hf_export import ExportError, save_hf_checkpoint

    local = tempfile.mkdtemp(prefix="deepseek-tfx-hf-")
    try:
        try:
            save_hf_checkpoint(model, local)
        except ExportError as e:
            log_fn(f"trainer: no Hugging Face copy of the weights: {e}")
            return []
        names = sorted(os.listdir(local))
        tf.io.gfile.makedirs(export_dir)
        for name in names:  # tf.io.gfile: export_dir may be a remote URI
            tf.io.gfile.copy(os.path.join(local, name), os.path.join(export_dir, name), overwrite=True)
        return names
    finally:
        shutil.rmtree(local, ignore_errors=True)


class _ExportArchive(keras.export.ExportArchive):
    """Keras' ExportArchive, tracing each endpoint once instead of twice.

    write_out traces every endpoint to find the variables it uses, then
    tf.saved_model.save traces them all again: a trace made inside a save
    context has another cache key (TF's FunctionContext holds the save
    options' variable policy). Making the first trace inside a save context
    with the options the save uses lets the save reuse it (tiny model:
    4 model traces instead of 8, about 40% of the export's time)."""

    _SAVE_OPTIONS = tf.saved_model.SaveOptions()

    def _filter_and_track_resources(self):
        from tensorflow.python.saved_model import save_context

        with save_context.save_context(self._SAVE_OPTIONS):
            super()._filter_and_track_resources()

    def write_out(self, filepath, verbose=True):
        super().write_out(filepath, options=self._SAVE_OPTIONS, verbose=verbose)


def export_saved_model(model, seq_len: int, export_dir: str, tokenizer_proto: bytes = None) -> str:
    """Writes the SavedModel of `model` (the signatures above) to `export_dir`;
    with the SentencePiece `tokenizer_proto` of a run on text also
    ``generate_text`` (components/text_export.py) and a copy of the model
    file at ``assets.extra/tokenizer.model``."""
    archive = _ExportArchive()
    archive.track(model)
    logits_of = logits_fn(model, seq_len)
    archive.add_endpoint(
        "serving_default", serving_fn(logits_of, seq_len),
        input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    archive.add_endpoint(
        "token_metrics", token_metrics_fn(logits_of, seq_len),
        input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    generate = archive.add_endpoint(
        "generate", generate_fn(model),
        input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="token_ids"),
            tf.TensorSpec([None, None], tf.int32, name="padding_mask"),
            *sampling_specs(),
        ])
    if tokenizer_proto:
        from components.text_export import add_generate_text

        add_generate_text(archive, model, tokenizer_proto, generate)
    archive.write_out(export_dir, verbose=False)
    if tokenizer_proto:
        tf.io.gfile.makedirs(os.path.join(export_dir, "assets.extra"))
        with tf.io.gfile.GFile(os.path.join(export_dir, "assets.extra", "tokenizer.model"), "wb") as f:
            f.write(tokenizer_proto)
    return export_dir
