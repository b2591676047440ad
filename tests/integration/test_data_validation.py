"""Curated schema + ExampleValidator + DataValidationGate under LocalDagRunner.

Pipeline per case: ImportExampleGen(input_base with train/ and eval/ TFRecords)
-> StatisticsGen -> ImportSchemaGen(our schema) -> ExampleValidator
-> DataValidationGate -> TrainerStandIn (ordered after the gate only through
``add_upstream_node``). One good run is shared; each bad case is one run.
"""

import os
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tfx")

from ml_metadata import metadata_store  # noqa: E402
from ml_metadata.proto import metadata_store_pb2  # noqa: E402
from tensorflow_metadata.proto.v0 import schema_pb2  # noqa: E402
from tfx import v1 as tfx  # noqa: E402

import data  # noqa: E402
from components.curated_schema import make_schema, write_schema  # noqa: E402
from components.data_validation import DataValidationError, DataValidationGate  # noqa: E402

pytestmark = pytest.mark.integration

VOCAB, SEQ_LEN = 50, 8
SPEC = data.DataSpec("uniform", vocab_size=VOCAB, seq_len=SEQ_LEN, seed=0)
NUM_TRAIN, NUM_EVAL = 24, 12


@tfx.dsl.components.component
def TrainerStandIn(marker: tfx.dsl.components.OutputArtifact[tfx.types.standard_artifacts.String]):
    """Stands in for the Trainer: records that it ran."""
    marker.value = "ran"


def _write_gzip(path, examples):
    # ImportExampleGen reads with beam.io.ReadFromTFRecord(compression AUTO):
    # files ending in .gz are read as GZIP, everything else as uncompressed.
    with tf.io.TFRecordWriter(str(path), options="GZIP" if str(path).endswith(".gz") else "") as w:
        for ex in examples:
            w.write(ex.SerializeToString())


def _token_examples(tokens):
    return [data.sequence_to_example(row) for row in np.asarray(tokens, dtype=np.int64)]


def _good_train():
    return _token_examples(data.generate(SPEC, NUM_TRAIN))


def _good_eval():
    return _token_examples(data.generate(SPEC, NUM_EVAL, start_index=10_000))


def _validation_components(example_gen, schema_file):
    """StatisticsGen -> ImportSchemaGen -> ExampleValidator -> DataValidationGate,
    and a Trainer stand-in wired after the gate as the real pipeline does."""
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.ImportSchemaGen(schema_file=schema_file)
    validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"])
    gate = DataValidationGate(anomalies=validator.outputs["anomalies"], statistics=statistics_gen.outputs["statistics"])
    trainer = TrainerStandIn()
    trainer.add_upstream_node(gate)
    return statistics_gen, schema_gen, validator, gate, trainer


def _run_pipeline(root, train_examples, eval_examples):
    """Writes the inputs, runs the pipeline; returns (exception or None, {node_id: state})."""
    input_base = root / "input"
    os.makedirs(input_base / "train")
    os.makedirs(input_base / "eval")
    _write_gzip(input_base / "train" / "part-0.gz", train_examples)  # GZIP
    _write_gzip(input_base / "eval" / "part-0.tfrecord", eval_examples)  # uncompressed
    schema_file = write_schema(str(root / "schema" / "schema.pbtxt"), VOCAB, SEQ_LEN)

    example_gen = tfx.components.ImportExampleGen(
        input_base=str(input_base),
        input_config=tfx.proto.Input(splits=[
            tfx.proto.Input.Split(name="train", pattern="train/*"),
            tfx.proto.Input.Split(name="eval", pattern="eval/*"),
        ]),
    )
    statistics_gen, schema_gen, validator, gate, trainer = _validation_components(example_gen, schema_file)

    mlmd_config = tfx.orchestration.metadata.sqlite_metadata_connection_config(str(root / "mlmd.sqlite"))
    pipeline = tfx.dsl.Pipeline(
        pipeline_name="data-validation-test",
        pipeline_root=str(root / "pipeline_root"),
        metadata_connection_config=mlmd_config,
        # The stand-in is listed first: only add_upstream_node orders it after the gate.
        components=[trainer, example_gen, statistics_gen, schema_gen, validator, gate],
        enable_cache=False,
    )
    error = None
    try:
        tfx.orchestration.LocalDagRunner().run(pipeline)
    except Exception as e:  # noqa: BLE001 (inspected by the tests)
        error = e

    store = metadata_store.MetadataStore(mlmd_config)
    type_names = {t.id: t.name for t in store.get_execution_types()}
    states = {}
    for execution in store.get_executions():
        name = type_names[execution.type_id].rsplit(".", 1)[-1]
        states[name] = metadata_store_pb2.Execution.State.Name(execution.last_known_state)
    return error, states, store


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    start = time.time()
    result = _run_pipeline(tmp_path_factory.mktemp("good"), _good_train(), _good_eval())
    print(f"good pipeline run: {time.time() - start:.1f}s")
    return result


def test_make_schema():
    schema = make_schema(VOCAB, SEQ_LEN)
    [feature] = schema.feature
    assert feature.name == "input_ids" and feature.type == schema_pb2.INT
    assert (feature.int_domain.min, feature.int_domain.max) == (0, VOCAB - 1)
    assert feature.presence.min_fraction == 1.0
    assert [d.size for d in feature.shape.dim] == [SEQ_LEN]
    with pytest.raises(ValueError, match="vocab_size"):
        make_schema(1, SEQ_LEN)


def test_good_data_passes(good_run):
    error, states, store = good_run
    assert error is None, error
    assert states["DataValidationGate"] == "COMPLETE"
    assert states["TrainerStandIn"] == "COMPLETE"
    [result] = [a for a in store.get_artifacts_by_type("String") if "result" in a.uri]
    assert result.custom_properties["passed"].int_value == 1
    assert result.custom_properties["num_examples_train"].int_value == NUM_TRAIN
    assert result.custom_properties["num_examples_eval"].int_value == NUM_EVAL
    with open(result.uri) as f:
        assert '"passed": true' in f.read()


def _shift(tokens, row, col, value):
    tokens = np.array(tokens, dtype=np.int64)
    tokens[row, col] = value
    return tokens


def _renamed_feature_examples(tokens):
    out = []
    for row in np.asarray(tokens, dtype=np.int64):
        ex = tf.train.Example()
        ex.features.feature["tokens"].int64_list.value.extend(row.tolist())
        out.append(ex)
    return out


BAD_CASES = {
    # train has id == vocab_size, eval has id -1: one anomaly per split.
    "out_of_range": (
        lambda: _token_examples(_shift(data.generate(SPEC, NUM_TRAIN), 3, 2, VOCAB)),
        lambda: _token_examples(_shift(data.generate(SPEC, NUM_EVAL, 10_000), 0, 0, -1)),
        [("train", "input_ids", "Out-of-range values", "Unexpectedly large value: 50"),
         ("eval", "input_ids", "Out-of-range values", "Unexpectedly small value: -1")],
    ),
    "wrong_length": (
        _good_train,
        lambda: _token_examples(data.generate(data.DataSpec("uniform", VOCAB, SEQ_LEN + 1), NUM_EVAL)),
        [("eval", "input_ids", "Feature shape dropped", "fixed value length 9")],
    ),
    "missing_input_ids": (
        _good_train,
        lambda: _renamed_feature_examples(data.generate(SPEC, NUM_EVAL, 10_000)),
        [("eval", "input_ids", "Column dropped", "SCHEMA_MISSING_COLUMN"),
         ("eval", "tokens", "New column", "SCHEMA_NEW_COLUMN")],
    ),
    "empty_eval": (
        _good_train,
        lambda: [],
        [("eval", None, "Empty split", "num_examples = 0")],
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_data_fails_the_gate(case, tmp_path):
    make_train, make_eval, expected = BAD_CASES[case]
    start = time.time()
    error, states, _ = _run_pipeline(tmp_path, make_train(), make_eval())
    print(f"{case} pipeline run: {time.time() - start:.1f}s")
    assert isinstance(error, DataValidationError), repr(error)
    message = str(error)
    print(message)
    for split, feature, short, detail in expected:
        matching = [
            p for p in error.problems
            if p.split == split and p.feature == feature and p.short_description == short
            and detail in f"{p.anomaly_type}: {p.description}"
        ]
        assert matching, f"expected [{split}] {feature} {short} ({detail}) in:\n{message}"
        for p in matching:
            assert str(p) in message
        assert f"[{split}]" in message and short in message
        if feature:
            assert f"feature '{feature}'" in message
    # Upstream components succeeded, the gate failed, and the Trainer never ran.
    assert states["ExampleValidator"] == "COMPLETE"
    assert states["DataValidationGate"] == "FAILED"
    assert "TrainerStandIn" not in states


def test_kubeflow_v2_compilation(tmp_path):
    """The gate compiles for KubeflowV2 and add_upstream_node becomes a task dependency."""
    import json

    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner

    schema_file = write_schema(str(tmp_path / "schema.pbtxt"), VOCAB, SEQ_LEN)
    example_gen = tfx.components.ImportExampleGen(input_base="gs://bucket/input")
    statistics_gen, schema_gen, validator, gate, trainer = _validation_components(example_gen, schema_file)
    pipeline = tfx.dsl.Pipeline(
        pipeline_name="data-validation-kfp",
        pipeline_root="gs://bucket/root",
        components=[example_gen, statistics_gen, schema_gen, validator, gate, trainer],
    )
    out = tmp_path / "pipeline.json"
    runner = kubeflow_v2_dag_runner.KubeflowV2DagRunner(
        config=kubeflow_v2_dag_runner.KubeflowV2DagRunnerConfig(default_image="gcr.io/project/image:tag"),
        output_dir=str(tmp_path), output_filename=out.name)
    runner.run(pipeline, write_out=True)
    spec = json.loads(out.read_text())
    spec = spec.get("pipelineSpec", spec)
    tasks = spec["root"]["dag"]["tasks"]
    assert "DataValidationGate" in tasks["TrainerStandIn"]["dependentTasks"]
    assert set(tasks["DataValidationGate"]["dependentTasks"]) == {"ExampleValidator", "StatisticsGen"}
    executors = spec["deploymentSpec"]["executors"]
    gate_args = " ".join(executors["DataValidationGate_executor"]["container"]["args"])
    assert "components.data_validation.DataValidationGateExecutor" in gate_args


def _fake_inputs(tmp_path, counts, validated):
    """ExampleStatistics with {split: num_examples} and clean ExampleAnomalies for `validated` splits."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2, statistics_pb2
    from tfx.types import artifact_utils, standard_artifacts

    stats = standard_artifacts.ExampleStatistics()
    stats.uri = str(tmp_path / "stats")
    stats.split_names = artifact_utils.encode_split_names(list(counts))
    for split, n in counts.items():
        os.makedirs(tmp_path / "stats" / f"Split-{split}")
        proto = statistics_pb2.DatasetFeatureStatisticsList(datasets=[{"num_examples": n}])
        (tmp_path / "stats" / f"Split-{split}" / "FeatureStats.pb").write_bytes(proto.SerializeToString())
    anomalies = standard_artifacts.ExampleAnomalies()
    anomalies.uri = str(tmp_path / "anomalies")
    anomalies.split_names = artifact_utils.encode_split_names(list(validated))
    for split in validated:
        os.makedirs(tmp_path / "anomalies" / f"Split-{split}")
        (tmp_path / "anomalies" / f"Split-{split}" / "SchemaDiff.pb").write_bytes(
            anomalies_pb2.Anomalies().SerializeToString())
    return {"anomalies": [anomalies], "statistics": [stats]}


def test_gate_executor_split_checks(tmp_path):
    """Executor-level: unvalidated/missing required splits and min_examples."""
    from tfx.types import standard_artifacts

    from components.data_validation import DataValidationGateExecutor

    def run(sub, counts, validated, **props):
        inputs = _fake_inputs(tmp_path / sub, counts, validated)
        result = standard_artifacts.String()
        result.uri = str(tmp_path / sub / "result_value")
        DataValidationGateExecutor().Do(inputs, {"result": [result]}, props)
        return result

    with pytest.raises(DataValidationError) as info:
        run("a", {"train": 5, "eval": 3}, ["train"])  # eval excluded from ExampleValidator
    assert [(p.split, p.anomaly_type) for p in info.value.problems] == [("eval", "SPLIT_NOT_VALIDATED")]

    with pytest.raises(DataValidationError) as info:
        run("b", {"train": 5}, ["train"])
    assert [(p.split, p.anomaly_type) for p in info.value.problems] == [("eval", "SPLIT_MISSING")]

    with pytest.raises(DataValidationError, match=r"\[eval\] dataset: Too few examples .*num_examples = 3 < min_examples = 4"):
        run("c", {"train": 5, "eval": 3}, ["train", "eval"], min_examples=4)

    result = run("d", {"train": 5}, ["train"], required_splits='["train"]')
    assert result.value == '{"passed": true, "splits": {"train": {"num_examples": 5}}}'
    assert result.get_int_custom_property("num_examples_train") == 5
