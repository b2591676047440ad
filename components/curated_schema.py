"""CuratedSchemaGen: writes the token schema we *know* (not one inferred from
the data, which would happily learn whatever is wrong with it): `input_ids`
is a required INT feature of exactly seq_len values in [0, vocab_size).

`make_schema` / `write_schema` build it: type INT, ``int_domain [0,
vocab_size - 1]``, required in every example (``presence.min_fraction =
1.0``) and a fixed shape ``[seq_len]``. A fixed ``shape`` (rather than
``value_count {min: L max: L}``; the two are a proto ``oneof``) is what makes
schema-driven parsing (``schema_utils.schema_as_feature_spec``, TFXIO,
Transform) produce dense ``[batch, seq_len]`` tensors; TFDV validates both
the same way (wrong lengths are reported as "Feature shape dropped").

A curated schema is the right choice here rather than SchemaGen (+
``tfdv.update_schema``/hand edits): the constraints are known a priori from
the data spec, while an inferred schema would take the vocabulary range from
whatever ids happened to occur in the train sample (a valid but unseen id in
eval would be flagged, an id >= vocab_size in train would be accepted).

Written inside the executor, so it needs no file shipped with the pipeline
(works the same on LocalDagRunner and Kubeflow); `write_schema` also makes a
file for ``tfx.components.ImportSchemaGen(schema_file=...)``."""

import os

from tensorflow_metadata.proto.v0 import schema_pb2
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.dsl.io import fileio
from tfx.types import standard_artifacts
from tfx.utils import io_utils

from components.artifacts import Tokenizer
from data.tfrecord import FEATURE_KEY
from model.checks import check_int


def make_schema(vocab_size: int, seq_len: int, feature_name: str = FEATURE_KEY) -> schema_pb2.Schema:
    """Schema of token sequences: one required INT feature of fixed shape
    ``[seq_len]`` with values in ``[0, vocab_size - 1]``."""
    vocab_size = check_int("vocab_size", vocab_size, 2)
    seq_len = check_int("seq_len", seq_len, 1)
    schema = schema_pb2.Schema()
    feature = schema.feature.add(name=feature_name, type=schema_pb2.INT)
    feature.int_domain.min = 0
    feature.int_domain.max = vocab_size - 1
    feature.presence.min_fraction = 1.0
    feature.presence.min_count = 1
    feature.shape.dim.add(size=seq_len)
    return schema


def write_schema(path: str, vocab_size: int, seq_len: int, feature_name: str = FEATURE_KEY) -> str:
    """Write `make_schema(...)` as a text proto to the file ``path`` (local or
    any filesystem TFX's fileio knows, e.g. gs://); returns ``path``."""
    parent = os.path.dirname(path)
    if parent:
        fileio.makedirs(parent)
    io_utils.write_pbtxt_file(path, make_schema(vocab_size, seq_len, feature_name))
    return path


@component
def CuratedSchemaGen(schema: OutputArtifact[standard_artifacts.Schema],
                     vocab_size: Parameter[int], seq_len: Parameter[int],
                     tokenizer: InputArtifact[Tokenizer] = None):
    """With a `tokenizer` (a run on text) the id range is the tokenizer's
    vocabulary, which must be the model's (`vocab_size`, set from the same
    tokenizer when the pipeline was built)."""
    if tokenizer is not None:
        pieces = tokenizer.get_int_custom_property("vocab_size")
        if pieces != vocab_size:
            raise ValueError(f"CuratedSchemaGen: the tokenizer has {pieces} pieces but the model's "
                             f"vocab_size is {vocab_size}")
        vocab_size = pieces
    fileio.makedirs(schema.uri)
    write_schema(os.path.join(schema.uri, "schema.pbtxt"), vocab_size, seq_len)
