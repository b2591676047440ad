"""The Trainer's run_fn (the TFX adapter around the Keras-on-JAX engine) end
to end on a tiny model: Examples read through a TFX DataAccessor, training in
the engine's child process, resume from checkpoints, divergence guard,
float8, TensorBoard logs, evaluation, the summary and the exported SavedModel."""

import json
import math
import os
import re
import shutil
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tfx")

from tfx.components.trainer.fn_args_utils import FnArgs  # noqa: E402

from components import trainer  # noqa: E402
from components.trainer_config import TrainerConfigError  # noqa: E402
from data import DataSpec, generate, write_tfrecords  # noqa: E402
from data.tfrecord import serialize_sequences  # noqa: E402
from model import get_preset  # noqa: E402
from training.host_devices import cpu_devices  # noqa: E402
from training.optim import WarmupCosineSchedule  # noqa: E402
from training.settings import TrainingSettings  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_LEN, BATCH = 16, 8
SPEC = DataSpec("markov", vocab_size=64, seq_len=SEQ_LEN, seed=0)
TINY = get_preset("tiny")


# ----------------------------------------------------------------- helpers
def _training(**overrides):
    values = {"batch_size": BATCH, "learning_rate": 3e-3, "warmup_steps": 5, "weight_decay": 0.01,
              "checkpoint_every": 10, "log_every": 5, "precision": "auto", "seed": 0}
    values.update(overrides)
    return values


def _custom_config(seq_len=SEQ_LEN, model_config=None, **training):
    return {"model_config": (model_config or TINY).to_dict(), "seq_len": seq_len,
            "training": _training(**training)}


def _data_accessor(examples):
    """What TFX's GenericExecutor gives run_fn for an Examples artifact."""
    from tfx.components.trainer.fn_args_utils import DataAccessor
    from tfx.components.util import tfxio_utils
    from tfx.types import artifact_utils, standard_artifacts

    artifact = standard_artifacts.Examples()
    artifact.uri = examples
    artifact.split_names = artifact_utils.encode_split_names(["train", "eval"])
    return DataAccessor(
        tf_dataset_factory=tfxio_utils.get_tf_dataset_factory_from_artifact([artifact], []),
        record_batch_factory=None, data_view_decode_fn=None)


def _fn_args(root, examples, train_steps=20, eval_steps=2, custom_config=None, **training):
    root = str(root)
    return FnArgs(
        data_accessor=_data_accessor(examples),
        train_files=[os.path.join(examples, "Split-train", "*")],  # TFX's pattern form
        eval_files=[os.path.join(examples, "Split-eval")],  # a bare directory also works
        train_steps=train_steps, eval_steps=eval_steps,
        serving_model_dir=os.path.join(root, "model", "Format-Serving"),
        model_run_dir=os.path.join(root, "model_run"),
        custom_config=custom_config or _custom_config(**training))


def _run(fn_args):
    lines = []
    summary = trainer.run_fn(fn_args, log_fn=lines.append)
    return summary, lines


def _artifact(fn_args):
    return os.path.dirname(fn_args.serving_model_dir)


def _load_keras(fn_args):
    import model.deepseek_v3  # noqa: F401  (registers the classes)

    return keras.saving.load_model(os.path.join(_artifact(fn_args), "keras", "model.keras"))


def _checkpoint_values(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files if k != "__fingerprint__"}


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """A TFX-shaped Examples artifact: Split-train / Split-eval of GZIP TFRecords."""
    uri = tmp_path_factory.mktemp("examples")
    tokens = generate(SPEC, 256)
    for split, rows in (("train", tokens[:192]), ("eval", tokens[192:])):
        os.makedirs(uri / f"Split-{split}")
        write_tfrecords(str(uri / f"Split-{split}" / "data_tfrecord-00000-of-00001.gz"), rows)
    return str(uri)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, examples):
    """One uninterrupted 20-step run (checkpoints every 10, logs every 5);
    the summary gains `engine_returned_at`: when the engine's process had
    ended and the Trainer went on (what "live" events must precede)."""
    from training import launch

    fn_args = _fn_args(tmp_path_factory.mktemp("trained"), examples)
    run_worker, returned = launch.run_worker, []

    def timed_run_worker(*args, **kwargs):
        result = run_worker(*args, **kwargs)
        returned.append(time.time())
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "run_worker", timed_run_worker)
        summary, lines = _run(fn_args)
    (summary["engine_returned_at"],) = returned
    return fn_args, summary, lines


# ------------------------------------------------------------------- tests
def test_run_fn_trains_logs_and_writes_artifacts(trained):
    fn_args, summary, lines = trained
    artifact = _artifact(fn_args)
    assert summary["final_step"] == 20 and summary["start_step"] == 0 and not summary["resumed"]
    # One CPU device per core that divides the batch (training.host_devices).
    devices = cpu_devices(TrainingSettings(batch_size=BATCH)).count
    assert summary["backend"] == "jax" and summary["num_devices"] == devices
    assert summary["cpu_devices"]["count"] == devices and any(
        f"the engine gets {devices} CPU device(s)" in line for line in lines)
    assert summary["mesh"] == {"batch": devices, "expert": 1} and summary["expert_parallel"] == 1
    assert summary["precision"] == {"requested": "auto", "policy": "float32", "float8": False}
    assert summary["tokens_per_second"] > 0 and summary["gradient_accumulation"] == 1
    phases = summary["phase_seconds"]
    assert list(phases) == ["read_inputs", "engine", "load_weights", "evaluate", "export_keras",
                            "export_saved_model", "export_hf"]
    assert all(s >= 0 for s in phases.values()) and phases["engine"] > summary["train_seconds"]
    assert sum(phases.values()) <= summary["wall_seconds"]
    assert sum(summary["expert_load_per_layer"]["layers_1"]) == pytest.approx(1.0)

    # The summary on disk is what run_fn returned (what the gate reads).
    with open(os.path.join(artifact, "training_summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk["seq_len"] == SEQ_LEN and on_disk["eval_loss"] == pytest.approx(summary["eval_loss"])
    assert on_disk["model_config"] == TINY.to_dict()

    # Console: one line per 5 steps with step/total, loss, ppl, tokens/s, ETA.
    progress = [l for l in lines if l.startswith("step")]
    pattern = r"step\s+(\d+)/20 \| loss ([\d.]+) \| ppl ([\d.]+) \| lr \S+ \| [\d,]+ tok/s \| ETA \d+:\d\d"
    steps = [int(re.match(pattern, l).group(1)) for l in progress]
    assert steps == [5, 10, 15, 20]
    history = summary["loss_history"]
    assert [h["step"] for h in history] == [5, 10, 15, 20]
    for h in history:
        assert h["perplexity"] == pytest.approx(math.exp(h["next_token_loss"]))
    # It learns: the last interval's loss is below the first's and below uniform.
    assert history[-1]["loss"] < history[0]["loss"] < math.log(SPEC.vocab_size) + 0.05
    assert history[-1]["loss"] < math.log(SPEC.vocab_size)

    # Checkpoints at 10 and 20 (the last two kept) in <model_run_dir>/checkpoints.
    assert summary["checkpoint_dir"] == os.path.join(fn_args.model_run_dir, "checkpoints")
    assert summary["checkpoint_steps"] == [10, 20]

    # MoE statistics cover exactly the tokens of the last 5-step interval.
    moe = summary["expert_utilization_last_interval"]["layers_1"]
    assert moe["assignments"] == 5 * BATCH * SEQ_LEN * TINY.num_experts_per_tok
    assert sum(moe["load_fraction"]) == pytest.approx(1.0)
    assert moe["load_max_min_ratio"] >= 1.0 and moe["dropped_fraction"] >= 0.0


SCALAR_TAGS = ("train/loss", "train/next_token_loss", "train/perplexity", "train/learning_rate",
               "train/tokens_per_second", "train/grad_norm")
MOE_TAGS = ("load_max_min_ratio", "load_max", "load_min", "load_cv", "bias_mean", "bias_spread",
            "dropped_fraction")


def _events(log_dir):
    """{tag: [(step, wall_time, value, plugin)]} over every event file, in
    file and write order (a duplicated step shows twice)."""
    from tensorboard.compat.proto import event_pb2

    events, plugins = {}, {}
    for name in sorted(tf.io.gfile.listdir(log_dir)):
        if "tfevents" not in name:
            continue
        for raw in tf.data.TFRecordDataset(os.path.join(log_dir, name)).as_numpy_iterator():
            event = event_pb2.Event.FromString(raw)
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name or plugins.get(value.tag)
                plugins[value.tag] = plugin
                events.setdefault(value.tag, []).append(
                    (event.step, event.wall_time, tf.make_ndarray(value.tensor), plugin))
    return events


def _steps(points):
    return [p[0] for p in points]


def _scalar(points, step):
    (value,) = [float(p[2]) for p in points if p[0] == step]
    return value


def test_tensorboard_events_are_written_live(trained):
    """A point per log interval for every scalar (engine metrics, per MoE layer
    balance), written while the engine still ran; the expert load of each
    MoE layer as a heatmap image and a histogram; eval at the end."""
    fn_args, summary, _ = trained
    events = _events(fn_args.model_run_dir)
    layers = sorted(summary["expert_load_per_layer"])
    assert layers == ["layers_1"]
    tags = list(SCALAR_TAGS) + [f"moe/{layer}/{key}" for layer in layers for key in MOE_TAGS]
    for tag in tags:
        assert _steps(events[tag]) == [5, 10, 15, 20], tag
        assert {p[3] for p in events[tag]} == {"scalars"}, tag
    history = {h["step"]: h for h in summary["loss_history"]}
    for step in (5, 10, 15, 20):
        assert _scalar(events["train/loss"], step) == pytest.approx(history[step]["loss"], rel=1e-6)
        assert _scalar(events["train/grad_norm"], step) == pytest.approx(history[step]["grad_norm"], rel=1e-6)
        assert history[step]["grad_norm"] > 0
    # Warmup reaches the peak at the 5th update; cosine decay follows.
    assert _scalar(events["train/learning_rate"], 5) == pytest.approx(3e-3)
    assert _scalar(events["train/learning_rate"], 20) < _scalar(events["train/learning_rate"], 10) < 3e-3
    # Live: the curves were on disk, from the first interval on, while the
    # engine still ran, not after it (later points may trail the engine a
    # little; under load, so may the first one trail its last step).
    ended = summary["engine_returned_at"]
    assert summary["train_finished_at"] < ended
    for tag in tags:
        step, wall_time = events[tag][0][:2]
        assert step == 5 and wall_time < ended, (tag, wall_time, ended)
        assert [p[1] for p in events[tag]] == sorted(p[1] for p in events[tag]), tag
    # Balance scalars agree with the engine's interval statistics.
    last = summary["expert_utilization_last_interval"]["layers_1"]
    assert _scalar(events["moe/layers_1/load_cv"], 20) == pytest.approx(last["load_cv"], rel=1e-6)
    share = np.asarray(last["load_fraction"]) * TINY.n_routed_experts
    assert _scalar(events["moe/layers_1/load_max"], 20) == pytest.approx(share.max(), rel=1e-6)
    assert _scalar(events["moe/layers_1/load_min"], 20) == pytest.approx(share.min(), rel=1e-6)
    for layer in layers:
        # A picture at the last interval; earlier ones unless the drawing fell behind the engine.
        images = events[f"moe/{layer}/expert_load_heatmap"]
        steps = _steps(images)
        assert steps[-1] == 20 and steps == sorted(set(steps)) and set(steps) <= {5, 10, 15, 20}
        assert images[0][3] == "images"
        width, height, png = images[-1][2][:3]
        pixels = tf.io.decode_png(png).numpy()
        assert pixels.shape[:2] == (int(height), int(width)) and pixels.shape[0] > 100
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50  # a drawn picture
        histograms = events[f"moe/{layer}/expert_load"]
        assert _steps(histograms) == [5, 10, 15, 20] and histograms[0][3] == "histograms"
    assert _steps(events["eval/loss"]) == [20]
    assert _scalar(events["eval/loss"], 20) == pytest.approx(summary["eval_loss"], rel=1e-6)
    # The same records, machine-readable, for the run report.
    with open(summary["metrics_file"]) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert records[-1]["experts"]["layers_1"]["load_fraction"] == pytest.approx(last["load_fraction"])


def test_eval_loss_and_keras_model(trained):
    """The summary's eval loss is the mean next-token CE of the saved model
    over eval_steps (2) batches of the eval split."""
    fn_args, summary, _ = trained
    model = _load_keras(fn_args)
    eval_tokens = generate(SPEC, 256)[192:][: 2 * BATCH]
    logits = np.asarray(model(eval_tokens), np.float64)
    ce = -np.take_along_axis(_log_softmax(logits[:, :-1]), eval_tokens[:, 1:, None], -1)
    assert summary["eval_batches"] == 2 and summary["eval_target_tokens"] == ce.size
    assert summary["eval_loss"] == pytest.approx(ce.mean(), abs=1e-5)


def test_savedmodel_serving_default_matches_keras(trained):
    fn_args, _, _ = trained
    model = _load_keras(fn_args)
    loaded = tf.saved_model.load(fn_args.serving_model_dir)
    assert sorted(loaded.signatures) == ["generate", "serving_default", "token_metrics"]
    serve = loaded.signatures["serving_default"]
    _, inputs = serve.structured_input_signature
    assert inputs["examples"].dtype == tf.string

    tokens = generate(SPEC, 300)[-5:]
    out = serve(examples=tf.constant(serialize_sequences(tokens)))
    logits, token_loss = out["logits"].numpy(), out["token_loss"].numpy()
    assert logits.dtype == np.float32 and logits.shape == (5, SEQ_LEN, SPEC.vocab_size)
    assert token_loss.dtype == np.float32 and token_loss.shape == (5, SEQ_LEN - 1)
    np.testing.assert_allclose(logits, np.asarray(model(tokens)), atol=1e-4, rtol=0)
    expected = -np.take_along_axis(_log_softmax(logits[:, :-1].astype(np.float64)),
                                   tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(token_loss, expected, atol=1e-4, rtol=0)


def test_savedmodel_generate_matches_python_reference(trained):
    from model.generation import generate as reference_generate
    from model.generation import left_pad

    fn_args, _, _ = trained
    model = _load_keras(fn_args)
    gen = tf.saved_model.load(fn_args.serving_model_dir).signatures["generate"]

    def run(prompts, n, temperature=0.0, top_k=0, seed=0):
        ids, mask = left_pad(prompts)
        return gen(token_ids=tf.constant(ids), padding_mask=tf.constant(mask),
                   max_new_tokens=tf.constant(n), temperature=tf.constant(temperature, tf.float32),
                   top_k=tf.constant(top_k), top_p=tf.constant(1.0), eos_id=tf.constant(-1),
                   seed=tf.constant(seed))["tokens"].numpy()

    prompts = [[1, 2, 3, 4, 5, 6], [7], [10, 11, 12]]  # different lengths: left padding
    greedy = run(prompts, 7)
    assert greedy.dtype == np.int32 and greedy.shape == (3, 7)
    assert greedy.tolist() == reference_generate(model, prompts, 7)
    # Alone, a prompt generates what it generated in the batch.
    assert run([prompts[1]], 7).tolist() == [greedy[1].tolist()]
    assert run(prompts, 0).shape == (3, 0)

    # Sampling: reproducible per seed, in range; top_k=1 is greedy.
    sampled = run(prompts, 7, temperature=1.0, seed=3)
    assert sampled.tolist() == run(prompts, 7, temperature=1.0, seed=3).tolist()
    assert sampled.min() >= 0 and sampled.max() < SPEC.vocab_size
    assert sampled.tolist() != greedy.tolist()
    assert run(prompts, 7, temperature=1.0, top_k=1, seed=5).tolist() == greedy.tolist()

    # Past max_position_embeddings: refused, like the Python reference.
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_position_embeddings"):
        run(prompts, TINY.max_position_embeddings)


def _engine_child():
    import psutil

    (child,) = [p for p in psutil.Process().children(recursive=True)
                if "training.worker" in " ".join(p.cmdline())]
    return child


def test_killed_run_resumes_like_the_uninterrupted_run_and_its_curves(tmp_path, examples, trained,
                                                                      monkeypatch):
    """The engine is killed (SIGKILL) after step 15 was logged, its last
    checkpoint being step 10; the rerun resumes there, ends like the
    uninterrupted run, and its TensorBoard curves hold each step once."""
    import threading

    reference_args, reference_summary, _ = trained
    fn_args = _fn_args(tmp_path, examples)
    checkpoints = os.path.join(fn_args.model_run_dir, "checkpoints")
    source = os.path.join(reference_args.model_run_dir, "checkpoints")
    killed = threading.Event()
    stream = trainer.stream_batches

    # Step 19's batch waits until the engine is gone, so no step past 18 (and
    # no checkpoint past 10) can happen. The hold is a few batches past step
    # 15: the loop reads ahead and logs a step one step late, so holding step
    # 16's batch would hold the "step 15" line too, until the wait timed out.
    def held_stream(*args, **kwargs):
        batches = stream(*args, **kwargs)

        def first_18():
            for index, batch in enumerate(batches):
                if index == 18:
                    killed.wait(300)
                    return
                yield batch
        return first_18()

    def kill_after_step_15(line):
        if line.startswith("step 15/20"):
            _engine_child().kill()
            killed.set()

    monkeypatch.setattr(trainer, "stream_batches", held_stream)
    with pytest.raises(RuntimeError, match=r"killed \(SIGKILL\).*exit status -9"):
        trainer.run_fn(fn_args, log_fn=kill_after_step_15)
    monkeypatch.undo()
    assert _steps(_events(fn_args.model_run_dir)["train/loss"]) == [5, 10, 15]
    assert sorted(n for n in os.listdir(checkpoints) if n.endswith(".npz")) == ["ckpt-10.npz"]

    summary, lines = _run(fn_args)
    assert "resuming from step 10" in "\n".join(lines)
    assert summary["start_step"] == 10 and summary["final_step"] == 20 and summary["resumed"]
    assert [h["step"] for h in summary["loss_history"]] == [15, 20]
    assert summary["tokens_trained"] == 10 * BATCH * SEQ_LEN
    events, uninterrupted = _events(fn_args.model_run_dir), _events(reference_args.model_run_dir)
    for tag in list(SCALAR_TAGS) + [f"moe/layers_1/{key}" for key in MOE_TAGS] + ["moe/layers_1/expert_load"]:
        assert _steps(events[tag]) == [5, 10, 15, 20], tag
    images = _steps(events["moe/layers_1/expert_load_heatmap"])
    assert images[-1] == 20 and images == sorted(set(images)), images
    for tag in ("train/loss", "train/grad_norm", "moe/layers_1/load_cv"):  # same curve as without the kill
        for step in (5, 10, 15, 20):
            assert _scalar(events[tag], step) == pytest.approx(_scalar(uninterrupted[tag], step), rel=1e-4), tag
    assert _steps(events["eval/loss"]) == [20]
    with open(summary["metrics_file"]) as f:
        assert [json.loads(line)["step"] for line in f] == [5, 10, 15, 20]

    # Same batches, same state: weights, router biases, optimizer moments, step.
    resumed = _checkpoint_values(os.path.join(checkpoints, "ckpt-20.npz"))
    reference = _checkpoint_values(os.path.join(source, "ckpt-20.npz"))
    assert sorted(resumed) == sorted(reference)
    assert any("e_score_correction_bias" in k for k in resumed)
    for name in reference:
        np.testing.assert_allclose(resumed[name], reference[name], atol=1e-6, err_msg=name)
    assert summary["eval_loss"] == pytest.approx(reference_summary["eval_loss"], abs=1e-5)

    # A rerun once finished trains nothing and re-exports the same model.
    summary, lines = _run(fn_args)
    assert summary["start_step"] == 20 and "resuming from step 20" in "\n".join(lines)
    assert summary["eval_loss"] == pytest.approx(reference_summary["eval_loss"], abs=1e-5)
    events = _events(fn_args.model_run_dir)
    assert _steps(events["train/loss"]) == [5, 10, 15, 20] and _steps(events["eval/loss"]) == [20]

    # A different model in the same checkpoint_dir is refused, naming what differs.
    other = _fn_args(tmp_path / "other", examples, custom_config=_custom_config(
        model_config=TINY.replace(hidden_size=48), checkpoint_dir=checkpoints))
    with pytest.raises(RuntimeError, match=r"the checkpoint does not fit this training: .*changed: base_model \(hidden_size\)"):
        _run(other)


def test_changed_data_under_the_same_checkpoints_is_refused_naming_it(tmp_path, examples, trained):
    """Other records in the same place, checkpoints of a finished run: not
    0 steps and the old model re-exported, but a refusal naming the data."""
    reference_args, _, _ = trained
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(os.path.join(reference_args.model_run_dir, "checkpoints"), checkpoints)
    changed = tmp_path / "examples"
    shutil.copytree(examples, changed)
    rows = generate(DataSpec("markov", vocab_size=64, seq_len=SEQ_LEN, seed=1), 192)
    write_tfrecords(str(changed / "Split-train" / "data_tfrecord-00000-of-00001.gz"), rows)
    fn_args = _fn_args(tmp_path / "run", str(changed), checkpoint_dir=str(checkpoints))
    with pytest.raises(RuntimeError, match=r"different training setup \(changed: data\.identity: '[0-9a-f]+' "
                                           r"-> '[0-9a-f]+'\)"):
        _run(fn_args)
    assert not os.path.exists(fn_args.serving_model_dir)


def test_remote_uris_train_mirror_checkpoints_and_resume(tmp_path, examples, trained, monkeypatch):
    """model_run_dir, serving_model_dir and the checkpoints on a non-local
    scheme (TF's in-memory ram:// filesystem): the engine works in a local
    temporary directory, each checkpoint is mirrored to the URI, and a
    restarted run on a fresh disk fetches the newest one and resumes."""
    gfile = tf.io.gfile
    monkeypatch.chdir(tmp_path)  # os.makedirs("ram://...") would create ./ram:/ here
    reference_args, reference_summary, _ = trained
    root = f"ram://trainer-{os.getpid()}-{tmp_path.name}"
    fn_args = _fn_args(root, examples)
    checkpoints = f"{root}/model_run/checkpoints"

    summary, lines = _run(fn_args)
    assert summary["final_step"] == 20 and not summary["resumed"]
    assert sorted(gfile.listdir(checkpoints)) == ["ckpt-10.npz", "ckpt-20.npz", "trainer_state.json"]
    assert summary["checkpoint_steps"] == [10, 20] and summary["checkpoint_mirror_seconds"] > 0
    assert gfile.exists(os.path.join(fn_args.serving_model_dir, "saved_model.pb"))
    assert gfile.exists(f"{root}/model/{trainer.SUMMARY_FILE}")
    assert gfile.exists(f"{root}/model/{trainer.KERAS_MODEL_PATH}")
    assert gfile.exists(f"{root}/model_run/engine/engine.log")
    assert gfile.glob(f"{root}/model_run/events.out.tfevents.*")
    assert not os.path.exists(tmp_path / "ram:")  # nothing went to a local look-alike path
    assert summary["eval_loss"] == pytest.approx(reference_summary["eval_loss"], abs=1e-5)

    # The pod dies after its step-10 checkpoint reached the bucket: a new one resumes there.
    gfile.remove(f"{checkpoints}/ckpt-20.npz")
    summary, lines = _run(fn_args)
    assert "fetched checkpoint step 10" in "\n".join(lines) and "resuming from step 10" in "\n".join(lines)
    assert summary["start_step"] == 10 and summary["final_step"] == 20 and summary["resumed"]
    with gfile.GFile(f"{checkpoints}/ckpt-20.npz", "rb") as f:
        import io

        with np.load(io.BytesIO(f.read())) as data:
            resumed = {k: data[k] for k in data.files}
    reference = _checkpoint_values(os.path.join(reference_args.model_run_dir, "checkpoints", "ckpt-20.npz"))
    for name in reference:
        np.testing.assert_allclose(resumed[name], reference[name], atol=1e-6, err_msg=name)
    assert summary["eval_loss"] == pytest.approx(reference_summary["eval_loss"], abs=1e-5)


def test_gradient_accumulation_streams_two_batches_a_step(tmp_path, examples):
    fn_args = _fn_args(tmp_path, examples, train_steps=4, gradient_accumulation=2,
                       checkpoint_every=4, log_every=2)
    summary, lines = _run(fn_args)
    assert "8 batches streamed to the engine" in "\n".join(lines)
    assert summary["final_step"] == 4 and summary["start_step"] == 0
    assert summary["gradient_accumulation"] == 2 and summary["training"]["gradient_accumulation"] == 2
    assert summary["tokens_trained"] == 4 * 2 * BATCH * SEQ_LEN
    assert [h["step"] for h in summary["loss_history"]] == [2, 4]
    # The last 2-step interval routed the tokens of 2 x 2 micro-batches.
    moe = summary["expert_utilization_last_interval"]["layers_1"]
    assert moe["assignments"] == 2 * 2 * BATCH * SEQ_LEN * TINY.num_experts_per_tok
    assert not os.path.exists(os.path.join(fn_args.model_run_dir, "engine", "train_tokens.npy"))


def test_empty_train_split_is_refused_before_the_engine_starts(tmp_path, examples):
    empty = tmp_path / "examples"
    shutil.copytree(examples, empty)
    train = empty / "Split-train" / "data_tfrecord-00000-of-00001.gz"
    write_tfrecords(str(train), np.zeros((0, SEQ_LEN), np.int64))
    fn_args = _fn_args(tmp_path, str(empty), train_steps=2)
    with pytest.raises(ValueError, match=r"fn_args.train_files: .*Split-train.* has no examples"):
        trainer.run_fn(fn_args, log_fn=lambda line: None)
    assert not os.path.exists(os.path.join(fn_args.model_run_dir, "engine", "spec.json"))


@pytest.mark.parametrize("split, bad", [("train", 64), ("train", -1), ("eval", 2 ** 32), ("eval", -5)])
def test_token_ids_outside_the_vocab_are_a_data_error_naming_the_split(tmp_path, examples, split, bad):
    """A user's own TFRecords with ids the model has no embedding for (or
    negative ones, which would wrap) stop before the engine starts, as a
    data error, not as a divergence."""
    broken = tmp_path / "examples"
    shutil.copytree(examples, broken)
    path = broken / f"Split-{split}" / "data_tfrecord-00000-of-00001.gz"
    rows = generate(SPEC, 192 if split == "train" else 64).astype(np.int64)
    rows[:, 3] = bad  # in every batch, the first included
    write_tfrecords(str(path), rows)
    fn_args = _fn_args(tmp_path, str(broken), train_steps=2)
    with pytest.raises(trainer.TokenDataError, match=rf"^{split} split: batch 0 holds \d+ token id\(s\) "
                                                     rf"outside the model's vocabulary \[0, 64\)"):
        trainer.run_fn(fn_args, log_fn=lambda line: None)
    assert not os.path.exists(os.path.join(fn_args.model_run_dir, "engine", "spec.json"))


def test_absurd_learning_rate_stops_with_divergence_error(tmp_path, examples):
    fn_args = _fn_args(tmp_path, examples, train_steps=30, learning_rate=1e6, warmup_steps=0,
                       grad_clip_norm=None, checkpoint_every=1, log_every=1)
    # Whichever turns non-finite first (the gradient norm or the loss) stops it.
    with pytest.raises(RuntimeError, match=r"training diverged: (loss is nan|the gradient norm is "
                                           r"(nan|inf)).* at step (\d+)") as info:
        _run(fn_args)
    step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert 1 < step < 30
    # No checkpoint holds the diverged state, the error names the last good
    # one, and nothing was exported.
    names = os.listdir(os.path.join(fn_args.model_run_dir, "checkpoints"))
    steps = [int(n[5:-4]) for n in names if n.endswith(".npz")]
    assert steps and max(steps) < step
    assert f"the last good checkpoint is step {max(steps)}" in str(info.value)
    assert not os.path.exists(fn_args.serving_model_dir)


def test_float8_training(tmp_path, examples):
    fn_args = _fn_args(tmp_path, examples, train_steps=6, precision="float8", checkpoint_every=2,
                       log_every=3)
    summary, _ = _run(fn_args)
    assert summary["precision"]["float8"] is True and summary["final_step"] == 6
    # Checkpoints at 2, 4, 6: only the last two are kept.
    assert summary["checkpoint_steps"] == [4, 6]
    assert not os.path.exists(os.path.join(fn_args.model_run_dir, "checkpoints", "ckpt-2.npz"))
    assert all(math.isfinite(h["loss"]) for h in summary["loss_history"])
    assert math.isfinite(summary["eval_loss"])
    # The float8 scales exist, are checkpointed, and were updated by training.
    values = _checkpoint_values(os.path.join(fn_args.model_run_dir, "checkpoints", "ckpt-6.npz"))
    scales = {k: v for k, v in values.items() if "q_a_proj" in k and k.endswith("inputs_scale")}
    assert scales and all(float(v) != 1.0 for v in scales.values())
    # The export is the float32 master weights: SavedModel == model.keras.
    tokens = generate(SPEC, 4)
    serve = tf.saved_model.load(fn_args.serving_model_dir).signatures["serving_default"]
    logits = serve(examples=tf.constant(serialize_sequences(tokens)))["logits"].numpy()
    np.testing.assert_allclose(logits, np.asarray(_load_keras(fn_args)(tokens)), atol=1e-4, rtol=0)


# ------------------------------------------------------- fast, no training
def test_precision_and_mesh_choice():
    from training.parallel import MeshError, plan_mesh
    from training.precision import resolve_precision

    assert resolve_precision("auto", "cpu") == ("float32", False)
    assert resolve_precision("auto", "gpu") == ("mixed_bfloat16", False)
    assert resolve_precision("bf16", "cpu") == ("mixed_bfloat16", False)
    assert resolve_precision("float32", "gpu") == ("float32", False)
    assert resolve_precision("float8", "cpu") == ("float32", True)
    assert resolve_precision("float8", "gpu") == ("mixed_bfloat16", True)
    assert plan_mesh(8, 1, 4, 16).to_dict() == {"batch": 8, "expert": 1}
    assert plan_mesh(8, 4, 8, 8).to_dict() == {"batch": 2, "expert": 4}
    with pytest.raises(MeshError, match="batch_size 12 does not divide over the 8 devices"):
        plan_mesh(8, 1, 4, 12)
    with pytest.raises(MeshError, match="expert_parallel 3 does not divide the 8 devices"):
        plan_mesh(8, 3, 6, 8)
    with pytest.raises(MeshError, match="does not divide the model's 4 routed experts"):
        plan_mesh(8, 8, 4, 8)


def test_warmup_cosine_schedule():
    schedule = WarmupCosineSchedule(1e-3, warmup_steps=10, total_steps=110)
    lr = [float(schedule(step)) for step in range(0, 120)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lr[:9], lr[1:10]))  # linear warmup
    assert all(a >= b for a, b in zip(lr[10:110], lr[11:111]))  # cosine decay
    assert lr[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-5)  # halfway
    assert lr[110] == pytest.approx(1e-4) and lr[119] == pytest.approx(1e-4)
    assert float(WarmupCosineSchedule(1e-3, 0, 10)(0)) == pytest.approx(1e-3)


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c.pop("seq_len"), r"custom_config\['seq_len'\]: missing"),
    (lambda c: c.update(seq_len=1), r"custom_config\['seq_len'\]"),
    (lambda c: c.update(seq_len=10_000), r"custom_config\['seq_len'\].*max_position_embeddings"),
    (lambda c: c["model_config"].update(n_group=3), r"custom_config\['model_config'\].*n_group"),
    (lambda c: c["model_config"].update(bogus=1), r"custom_config\['model_config'\].*bogus"),
    (lambda c: c["training"].update(batch_size=0), r"\['training'\]\['batch_size'\]"),
    (lambda c: c["training"].update(learning_rate=float("nan")), r"\['training'\]\['learning_rate'\]"),
    (lambda c: c["training"].update(precision="fp16"), r"\['training'\]\['precision'\]"),
    (lambda c: c["training"].pop("log_every"), r"\['training'\]\['log_every'\]: missing"),
    (lambda c: c["training"].update(checkpoint_evry=5), r"\['training'\]: unknown keys \['checkpoint_evry'\]"),
    (lambda c: c["training"].update(eval_batches=0), r"\['training'\]\['eval_batches'\]"),
    (lambda c: c["training"].update(devices=["/gpu:0"]), r"unknown keys \['devices'\]"),
    (lambda c: c["training"].update(expert_parallel=3), r"\['expert_parallel'\]: 3 does not divide"),
    (lambda c: c["training"].update(gradient_accumulation=0), r"\['gradient_accumulation'\]"),
    (lambda c: c["training"].update(cpu_devices=0), r"\['cpu_devices'\]: must be >= 1"),
    (lambda c: c["training"].update(cpu_devices=3), r"\['cpu_devices'\]: 3 must divide batch_size"),
    (lambda c: c.update(extra=1), r"custom_config: unknown keys \['extra'\]"),
])
def test_invalid_custom_config_is_refused_naming_the_key(tmp_path, mutate, key):
    config = _custom_config()
    mutate(config)
    fn_args = _fn_args(tmp_path, str(tmp_path), custom_config=config)
    with pytest.raises(TrainerConfigError, match=key):
        trainer.run_fn(fn_args)


def test_invalid_fn_args_are_refused(tmp_path, examples):
    fn_args = _fn_args(tmp_path, examples, train_steps=None)
    with pytest.raises(TrainerConfigError, match="fn_args.train_steps"):
        trainer.run_fn(fn_args)
    fn_args = _fn_args(tmp_path, examples, train_steps=2)
    fn_args.train_files = [str(tmp_path / "nothing-here" / "*")]
    with pytest.raises(ValueError, match="fn_args.train_files: no files match"):
        trainer.run_fn(fn_args)
