"""The whole pipeline on LocalDagRunner (tiny config), and every way a bad
run must stop before anything is pushed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

LOOSE_GATE = {"max_loss_gap_nats": 5.0, "max_expert_load_ratio": 100.0, "max_expert_load_cv": 5.0,
              "min_gain_over_uniform_nats": 0.05}


def _settings(run_dir, **changes):
    from pipeline.settings import PipelineSettings

    values = dict(run_dir=str(run_dir), preset="tiny", seq_len=16, train_examples=512,
                  eval_examples=64, train_steps=30, batch_size=16, eval_steps=2,
                  checkpoint_every=10, log_every=10, thresholds=LOOSE_GATE)
    values.update(changes)
    return PipelineSettings(**values)


def _env():
    return {**os.environ, "PYTHONPATH": os.getcwd()}


def _run(settings):
    from pipeline.local_runner import run_local

    run_local(settings)


def _info(settings):
    from app.inspect_metadata import collect

    return collect(settings.path("metadata"))


def _states(info):
    return {e["component"]: e["state"] for e in info["executions"]}


def _blessing(info, kind, newest=True):
    found = [b for b in info["blessings"] if b["type"] == kind]
    return found[-1] if newest else found


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    settings = _settings(tmp_path_factory.mktemp("good"))
    _run(settings)
    return settings


def test_pipeline_trains_blesses_and_pushes(good_run):
    info = _info(good_run)
    states = _states(info)
    for component in ("SyntheticTokenExampleGen", "StatisticsGen", "CuratedSchemaGen",
                      "ExampleValidator", "DataValidationGate", "Trainer", "Evaluator",
                      "IntegrationValidator", "Pusher"):
        assert states.get(component) == "COMPLETE", (component, states)
    assert sorted(b["type"] for b in info["blessings"]) == ["InfraBlessing", "ModelBlessing"]
    for blessing in info["blessings"]:
        assert blessing["properties"]["blessed"] == 1 and blessing["failures"] == [], blessing
    types = [step["type"] for step in info["lineage"]]
    assert types[0] == "PushedModel" and "Model" in types and "Examples" in types
    serving = good_run.path("serving")
    versions = os.listdir(serving)
    assert len(versions) == 1
    assert os.path.exists(os.path.join(serving, versions[0], "saved_model.pb"))
    examples = next(a for a in info["artifacts"] if a["type"] == "Examples")
    assert examples["properties"]["optimal_loss"] > 0


def test_pushed_model_generates(good_run):
    from app.serving import generate_from_pushed

    out, _ = generate_from_pushed(good_run.path("serving"), [[1, 2, 3], [4]], 5)
    assert np.asarray(out).shape == (2, 5)
    assert np.all((np.asarray(out) >= 0) & (np.asarray(out) < 64))


def test_evaluator_writes_a_tfma_evaluation(good_run):
    import tensorflow_model_analysis as tfma

    from components.evaluation import data_optimal_loss

    info = _info(good_run)
    (evaluation,) = [a for a in info["artifacts"] if a["type"] == "ModelEvaluation"]
    result = tfma.load_eval_result(evaluation["uri"])
    ((slice_key, metrics),) = result.slicing_metrics  # one overall slice
    assert slice_key == ()
    values = {k: v["doubleValue"] for k, v in metrics[""][""].items()}
    assert values["example_count"] == good_run.eval_examples
    loss = values["token_loss"]
    # A trained model: better than uniform guessing, not better than the data's optimum.
    assert data_optimal_loss(good_run) - 1e-3 < loss < np.log(64)
    assert values["perplexity"] == pytest.approx(np.exp(loss), rel=1e-9)
    assert 0 < values["next_token_accuracy"] < 1
    assert tfma.load_validation_result(evaluation["uri"]).validation_ok
    # First run: nothing blessed before, so no baseline and no change.
    (summary,) = info["evaluations"]
    assert summary["metrics"]["token_loss"] == pytest.approx(loss) and summary["change"] == {}


def test_token_loss_signature_matches_the_keras_model(good_run):
    """TFMA's token_loss is the corpus per-token loss of the Keras model."""
    import keras
    import tensorflow as tf

    import model.deepseek_v3  # noqa: F401
    from data.tfrecord import make_dataset, serialize_sequences
    from model.deepseek_v3 import sparse_ce

    info = _info(good_run)
    model_uri = next(a["uri"] for a in info["artifacts"] if a["type"] == "Model")
    examples_uri = next(a["uri"] for a in info["artifacts"] if a["type"] == "Examples")
    tokens = np.concatenate([b["input_ids"].numpy() for b in make_dataset(
        os.path.join(examples_uri, "Split-eval", "*"), good_run.seq_len, 64, shuffle=False)])
    keras_model = keras.saving.load_model(os.path.join(model_uri, "keras", "model.keras"))
    reference = float(np.mean(sparse_ce(keras_model(tokens[:, :], training=False)[:, :-1], tokens[:, 1:])))
    signature = tf.saved_model.load(os.path.join(model_uri, "Format-Serving")).signatures["token_metrics"]
    out = signature(examples=tf.constant(serialize_sequences(tokens)))
    assert np.all(out["token_count"].numpy() == good_run.seq_len - 1)
    weighted = float(np.sum(out["example_loss"] * out["token_count"]) / np.sum(out["token_count"]))
    assert weighted == pytest.approx(reference, rel=1e-4)
    (evaluation,) = [e for e in info["evaluations"] if not e["change"]]
    assert evaluation["metrics"]["token_loss"] == pytest.approx(reference, rel=1e-4)


def test_gate_report_is_written(good_run):
    info = _info(good_run)
    report = next(a for a in info["artifacts"] if a["type"].endswith("ValidationReport"))
    with open(os.path.join(report["uri"], "report.json")) as f:
        content = json.load(f)
    assert content["blessed"] is True
    assert set(content["checks"]) == {"forward_pass", "gradient_flow", "expert_utilization", "memory",
                                      "decode_parity", "savedmodel_parity"}
    assert all(check["seconds"] > 0 for check in content["checks"].values())  # where the gate's time goes
    assert os.path.exists(os.path.join(report["uri"], "report.md"))


def test_second_run_reuses_cached_results_and_compares_with_the_baseline(good_run):
    _run(good_run)
    info = _info(good_run)
    assert len(info["runs"]) == 2
    cached = [e["component"] for e in info["executions"] if e["state"] == "CACHED"]
    assert "Trainer" in cached and "SyntheticTokenExampleGen" in cached
    # The Evaluator now has a baseline (the model blessed by the first run: the
    # same, cached model), so it runs again and reports a change of zero.
    first, second = info["evaluations"]
    assert first["change"] == {} and second["change"]["token_loss"] == pytest.approx(0, abs=1e-6)
    assert second["baseline"]["token_loss"] == pytest.approx(first["metrics"]["token_loss"])
    assert second["validated"] is True
    # ... and blesses the same model again, which is already served: nothing new is pushed.
    assert len(os.listdir(good_run.path("serving"))) == 1
    pushed = [a for a in info["artifacts"] if a["type"] == "PushedModel"]
    assert pushed[-1]["properties"]["already_pushed"] == 1
    assert pushed[-1]["properties"]["pushed_version"] == pushed[0]["properties"]["pushed_version"]


def test_worse_candidate_than_the_blessed_baseline_is_not_pushed(good_run):
    """Same data, far fewer steps: the Evaluator's change threshold refuses it
    (the value threshold alone, a hair below uniform here, would let it pass)."""
    worse = good_run.replace(train_steps=10, thresholds={**LOOSE_GATE, "min_gain_over_uniform_nats": 1e-3})
    pushed_before = sorted(os.listdir(worse.path("serving")))
    _run(worse)
    info = _info(worse)
    latest = info["evaluations"][-1]
    assert latest["change"]["token_loss"] > worse.thresholds.get("max_regression_nats", 0.02)
    assert latest["validated"] is False
    assert len(latest["failures"]) == 1, latest
    assert latest["failures"][0].startswith("tfma token_loss: change vs baseline +"), latest
    model_blessing = _blessing(info, "ModelBlessing")
    assert model_blessing["properties"]["blessed"] == 0
    assert model_blessing["failures"] == latest["failures"]
    assert _blessing(info, "InfraBlessing")["properties"]["blessed"] == 1  # the checks pass: TFMA refused
    assert sorted(os.listdir(worse.path("serving"))) == pushed_before
    out = subprocess.run([sys.executable, "-m", "app.cli", "inspect", "--run-dir", worse.run_dir],
                         capture_output=True, text=True, check=True, env=_env())
    assert "thresholds FAILED" in out.stdout and "change vs baseline" in out.stdout, out.stdout
    # The lineage is still that of the pushed (first) model, not of the refused one.
    pushed = [a for a in info["artifacts"] if a["type"] == "PushedModel" and a["properties"].get("pushed") == 1]
    assert info["lineage"][0]["artifact_id"] == pushed[-1]["id"]
    assert model_blessing["properties"]["current_model_id"] not in {s["artifact_id"] for s in info["lineage"]}


def test_inspect_cli_shows_the_record(good_run):
    out = subprocess.run([sys.executable, "-m", "app.cli", "inspect", "--run-dir", good_run.run_dir,
                          "--json"], capture_output=True, text=True, check=True, env=_env())
    info = json.loads(out.stdout)
    assert any(a["type"] == "PushedModel" for a in info["artifacts"])
    assert info["lineage"][0]["type"] == "PushedModel"


def test_inspect_reads_the_tfma_evaluations_without_tensorflow(good_run):
    code = ("import json, sys; from app.inspect_metadata import collect; "
            f"info = collect({good_run.path('metadata')!r}); "
            "print(json.dumps([info['evaluations'], 'tensorflow' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=_env())
    evaluations, imported_tensorflow = json.loads(out.stdout)
    assert not imported_tensorflow
    assert evaluations and all(e["metrics"]["token_loss"] > 0 for e in evaluations)
    import tensorflow_model_analysis as tfma

    from app import tfma_files

    for evaluation in evaluations:  # the same records TFMA's own readers give
        uri = evaluation["uri"]
        assert ([m.SerializeToString() for m in tfma_files.load_metrics(uri)]
                == [m.SerializeToString() for m in tfma.load_metrics(uri)])
        assert (tfma_files.load_validation_result(uri).SerializeToString()
                == tfma.load_validation_result(uri).SerializeToString())


def test_model_failing_the_value_threshold_is_not_pushed(tmp_path):
    settings = _settings(tmp_path, thresholds={**LOOSE_GATE, "max_loss_gap_nats": 1e-6})
    _run(settings)
    info = _info(settings)
    blessing = _blessing(info, "ModelBlessing")
    assert blessing["properties"]["blessed"] == 0
    assert any(f.startswith("tfma token_loss:") and "> upper bound" in f for f in blessing["failures"]), blessing
    pushed = [a for a in info["artifacts"] if a["type"] == "PushedModel"]
    assert all(a["properties"].get("pushed") != 1 for a in pushed)
    serving = settings.path("serving")
    assert not os.path.isdir(serving) or not os.listdir(serving)


def test_diverging_training_fails_the_trainer_and_pushes_nothing(tmp_path):
    settings = _settings(tmp_path, learning_rate=1e9, warmup_steps=1)
    with pytest.raises(Exception, match="diverged"):
        _run(settings)
    states = _states(_info(settings))
    assert states.get("Trainer") == "FAILED"
    assert "Pusher" not in states and "IntegrationValidator" not in states and "Evaluator" not in states


def _write_user_examples(root, train_rows, eval_rows, feature="input_ids"):
    import tensorflow as tf

    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        with tf.io.TFRecordWriter(os.path.join(root, split, "data.tfrecord")) as writer:
            for row in rows:
                example = tf.train.Example(features=tf.train.Features(feature={
                    feature: tf.train.Feature(int64_list=tf.train.Int64List(value=list(row)))}))
                writer.write(example.SerializeToString())


def _good_rows(n, seq_len=16, vocab=64, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq_len)).tolist()


@pytest.mark.parametrize("case, train, eval_, feature, expected", [
    ("out_of_range", _good_rows(64)[:-1] + [[70] * 16], _good_rows(32, seed=1), "input_ids",
     "Out-of-range"),
    ("wrong_length", _good_rows(64), _good_rows(31, seed=1) + [[1] * 9], "input_ids", "input_ids"),
    ("missing_feature", _good_rows(64), _good_rows(32, seed=1), "tokens", "input_ids"),
    ("empty_eval", _good_rows(64), [], "input_ids", "eval"),
])
def test_bad_data_stops_before_the_trainer(tmp_path, case, train, eval_, feature, expected):
    data_dir = tmp_path / "user_data"
    _write_user_examples(str(data_dir), train, eval_, feature)
    settings = _settings(tmp_path / "run", examples_dir=str(data_dir))
    with pytest.raises(Exception, match=expected):
        _run(settings)
    states = _states(_info(settings))
    assert states.get("DataValidationGate") == "FAILED", states
    assert "Trainer" not in states and "Pusher" not in states
    assert not os.path.isdir(settings.path("serving"))


def test_invalid_settings_are_refused_before_anything_runs(tmp_path):
    from pipeline.settings import SettingsError

    with pytest.raises(SettingsError, match="top_k"):
        _settings(tmp_path, model_overrides={"num_experts_per_tok": 99})
    with pytest.raises(SettingsError, match="max_position_embeddings"):
        _settings(tmp_path, seq_len=4096)
    with pytest.raises(SettingsError, match="expert_parallel: 3 does not divide the model's 4"):
        _settings(tmp_path, expert_parallel=3)
    with pytest.raises(SettingsError, match="gradient_accumulation"):
        _settings(tmp_path, gradient_accumulation=0)
    run_dir = tmp_path / "cli_run"
    out = subprocess.run([sys.executable, "-m", "app.cli", "run", "--run-dir", str(run_dir),
                          "--preset", "tiny", "--model-overrides", '{"n_group": 3}'],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "n_group" in out.stderr
    assert not run_dir.exists()


def test_cli_run_with_expert_parallel_4_on_8_virtual_devices_is_blessed_and_pushed(tmp_path):
    """The Trainer's engine child inherits XLA_FLAGS: 8 CPU devices, mesh 2 x 4."""
    import glob

    run_dir = tmp_path / "ep_run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = subprocess.run([sys.executable, "-m", "app.cli", "run", "--run-dir", str(run_dir),
                          "--preset", "tiny", "--seq-len", "16", "--train-examples", "512",
                          "--eval-examples", "64", "--steps", "30", "--batch-size", "16",
                          "--expert-parallel", "4", "--thresholds", json.dumps(LOOSE_GATE)],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    (summary_path,) = glob.glob(str(run_dir / "**" / "training_summary.json"), recursive=True)
    with open(summary_path) as f:
        summary = json.load(f)
    assert summary["backend"] == "jax" and summary["num_devices"] == 8
    assert summary["mesh"] == {"batch": 2, "expert": 4} and summary["expert_parallel"] == 4
    # The experts ran per device with all-to-all; overflowing steps are counted, none dropped.
    dispatch = summary["dispatch"]
    assert dispatch["capacity_factor"] == 1.5 and dispatch["recompute"] is True
    assert 0 <= dispatch["overflow_steps"] <= 30
    assert dispatch["extra_rounds"] >= dispatch["overflow_steps"]
    assert all(e["dropped_fraction"] == 0 for e in summary["expert_utilization_last_interval"].values())
    info = _info(_settings(run_dir))
    assert sorted(b["type"] for b in info["blessings"]) == ["InfraBlessing", "ModelBlessing"]
    for blessing in info["blessings"]:
        assert blessing["properties"]["blessed"] == 1, blessing
    assert _states(info).get("Pusher") == "COMPLETE"
    assert len(os.listdir(run_dir / "serving")) == 1
