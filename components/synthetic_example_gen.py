"""`SyntheticTokenExampleGen`: a TFX ExampleGen for seeded synthetic token data.

The component turns a `data.DataSpec` (kind, vocab_size, seq_len, seed and the
kind's parameters) into a standard ``Examples`` artifact, exactly as a real
ExampleGen would lay it out, so every downstream TFX component (StatisticsGen,
ExampleValidator, Trainer, ...) consumes it unchanged:

    <uri>/Split-train/data_tfrecord-SSSSS-of-NNNNN.gz   GZIP TFRecords
    <uri>/Split-eval/data_tfrecord-SSSSS-of-NNNNN.gz

Every record is a serialized ``tf.train.Example`` with one int64 feature,
``input_ids``, of length ``seq_len`` (the encoding of `data.tfrecord`).

Splits
------
Sizes are given as explicit counts (``train_examples``, ``eval_examples``),
not ratios: the counts are exact and the eval set does not depend on the
train size. Sequence ``i`` of a spec is a pure function of ``(spec, i)`` (see
`data.generators`), so the splits are index ranges of one infinite stream:

* train = sequences ``[0, train_examples)``
* eval  = sequences ``[eval_start_index, eval_start_index + eval_examples)``

``eval_start_index`` defaults to ``2**30`` (block aligned), so eval is held out
(disjoint from train) for any practical ``train_examples`` and stays the same
eval set when train grows. Construction rejects overlapping ranges.

Scaling
-------
Each split's range is cut into block-aligned shards with `data.shard_ranges`
(``num_shards``; 0 = one shard per `data.BLOCK_SIZE` sequences, at most
`MAX_AUTO_SHARDS`). The shards are a ``beam.Create`` (which reshuffles, so a
distributed runner spreads them over workers) and each shard is generated and
serialized inside a ``DoFn``; no sequence is produced on the launcher. Records
are not shuffled across files (the sequences are already exchangeable; the
trainer shuffles).

Artifact custom properties
--------------------------
``data_spec`` (JSON of `data.describe`: the settings plus derived facts),
``optimal_loss`` (float, nats per target token; a lower bound for mixtures),
``optimal_loss_is_exact`` (int 0/1), ``optimal_loss_upper_bound`` (float),
``num_train``, ``num_eval``, ``vocab_size``, ``seq_len``, ``train_start_index``,
``eval_start_index``, ``generator_version``, ``feature_key`` (``input_ids``),
and the standard ExampleGen ones ``payload_format`` (``FORMAT_TF_EXAMPLE``)
and ``file_format`` (``tfrecords_gzip``). ``split_names`` is ``["train", "eval"]``.

    from components.synthetic_example_gen import SyntheticTokenExampleGen
    example_gen = SyntheticTokenExampleGen(
        kind="markov", vocab_size=256, seq_len=128, seed=0,
        train_examples=100_000, eval_examples=5_000,
        generator_params={"order": 1, "temperature": 0.5})
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import apache_beam as beam
from tfx import types
from tfx.components.util import examples_utils
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.orchestration import data_types
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

import data
from data.spec import DataSpecError
from data.tfrecord import FEATURE_KEY
from model.checks import int_problem

# Keys of the component's execution properties and output.
KIND_KEY = "kind"
VOCAB_SIZE_KEY = "vocab_size"
SEQ_LEN_KEY = "seq_len"
SEED_KEY = "seed"
TRAIN_EXAMPLES_KEY = "train_examples"
EVAL_EXAMPLES_KEY = "eval_examples"
GENERATOR_PARAMS_KEY = "generator_params"
EVAL_START_INDEX_KEY = "eval_start_index"
NUM_SHARDS_KEY = "num_shards"
EXAMPLES_KEY = "examples"

TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"
SPLIT_NAMES = (TRAIN_SPLIT, EVAL_SPLIT)

#: First sequence index of the eval split unless given (a multiple of BLOCK_SIZE;
#: within ML Metadata's 32-bit int properties on MySQL, see _MAX_INDEX).
DEFAULT_EVAL_START_INDEX = 2**30
#: Upper limit on shards per split when ``num_shards`` is 0 (auto).
MAX_AUTO_SHARDS = 1000
#: Largest sequence index + 1: indices are MLMD int properties, which are
#: 64-bit in SQLite but 32-bit (INT) in MLMD's MySQL schema.
_MAX_INDEX = 2**31 - 1
#: File name prefix of the TFRecord shards (the one TFX's ExampleGen uses).
FILE_PREFIX = "data_tfrecord"
FILE_SUFFIX = ".gz"

_TOP_LEVEL_FIELDS = ("kind", "vocab_size", "seq_len", "seed")

_METRICS_NAMESPACE = "SyntheticTokenExampleGen"


class SyntheticExampleGenError(ValueError):
    """Invalid `SyntheticTokenExampleGen` settings."""


# --------------------------------------------------------------------------- validation
def _is_deferred(value: Any) -> bool:
    """True for values only known at run time (RuntimeParameter, placeholders)."""
    from tfx.dsl.placeholder import placeholder  # noqa: WPS433

    return isinstance(value, (data_types.RuntimeParameter, placeholder.Placeholder))


def parse_generator_params(generator_params: Union[None, str, Mapping[str, Any]]) -> Dict[str, Any]:
    """``generator_params`` (JSON object string, mapping or None) -> dict.

    Raises `SyntheticExampleGenError` for malformed JSON, non-objects and keys
    that are top-level component parameters (``kind``, ``vocab_size``,
    ``seq_len``, ``seed``)."""
    if generator_params is None or generator_params == "":
        params: Any = {}
    elif isinstance(generator_params, str):
        try:
            params = json.loads(generator_params)
        except json.JSONDecodeError as e:
            raise SyntheticExampleGenError(f"generator_params is not valid JSON ({e}): {generator_params!r}") from None
    elif isinstance(generator_params, Mapping):
        params = dict(generator_params)
    else:
        raise SyntheticExampleGenError(
            f"generator_params must be a JSON object string or a dict, got {type(generator_params).__name__}"
        )
    if not isinstance(params, dict):
        raise SyntheticExampleGenError(f"generator_params must be a JSON object, got {params!r}")
    clash = sorted(set(params) & set(_TOP_LEVEL_FIELDS))
    if clash:
        raise SyntheticExampleGenError(
            f"generator_params must not contain {clash}: pass them as the component's own parameters"
        )
    return params


def build_data_spec(
    kind: str,
    vocab_size: int,
    seq_len: int,
    seed: int = 0,
    generator_params: Union[None, str, Mapping[str, Any]] = None,
) -> data.DataSpec:
    """The validated `data.DataSpec`; errors name the offending field."""
    params = parse_generator_params(generator_params)
    try:
        return data.DataSpec(kind=kind, vocab_size=vocab_size, seq_len=seq_len, seed=seed, **params)
    except TypeError as e:  # an unknown keyword in generator_params
        known = sorted(f for f in data.DataSpec.__dataclass_fields__ if f not in _TOP_LEVEL_FIELDS)
        raise SyntheticExampleGenError(f"generator_params: {e} (known keys: {known})") from None
    except DataSpecError as e:
        raise SyntheticExampleGenError(f"invalid data settings: {e}") from e


def _as_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    # Integral floats are accepted: some orchestrators pass numbers as doubles.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    problem = int_problem(value, minimum, maximum)
    if problem:
        raise SyntheticExampleGenError(f"{name} {problem}")
    return int(value)


def validate_split_sizes(
    train_examples: int, eval_examples: int, eval_start_index: int = DEFAULT_EVAL_START_INDEX, num_shards: int = 0
) -> Tuple[int, int, int, int]:
    """Checked ``(train_examples, eval_examples, eval_start_index, num_shards)``.

    Both splits need >= 1 example and the train range ``[0, train_examples)``
    must end at or before ``eval_start_index`` (disjoint, held-out eval)."""
    train = _as_int(TRAIN_EXAMPLES_KEY, train_examples, 1, _MAX_INDEX)
    n_eval = _as_int(EVAL_EXAMPLES_KEY, eval_examples, 1, _MAX_INDEX)
    start = _as_int(EVAL_START_INDEX_KEY, eval_start_index, 0, _MAX_INDEX - n_eval)
    shards = _as_int(NUM_SHARDS_KEY, num_shards, 0)
    if train > start:
        raise SyntheticExampleGenError(
            f"train range [0, {train}) overlaps the eval range starting at eval_start_index={start}; "
            f"use train_examples <= eval_start_index so eval is held out"
        )
    return train, n_eval, start, shards


def shards_for(num_sequences: int, num_shards: int = 0) -> int:
    """Shards per split: ``num_shards`` if > 0, else one per block (<= MAX_AUTO_SHARDS)."""
    if num_shards > 0:
        return num_shards
    return max(1, min(MAX_AUTO_SHARDS, math.ceil(num_sequences / data.BLOCK_SIZE)))


def split_ranges(
    train_examples: int, eval_examples: int, eval_start_index: int = DEFAULT_EVAL_START_INDEX, num_shards: int = 0
) -> Dict[str, List[Tuple[int, int]]]:
    """``{split: [(start, count), ...]}``: the block-aligned shards of each split."""
    train, n_eval, start, shards = validate_split_sizes(train_examples, eval_examples, eval_start_index, num_shards)
    return {
        TRAIN_SPLIT: data.shard_ranges(train, shards_for(train, shards), 0),
        EVAL_SPLIT: data.shard_ranges(n_eval, shards_for(n_eval, shards), start),
    }


# --------------------------------------------------------------------------- executor
class _GenerateShardFn(beam.DoFn):
    """(start, count) -> the serialized tf.Examples of sequences start..start+count-1."""

    def __init__(self, spec_json: str, split: str):
        super().__init__()
        self._spec_json = spec_json
        self._spec = None
        self._examples = beam.metrics.Metrics.counter(_METRICS_NAMESPACE, f"num_examples_{split}")
        self._shards = beam.metrics.Metrics.counter(_METRICS_NAMESPACE, f"num_shards_{split}")

    def setup(self):
        self._spec = data.DataSpec.from_json(self._spec_json)

    def process(self, shard: Tuple[int, int]):
        start, count = shard
        for chunk in data.iter_generate(self._spec, count, start):
            yield from data.serialize_sequences(chunk)
        self._examples.inc(count)
        self._shards.inc()


class SyntheticTokenExampleGenExecutor(base_beam_executor.BaseBeamExecutor):
    """Generates both splits in one Beam pipeline (``self._make_beam_pipeline()``,
    so the pipeline's ``beam_pipeline_args`` choose the runner)."""

    def Do(
        self,
        input_dict: Dict[str, List[types.Artifact]],
        output_dict: Dict[str, List[types.Artifact]],
        exec_properties: Dict[str, Any],
    ) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        spec = build_data_spec(
            exec_properties[KIND_KEY],
            _as_int(VOCAB_SIZE_KEY, exec_properties[VOCAB_SIZE_KEY], 2),
            _as_int(SEQ_LEN_KEY, exec_properties[SEQ_LEN_KEY], 2),
            _as_int(SEED_KEY, exec_properties.get(SEED_KEY) or 0, 0),
            exec_properties.get(GENERATOR_PARAMS_KEY),
        )
        train, n_eval, eval_start, num_shards = validate_split_sizes(
            exec_properties[TRAIN_EXAMPLES_KEY],
            exec_properties[EVAL_EXAMPLES_KEY],
            _default(exec_properties.get(EVAL_START_INDEX_KEY), DEFAULT_EVAL_START_INDEX),
            _default(exec_properties.get(NUM_SHARDS_KEY), 0),
        )
        ranges = split_ranges(train, n_eval, eval_start, num_shards)

        examples = artifact_utils.get_single_instance(output_dict[EXAMPLES_KEY])
        examples.split_names = artifact_utils.encode_split_names(list(SPLIT_NAMES))
        spec_json = spec.to_json()

        with self._make_beam_pipeline() as pipeline:
            for split in SPLIT_NAMES:
                split_dir = artifact_utils.get_split_uri([examples], split)
                _ = (
                    pipeline
                    | f"ShardRanges[{split}]" >> beam.Create(ranges[split])  # reshuffles: shards spread over workers
                    | f"Generate[{split}]" >> beam.ParDo(_GenerateShardFn(spec_json, split))
                    | f"Write[{split}]"
                    >> beam.io.WriteToTFRecord(
                        os.path.join(split_dir, FILE_PREFIX),
                        file_name_suffix=FILE_SUFFIX,
                        compression_type=beam.io.filesystem.CompressionTypes.GZIP,
                    )
                )

        described = data.describe(spec)
        examples.set_string_custom_property("data_spec", json.dumps(described, sort_keys=True))
        examples.set_float_custom_property("optimal_loss", float(described["optimal_loss"]))
        examples.set_int_custom_property("optimal_loss_is_exact", int(bool(described["optimal_loss_is_exact"])))
        examples.set_float_custom_property("optimal_loss_upper_bound", float(described["optimal_loss_upper_bound"]))
        examples.set_int_custom_property("num_train", train)
        examples.set_int_custom_property("num_eval", n_eval)
        examples.set_int_custom_property("vocab_size", spec.vocab_size)
        examples.set_int_custom_property("seq_len", spec.seq_len)
        examples.set_int_custom_property("train_start_index", 0)
        examples.set_int_custom_property("eval_start_index", eval_start)
        examples.set_int_custom_property("generator_version", int(described["generator_version"]))
        examples.set_string_custom_property("feature_key", FEATURE_KEY)
        examples_utils.set_payload_format(examples, example_gen_pb2.PayloadFormat.FORMAT_TF_EXAMPLE)
        examples_utils.set_file_format(examples, "tfrecords_gzip")


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


#: TFX convention: the executor of a component module is also importable as `Executor`.
Executor = SyntheticTokenExampleGenExecutor


# --------------------------------------------------------------------------- component
class SyntheticTokenExampleGenSpec(types.ComponentSpec):
    """ComponentSpec of `SyntheticTokenExampleGen`."""

    PARAMETERS = {
        KIND_KEY: ExecutionParameter(type=str),
        VOCAB_SIZE_KEY: ExecutionParameter(type=int),
        SEQ_LEN_KEY: ExecutionParameter(type=int),
        SEED_KEY: ExecutionParameter(type=int),
        TRAIN_EXAMPLES_KEY: ExecutionParameter(type=int),
        EVAL_EXAMPLES_KEY: ExecutionParameter(type=int),
        # JSON object of the kind's parameters (order, temperature, exponent,
        # prefix_length, components, weights); "{}" for none.
        GENERATOR_PARAMS_KEY: ExecutionParameter(type=str),
        EVAL_START_INDEX_KEY: ExecutionParameter(type=int, optional=True),
        NUM_SHARDS_KEY: ExecutionParameter(type=int, optional=True),
    }
    INPUTS: Dict[str, ChannelParameter] = {}
    OUTPUTS = {EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples)}


class SyntheticTokenExampleGen(base_beam_component.BaseBeamComponent):
    """ExampleGen of seeded synthetic token sequences (see the module docstring).

    Args:
      kind: ``uniform``, ``zipf``, ``markov``, ``copy`` or ``mixture``.
      vocab_size: token ids are in ``[0, vocab_size)``.
      seq_len: tokens per example (the length of ``input_ids``).
      train_examples: sequences in the ``train`` split (>= 1).
      eval_examples: sequences in the ``eval`` split (>= 1).
      seed: seed of the generative model and of every sequence.
      generator_params: the kind's parameters, as a dict or a JSON object
        string, e.g. ``{"order": 2, "temperature": 0.5}`` for markov or
        ``{"components": [{"kind": "zipf"}, {"kind": "copy"}], "weights": [3, 1]}``.
      eval_start_index: first sequence index of eval (default ``2**30``);
        must be >= ``train_examples``.
      num_shards: shards (Beam work items) per split; 0 = auto.

    All values are validated here (with `data.DataSpec`'s rules) unless one of
    them is a RuntimeParameter/placeholder, in which case the executor
    validates at run time. Output: ``outputs['examples']`` (``Examples``).
    """

    SPEC_CLASS = SyntheticTokenExampleGenSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(SyntheticTokenExampleGenExecutor)

    def __init__(
        self,
        kind: str,
        vocab_size: int,
        seq_len: int,
        train_examples: int,
        eval_examples: int,
        seed: int = 0,
        generator_params: Union[None, str, Mapping[str, Any]] = None,
        eval_start_index: int = DEFAULT_EVAL_START_INDEX,
        num_shards: int = 0,
    ):
        if isinstance(generator_params, Mapping):
            generator_params = json.dumps(dict(generator_params), sort_keys=True)
        elif generator_params is None:
            generator_params = "{}"
        values = (kind, vocab_size, seq_len, seed, generator_params, train_examples, eval_examples,
                  eval_start_index, num_shards)
        if not any(_is_deferred(v) for v in values):
            build_data_spec(kind, vocab_size, seq_len, seed, generator_params)
            validate_split_sizes(train_examples, eval_examples, eval_start_index, num_shards)
        spec = SyntheticTokenExampleGenSpec(
            kind=kind,
            vocab_size=vocab_size,
            seq_len=seq_len,
            seed=seed,
            train_examples=train_examples,
            eval_examples=eval_examples,
            generator_params=generator_params,
            eval_start_index=eval_start_index,
            num_shards=num_shards,
            examples=types.Channel(type=standard_artifacts.Examples),
        )
        super().__init__(spec=spec)
