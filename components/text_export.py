"""The tokenizer inside the SavedModel: a ``generate_text`` signature that
takes strings and returns strings, with plain TensorFlow + tensorflow-text
(`import tensorflow_text` registers its ops before `tf.saved_model.load`).

``generate_text(prompts tf.string [B], max_new_tokens int32 [], temperature
float32 [], top_k int32 [], top_p float32 [], eos_id int32 [], seed int32 [])``
-> ``texts`` tf.string [B] (the continuation, eos removed), ``tokens`` int32
[B, max_new_tokens] and ``lengths`` int32 [B] (as `generate`'s).

Each prompt is tokenized by tensorflow-text's SentencepieceTokenizer over the
model bytes of the pipeline's tokenizer (a resource tracked by the SavedModel,
so the file is not needed at serving time) and preceded by the tokenizer's
eos: in training every document follows an end-of-document token, so that is
how the model has seen a text begin (and an empty prompt is a valid one).
The prompts are left-padded in the graph and decoded by the same
`model.generation.decode_loop` as ``generate``.
"""

from __future__ import annotations

import tensorflow as tf

SIGNATURE = "generate_text"


def load_text_ops() -> None:
    """Registers tensorflow-text's ops (needed to load a SavedModel with
    ``generate_text``)."""
    import tensorflow_text  # noqa: F401


def sentencepiece_tokenizer(model_proto: bytes):
    load_text_ops()
    import tensorflow_text as tf_text

    return tf_text.SentencepieceTokenizer(model=model_proto, out_type=tf.int32)


def left_pad(ids: tf.RaggedTensor):
    """(token_ids [B, P] left-padded with 0, padding_mask [B, P]) of ragged ids."""
    lengths = tf.cast(ids.row_lengths(), tf.int32)
    right = ids.to_tensor(default_value=0)
    mask = tf.sequence_mask(lengths, tf.shape(right)[1], dtype=tf.int32)
    # Reverse each row's real tokens, then the whole row: [a b c 0 0] -> [0 0 a b c].
    token_ids = tf.reverse(tf.reverse_sequence(right, lengths, seq_axis=1, batch_axis=0), axis=[1])
    return token_ids, tf.reverse(mask, axis=[1])


def generate_text_fn(model, tokenizer, start_id: int, generate=None):
    """generate: the archive's `generate` endpoint (a tf.function), called as
    a function so its decode loop is traced once for both signatures; None:
    the loop traced inline."""
    from components.export import generate_fn

    generate = generate or generate_fn(model)

    def generate_text(prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed):
        ids = tokenizer.tokenize(prompts)
        start = tf.fill([tf.shape(prompts)[0], 1], tf.constant(start_id, tf.int32))
        token_ids, padding_mask = left_pad(tf.concat([start, ids], axis=1))
        out = generate(token_ids, padding_mask, max_new_tokens, temperature, top_k, top_p, eos_id, seed)
        new = tf.RaggedTensor.from_tensor(out["tokens"], lengths=out["lengths"])
        new = tf.ragged.boolean_mask(new, tf.not_equal(new, eos_id))  # the eos ends a text; not printed
        texts = tokenizer.detokenize(new)
        return {"texts": texts, "tokens": out["tokens"], "lengths": out["lengths"]}

    return generate_text


def add_generate_text(archive, model, model_proto: bytes, generate=None) -> None:
    """Adds ``generate_text`` (and the tokenizer it tracks) to a Keras
    ExportArchive that already tracks `model`."""
    from components.export import sampling_specs
    from data.text_tokenizer import describe

    info = describe(model_proto)
    tokenizer = sentencepiece_tokenizer(model_proto)
    archive.track(tokenizer)
    archive.add_endpoint(
        SIGNATURE, generate_text_fn(model, tokenizer, info.eos_id, generate),
        input_signature=[
            tf.TensorSpec([None], tf.string, name="prompts"),
            *sampling_specs(),
        ])
