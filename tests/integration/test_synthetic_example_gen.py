"""SyntheticTokenExampleGen: the executor's Do on a tmp artifact, construction
validation, and one LocalDagRunner run of the component."""

import glob
import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tfx")

from tfx.components.util import examples_utils  # noqa: E402
from tfx.types import artifact_utils, standard_artifacts  # noqa: E402

import data  # noqa: E402
from components import synthetic_example_gen as seg  # noqa: E402
from components.synthetic_example_gen import (  # noqa: E402
    SyntheticExampleGenError,
    SyntheticTokenExampleGen,
    SyntheticTokenExampleGenExecutor,
)

pytestmark = pytest.mark.integration

SETTINGS = dict(kind="markov", vocab_size=40, seq_len=12, seed=5, generator_params={"order": 2, "temperature": 0.7})
# 1100 train sequences cross a BLOCK_SIZE boundary: 2 shards, 2 blocks.
NUM_TRAIN, NUM_EVAL = 1100, 37


def _read_split(examples, split, seq_len):
    files = sorted(glob.glob(os.path.join(artifact_utils.get_split_uri([examples], split), "*")))
    rows = []
    for path in files:
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            ex = tf.train.Example.FromString(record.numpy())
            assert list(ex.features.feature) == ["input_ids"]
            rows.append(list(ex.features.feature["input_ids"].int64_list.value))
    assert all(len(r) == seq_len for r in rows)
    return files, np.array(rows, dtype=np.int64).reshape(-1, seq_len)


def _sorted_rows(x):
    return x[np.lexsort(x.T[::-1])] if len(x) else x


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    component = SyntheticTokenExampleGen(train_examples=NUM_TRAIN, eval_examples=NUM_EVAL, **SETTINGS)
    examples = standard_artifacts.Examples()
    examples.uri = str(tmp_path_factory.mktemp("synthetic") / "examples")
    SyntheticTokenExampleGenExecutor().Do({}, {"examples": [examples]}, dict(component.exec_properties))
    return component, examples


def test_layout_and_properties(generated):
    component, examples = generated
    assert artifact_utils.decode_split_names(examples.split_names) == ["train", "eval"]
    for split in ("train", "eval"):
        files, _ = _read_split(examples, split, SETTINGS["seq_len"])
        assert files
        for f in files:
            assert os.path.basename(f).startswith("data_tfrecord-") and f.endswith(".gz")
            assert os.path.dirname(f) == os.path.join(examples.uri, f"Split-{split}")
    assert examples_utils.get_payload_format_string(examples) == "FORMAT_TF_EXAMPLE"
    assert examples_utils.get_file_format(examples) == "tfrecords_gzip"

    spec = data.DataSpec(kind="markov", vocab_size=40, seq_len=12, seed=5, order=2, temperature=0.7)
    described = json.loads(examples.get_string_custom_property("data_spec"))
    assert data.DataSpec.from_dict(described) == spec
    assert described == json.loads(json.dumps(data.describe(spec)))
    assert examples.get_float_custom_property("optimal_loss") == pytest.approx(data.optimal_loss(spec), rel=1e-12)
    assert examples.get_int_custom_property("optimal_loss_is_exact") == 1
    assert examples.get_int_custom_property("num_train") == NUM_TRAIN
    assert examples.get_int_custom_property("num_eval") == NUM_EVAL
    assert examples.get_int_custom_property("vocab_size") == 40
    assert examples.get_int_custom_property("seq_len") == 12
    assert examples.get_int_custom_property("train_start_index") == 0
    assert examples.get_int_custom_property("eval_start_index") == seg.DEFAULT_EVAL_START_INDEX
    assert examples.get_string_custom_property("feature_key") == "input_ids"
    assert json.loads(component.exec_properties["generator_params"]) == SETTINGS["generator_params"]


def test_contents_equal_generate_and_splits_are_disjoint(generated):
    _, examples = generated
    spec = data.DataSpec.from_json(examples.get_string_custom_property("data_spec"))
    _, train = _read_split(examples, "train", spec.seq_len)
    _, evals = _read_split(examples, "eval", spec.seq_len)
    assert train.shape == (NUM_TRAIN, spec.seq_len) and evals.shape == (NUM_EVAL, spec.seq_len)
    for x in (train, evals):
        assert x.min() >= 0 and x.max() < spec.vocab_size
    # Files are not ordered by index (Beam shards), so compare as multisets.
    want_train = data.generate(spec, NUM_TRAIN, 0)
    want_eval = data.generate(spec, NUM_EVAL, seg.DEFAULT_EVAL_START_INDEX)
    np.testing.assert_array_equal(_sorted_rows(train), _sorted_rows(want_train.astype(np.int64)))
    np.testing.assert_array_equal(_sorted_rows(evals), _sorted_rows(want_eval.astype(np.int64)))
    # Held out: the eval index range is disjoint from train's, and (with 40**12
    # possible sequences) no eval sequence collides with a train sequence.
    assert seg.DEFAULT_EVAL_START_INDEX >= NUM_TRAIN
    assert not {tuple(r) for r in train} & {tuple(r) for r in evals}


def test_shard_plan():
    ranges = seg.split_ranges(2500, 10, eval_start_index=4096)
    assert ranges["train"] == [(0, 1024), (1024, 1024), (2048, 452)]
    assert ranges["eval"] == [(4096, 10)]
    assert seg.split_ranges(2500, 10, 4096, num_shards=1)["train"] == [(0, 2500)]


def test_custom_eval_start_and_num_shards(tmp_path):
    component = SyntheticTokenExampleGen(
        kind="copy", vocab_size=7, seq_len=6, seed=1, train_examples=20, eval_examples=5,
        eval_start_index=20, num_shards=3, generator_params='{"prefix_length": 2}',
    )
    examples = standard_artifacts.Examples()
    examples.uri = str(tmp_path / "ex")
    SyntheticTokenExampleGenExecutor().Do({}, {"examples": [examples]}, dict(component.exec_properties))
    spec = data.DataSpec("copy", vocab_size=7, seq_len=6, seed=1, prefix_length=2)
    _, train = _read_split(examples, "train", 6)
    _, evals = _read_split(examples, "eval", 6)
    all_rows = data.generate(spec, 25).astype(np.int64)  # eval = indices 20..24, right after train
    np.testing.assert_array_equal(_sorted_rows(train), _sorted_rows(all_rows[:20]))
    np.testing.assert_array_equal(_sorted_rows(evals), _sorted_rows(all_rows[20:]))
    assert examples.get_float_custom_property("optimal_loss") == pytest.approx(np.log(7) / 5)


BASE = dict(kind="uniform", vocab_size=10, seq_len=4, train_examples=8, eval_examples=2)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(kind="gaussian"), r"DataSpec\.kind: unknown kind 'gaussian'"),
        (dict(vocab_size=1), r"DataSpec\.vocab_size: must be >= 2"),
        (dict(seq_len=1), r"DataSpec\.seq_len: must be >= 2"),
        (dict(seed=-1), r"DataSpec\.seed: must be >= 0"),
        (dict(generator_params={"order": 2}), r"DataSpec\.order: does not apply to kind 'uniform'"),
        (dict(kind="markov", vocab_size=5000, generator_params={"order": 3}), r"DataSpec\.order: .*exceeds"),
        (dict(kind="zipf", generator_params={"exponent": -1}), r"DataSpec\.exponent: must be finite and > 0"),
        (dict(kind="mixture"), r"DataSpec\.components: mixture needs"),
        (dict(generator_params={"bogus": 1}), r"generator_params: .*bogus.*known keys"),
        (dict(generator_params="{not json"), r"generator_params is not valid JSON"),
        (dict(generator_params="[1, 2]"), r"generator_params must be a JSON object"),
        (dict(generator_params={"seq_len": 3}), r"generator_params must not contain \['seq_len'\]"),
        (dict(train_examples=0), r"train_examples must be >= 1"),
        (dict(eval_examples=0), r"eval_examples must be >= 1"),
        (dict(train_examples=2.5), r"train_examples must be an integer"),
        (dict(train_examples=100, eval_start_index=50), r"train range \[0, 100\) overlaps the eval range"),
        (dict(num_shards=-1), r"num_shards must be >= 0"),
    ],
)
def test_bad_parameters_raise_at_construction(overrides, match):
    with pytest.raises(SyntheticExampleGenError, match=match):
        SyntheticTokenExampleGen(**{**BASE, **overrides})


def test_valid_mixture_constructs():
    c = SyntheticTokenExampleGen(
        kind="mixture", vocab_size=16, seq_len=8, train_examples=4, eval_examples=4,
        generator_params={"components": [{"kind": "zipf"}, {"kind": "copy", "prefix_length": 3}], "weights": [3, 1]},
    )
    assert c.outputs["examples"].type is standard_artifacts.Examples


def test_runs_under_local_dag_runner(tmp_path):
    from tfx import v1 as tfx

    gen = SyntheticTokenExampleGen(train_examples=30, eval_examples=6, **SETTINGS)
    pipeline = tfx.dsl.Pipeline(
        pipeline_name="synthetic-example-gen-test",
        pipeline_root=str(tmp_path / "root"),
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            str(tmp_path / "mlmd.sqlite")),
        components=[gen],
        enable_cache=False,
    )
    tfx.orchestration.LocalDagRunner().run(pipeline)

    from ml_metadata import metadata_store
    store = metadata_store.MetadataStore(
        tfx.orchestration.metadata.sqlite_metadata_connection_config(str(tmp_path / "mlmd.sqlite")))
    [artifact] = store.get_artifacts_by_type("Examples")
    props = artifact.custom_properties
    assert props["num_train"].int_value == 30 and props["num_eval"].int_value == 6
    assert props["payload_format"].string_value == "FORMAT_TF_EXAMPLE"
    assert artifact.properties["split_names"].string_value == '["train", "eval"]'
    assert glob.glob(os.path.join(artifact.uri, "Split-train", "data_tfrecord-*.gz"))
    assert glob.glob(os.path.join(artifact.uri, "Split-eval", "data_tfrecord-*.gz"))


def test_kubeflow_v2_compilation_with_runtime_parameter(tmp_path):
    """Compiles for KubeflowV2; a RuntimeParameter defers validation to the executor."""
    from tfx import v1 as tfx
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner

    train_examples = tfx.dsl.experimental.RuntimeParameter(name="train_examples", ptype=int, default=1000)
    gen = SyntheticTokenExampleGen(train_examples=train_examples, eval_examples=100, **SETTINGS)
    pipeline = tfx.dsl.Pipeline(pipeline_name="synthetic-kfp", pipeline_root="gs://bucket/root", components=[gen])
    runner = kubeflow_v2_dag_runner.KubeflowV2DagRunner(
        config=kubeflow_v2_dag_runner.KubeflowV2DagRunnerConfig(default_image="gcr.io/project/image:tag"),
        output_dir=str(tmp_path), output_filename="pipeline.json")
    runner.run(pipeline, write_out=True)
    spec = json.loads((tmp_path / "pipeline.json").read_text())
    spec = spec.get("pipelineSpec", spec)
    executor = spec["deploymentSpec"]["executors"]["SyntheticTokenExampleGen_executor"]
    assert "components.synthetic_example_gen.SyntheticTokenExampleGenExecutor" in " ".join(executor["container"]["args"])
    params = spec["root"]["dag"]["tasks"]["SyntheticTokenExampleGen"]["inputs"]["parameters"]
    # Pipeline spec 2.0 (the default) encodes ints as decimal strings.
    assert int(params["eval_start_index"]["runtimeValue"]["constantValue"]["intValue"]) == seg.DEFAULT_EVAL_START_INDEX
    assert params["train_examples"]["componentInputParameter"] == "train_examples"
