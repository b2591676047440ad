"""`TextExampleGen`: a TFX ExampleGen over a directory of UTF-8 text (plain or
gzip), tokenized with the pipeline's `Tokenizer` artifact, on Beam.

Output: a standard ``Examples`` artifact laid out like every ExampleGen's and
holding the records the rest of the DAG already consumes:

    <uri>/Split-train/data_tfrecord-SSSSS-of-NNNNN.gz   GZIP TFRecords of
    <uri>/Split-eval/data_tfrecord-SSSSS-of-NNNNN.gz    tf.Example {input_ids: int64 x seq_len}
    <uri>/tokenizer/tokenizer.model                     the ids' tokenizer (a copy)

The split is by document (`data.text_corpus.split_documents`: a pure function
of the file names, so the tokenizer was trained on exactly this train split).
Each split's documents are cut into shards of about ``shard_bytes`` (in
path order); a shard is one Beam work item that reads, tokenizes and packs
its documents into rows of seq_len with the tokenizer's eos as the
end-of-document token (`data.text_corpus.pack`). So the work spreads over
the runner's workers and the output does not depend on how many there are.

The Examples carry the tokenizer because the ids mean nothing without it:
the Trainer reads it from there to put it into the SavedModel
(`generate_text`).

Custom properties, per split S in (train, eval): ``S_documents``,
``S_bytes`` (UTF-8 bytes read), ``S_tokens`` (ids produced, end-of-document
tokens included), ``S_rows`` (examples written), ``S_dropped_tokens`` (the
partial last row of each shard); and ``vocab_size``, ``seq_len``,
``eod_id``, ``tokenizer_sha256``, ``feature_key``, ``num_train``,
``num_eval``, and the standard ``payload_format`` / ``file_format``.

A corpus whose eval split packs into fewer rows than ``min_eval_rows`` (one
eval batch) fails here, before training, naming the directory.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import apache_beam as beam
from tfx import types
from tfx.components.util import examples_utils
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from components.artifacts import Tokenizer
from data.tfrecord import FEATURE_KEY

TEXT_DIR_KEY = "text_dir"
SEQ_LEN_KEY = "seq_len"
EVAL_FRACTION_KEY = "eval_fraction"
MIN_EVAL_ROWS_KEY = "min_eval_rows"
SHARD_BYTES_KEY = "shard_bytes"
TOKENIZER_KEY = "tokenizer"
EXAMPLES_KEY = "examples"
SPLIT_NAMES = ("train", "eval")
FILE_PREFIX = "data_tfrecord"
DEFAULT_SHARD_BYTES = 1 << 20
TOKENIZER_DIR = "tokenizer"
_NAMESPACE = "TextExampleGen"
_COUNTS = ("documents", "bytes", "tokens", "rows", "dropped_tokens")


class TextExampleGenError(ValueError):
    """A text corpus that cannot give the pipeline its examples."""


def tokenizer_for_examples(examples_uri: str) -> str:
    """The path of the tokenizer model an Examples artifact carries."""
    return os.path.join(examples_uri, TOKENIZER_DIR, "tokenizer.model")


class _PackShardFn(beam.DoFn):
    """[relative paths of one shard] -> serialized tf.Examples of seq_len ids."""

    def __init__(self, text_dir: str, model_proto: bytes, seq_len: int, eod_id: int, split: str):
        super().__init__()
        self._text_dir, self._proto, self._seq_len, self._eod = text_dir, model_proto, seq_len, eod_id
        self._counters = {k: beam.metrics.Metrics.counter(_NAMESPACE, f"{split}_{k}") for k in _COUNTS}
        self._sp = None

    def setup(self):
        from data.text_tokenizer import processor

        self._sp = processor(self._proto)

    def process(self, shard: List[str]):
        import tensorflow as tf

        from data import text_corpus

        def documents():
            for doc in shard:
                text = text_corpus.read_document(os.path.join(self._text_dir, doc))
                self._counters["bytes"].inc(len(text.encode("utf-8")))
                self._counters["documents"].inc()
                # Line by line, in one batch call: the same ids as the whole text
                # (SentencePiece's normalization makes a line break a space), 2-3x
                # faster than one long input.
                yield [i for line in self._sp.encode(text.split("\n")) for i in line]

        rows, counts = text_corpus.pack(documents(), self._seq_len, self._eod)
        n = 0
        for row in rows:
            n += 1
            yield tf.train.Example(features=tf.train.Features(feature={
                FEATURE_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=row))})
            ).SerializeToString()
        self._counters["rows"].inc(n)
        self._counters["tokens"].inc(counts["tokens"])
        self._counters["dropped_tokens"].inc(counts["dropped_tokens"])


class TextExampleGenExecutor(base_beam_executor.BaseBeamExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]], exec_properties: Dict[str, Any]) -> None:
        from tfx.dsl.io import fileio

        from components.tokenizer import model_path
        from data import text_corpus, text_tokenizer

        self._log_startup(input_dict, output_dict, exec_properties)
        text_dir = exec_properties[TEXT_DIR_KEY]
        seq_len = int(exec_properties[SEQ_LEN_KEY])
        min_eval_rows = int(exec_properties.get(MIN_EVAL_ROWS_KEY) or 1)
        shard_bytes = int(exec_properties.get(SHARD_BYTES_KEY) or DEFAULT_SHARD_BYTES)
        tokenizer = artifact_utils.get_single_instance(input_dict[TOKENIZER_KEY])
        with fileio.open(model_path(tokenizer.uri), "rb") as f:
            proto = f.read()
        info = text_tokenizer.describe(proto, model_path(tokenizer.uri))

        documents = text_corpus.list_documents(text_dir)
        splits = dict(zip(SPLIT_NAMES, text_corpus.split_documents(
            documents, float(exec_properties[EVAL_FRACTION_KEY]))))
        examples = artifact_utils.get_single_instance(output_dict[EXAMPLES_KEY])
        examples.split_names = artifact_utils.encode_split_names(list(SPLIT_NAMES))

        pipeline = self._make_beam_pipeline()
        for split in SPLIT_NAMES:
            docs = splits[split]
            sizes = [text_corpus.file_size(os.path.join(text_dir, d)) for d in docs]
            shards = text_corpus.shard_documents(docs, sizes, shard_bytes)
            _ = (pipeline
                 | f"Shards[{split}]" >> beam.Create(shards)  # reshuffles: shards spread over workers
                 | f"Pack[{split}]" >> beam.ParDo(_PackShardFn(text_dir, proto, seq_len, info.eos_id, split))
                 | f"Write[{split}]" >> beam.io.WriteToTFRecord(
                     os.path.join(artifact_utils.get_split_uri([examples], split), FILE_PREFIX),
                     file_name_suffix=".gz", compression_type=beam.io.filesystem.CompressionTypes.GZIP))
        result = pipeline.run()
        result.wait_until_finish()
        counts = {f"{s}_{k}": 0 for s in SPLIT_NAMES for k in _COUNTS}
        for counter in result.metrics().query(
                beam.metrics.MetricsFilter().with_namespace(_NAMESPACE))["counters"]:
            if counter.key.metric.name in counts:
                counts[counter.key.metric.name] += counter.committed

        if counts["train_rows"] == 0:
            raise TextExampleGenError(
                f"text_dir {text_dir!r}: the train split ({counts['train_documents']} documents, "
                f"{counts['train_tokens']} tokens) fills no row of seq_len {seq_len}")
        if counts["eval_rows"] < min_eval_rows:
            raise TextExampleGenError(
                f"text_dir {text_dir!r}: the corpus is too small: its eval split "
                f"({counts['eval_documents']} documents, {counts['eval_tokens']} tokens) packs into "
                f"{counts['eval_rows']} rows of seq_len {seq_len}, fewer than one eval batch "
                f"({min_eval_rows}); add text, or lower --batch-size or --seq-len")

        # The tokenizer travels with the ids (the Trainer exports it).
        fileio.makedirs(os.path.dirname(tokenizer_for_examples(examples.uri)))
        with fileio.open(tokenizer_for_examples(examples.uri), "wb") as f:
            f.write(proto)
        for key, value in counts.items():
            examples.set_int_custom_property(key, int(value))
        examples.set_int_custom_property("num_train", int(counts["train_rows"]))
        examples.set_int_custom_property("num_eval", int(counts["eval_rows"]))
        examples.set_int_custom_property("vocab_size", info.vocab_size)
        examples.set_int_custom_property("seq_len", seq_len)
        examples.set_int_custom_property("eod_id", info.eos_id)
        examples.set_string_custom_property("tokenizer_sha256", info.sha256)
        examples.set_string_custom_property("text_dir", text_dir)
        examples.set_string_custom_property("feature_key", FEATURE_KEY)
        examples_utils.set_payload_format(examples, example_gen_pb2.PayloadFormat.FORMAT_TF_EXAMPLE)
        examples_utils.set_file_format(examples, "tfrecords_gzip")


Executor = TextExampleGenExecutor


class TextExampleGenSpec(types.ComponentSpec):
    PARAMETERS = {
        TEXT_DIR_KEY: ExecutionParameter(type=str),
        SEQ_LEN_KEY: ExecutionParameter(type=int),
        EVAL_FRACTION_KEY: ExecutionParameter(type=float),
        MIN_EVAL_ROWS_KEY: ExecutionParameter(type=int, optional=True),
        SHARD_BYTES_KEY: ExecutionParameter(type=int, optional=True),
    }
    INPUTS = {TOKENIZER_KEY: ChannelParameter(type=Tokenizer)}
    OUTPUTS = {EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples)}


class TextExampleGen(base_beam_component.BaseBeamComponent):
    """ExampleGen over a text directory (see the module docstring).

    Args:
      tokenizer: the `Tokenizer` channel (TokenizerGen's output).
      text_dir: the directory of UTF-8 text files (plain or gzip).
      seq_len: tokens per example.
      eval_fraction: share of the documents held out for eval.
      min_eval_rows: fail unless the eval split has at least this many rows.
      shard_bytes: about this many bytes of text per Beam work item.
    """

    SPEC_CLASS = TextExampleGenSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(TextExampleGenExecutor)

    def __init__(self, tokenizer: types.BaseChannel, text_dir: str, seq_len: int,
                 eval_fraction: float = 0.1, min_eval_rows: int = 1,
                 shard_bytes: int = DEFAULT_SHARD_BYTES):
        super().__init__(spec=TextExampleGenSpec(
            text_dir=text_dir, seq_len=seq_len, eval_fraction=eval_fraction,
            min_eval_rows=min_eval_rows, shard_bytes=shard_bytes, tokenizer=tokenizer,
            examples=types.Channel(type=standard_artifacts.Examples)))
