"""CuratedSchemaGen: writes the token schema we *know* (not one inferred from
the data, which would happily learn whatever is wrong with it): `input_ids`
is a required INT feature of exactly seq_len values in [0, vocab_size).

Written inside the executor, so it needs no file shipped with the pipeline
(works the same on LocalDagRunner and Kubeflow)."""

import os

from tfx.dsl.component.experimental.annotations import OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import standard_artifacts


@component
def CuratedSchemaGen(schema: OutputArtifact[standard_artifacts.Schema],
                     vocab_size: Parameter[int], seq_len: Parameter[int]):
    from components.data_validation import write_schema

    os.makedirs(schema.uri, exist_ok=True)
    write_schema(os.path.join(schema.uri, "schema.pbtxt"), vocab_size, seq_len)
