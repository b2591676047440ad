"""The Trainer's run_fn end to end on a tiny model: training, resumable
checkpoints, divergence guard, float8, MirroredStrategy (two logical CPUs, in
a subprocess), TensorBoard logs, evaluation and the exported SavedModel."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tfx")

from tfx.components.trainer.fn_args_utils import FnArgs  # noqa: E402

from components import trainer  # noqa: E402
from components import training_loop as tl  # noqa: E402
from components.trainer_config import TrainerConfigError  # noqa: E402
from data import DataSpec, generate, write_tfrecords  # noqa: E402
from data.tfrecord import serialize_sequences  # noqa: E402
from model import get_preset  # noqa: E402

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


def _fn_args(root, examples, train_steps=20, eval_steps=2, custom_config=None, **training):
    root = str(root)
    return FnArgs(
        train_files=[os.path.join(examples, "Split-train", "*")],  # TFX's pattern form
        eval_files=[os.path.join(examples, "Split-eval")],  # a bare directory also works
        train_steps=train_steps, eval_steps=eval_steps,
        serving_model_dir=os.path.join(root, "model", "Format-Serving"),
        model_run_dir=os.path.join(root, "model_run"),
        custom_config=custom_config or _custom_config(**training))


def _run(fn_args, callbacks=None):
    lines = []
    summary = trainer.run_fn(fn_args, extra_callbacks=callbacks, log_fn=lines.append)
    return summary, lines


def _artifact(fn_args):
    return os.path.dirname(fn_args.serving_model_dir)


def _load_keras(fn_args):
    import model.deepseek_v3  # noqa: F401  (registers the classes)

    return keras.saving.load_model(os.path.join(_artifact(fn_args), "keras", "model.keras"))


def _checkpoint_values(path):
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if not name.startswith("_CHECKPOINTABLE") and "save_counter" not in name}


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class _CrashAt(keras.callbacks.Callback):
    def __init__(self, step, start=0):
        super().__init__()
        self.step, self.start = step, start

    def on_train_batch_end(self, batch, logs=None):
        if self.start + batch + 1 == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


class _PoisonAt(keras.callbacks.Callback):
    """Sets the LM head to NaN after step `step`, so the next loss is NaN."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.step:
            kernel = self.model.lm_head.kernel
            kernel.assign(np.full(kernel.shape, np.nan, np.float32))


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
    """One uninterrupted 20-step run (checkpoints every 10, logs every 5)."""
    fn_args = _fn_args(tmp_path_factory.mktemp("trained"), examples)
    summary, lines = _run(fn_args)
    return fn_args, summary, lines


# ------------------------------------------------------------------- tests
def test_run_fn_trains_logs_and_writes_artifacts(trained):
    fn_args, summary, lines = trained
    artifact = _artifact(fn_args)
    assert summary["final_step"] == 20 and summary["start_step"] == 0 and not summary["resumed"]
    assert summary["strategy"] == "_DefaultDistributionStrategy" and summary["num_replicas"] == 1
    assert summary["precision"] == {"requested": "auto", "policy": "float32", "float8": False}

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


def test_tensorboard_scalars(trained):
    fn_args, summary, _ = trained
    scalars = {}
    for name in tf.io.gfile.listdir(fn_args.model_run_dir):
        if not name.startswith("events.out.tfevents"):
            continue
        for event in tf.compat.v1.train.summary_iterator(os.path.join(fn_args.model_run_dir, name)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    for tag in ("train/loss", "train/perplexity", "train/learning_rate", "train/tokens_per_second",
                "moe/layers_1/load_max_min_ratio", "moe/layers_1/load_cv", "moe/layers_1/bias_mean",
                "moe/layers_1/bias_spread", "moe/layers_1/dropped_fraction"):
        assert sorted(scalars[tag]) == [5, 10, 15, 20], tag
    assert scalars["train/loss"][20] == pytest.approx(summary["loss_history"][-1]["loss"])
    # Warmup reaches the peak at the 5th update; cosine decay follows.
    assert scalars["train/learning_rate"][5] == pytest.approx(3e-3)
    assert scalars["train/learning_rate"][20] < scalars["train/learning_rate"][10] < 3e-3


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


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, examples, trained):
    reference_args, reference_summary, _ = trained
    fn_args = _fn_args(tmp_path, examples)
    checkpoints = os.path.join(fn_args.model_run_dir, "checkpoints")

    with pytest.raises(KeyboardInterrupt, match="simulated crash at step 15"):
        _run(fn_args, callbacks=[_CrashAt(15)])
    assert tf.train.get_checkpoint_state(checkpoints).all_model_checkpoint_paths == \
        [os.path.join(checkpoints, "ckpt-10")]

    summary, lines = _run(fn_args)
    assert "resuming from step 10" in "\n".join(lines)
    assert summary["start_step"] == 10 and summary["final_step"] == 20 and summary["resumed"]
    assert [h["step"] for h in summary["loss_history"]] == [15, 20]
    assert summary["tokens_trained"] == 10 * BATCH * SEQ_LEN

    # Same batches, same state: the interrupted run ends bit-identical to the
    # uninterrupted one -- weights, router biases, optimizer moments, step.
    resumed = _checkpoint_values(os.path.join(checkpoints, "ckpt-20"))
    reference = _checkpoint_values(
        os.path.join(reference_args.model_run_dir, "checkpoints", "ckpt-20"))
    assert sorted(resumed) == sorted(reference)
    assert any("e_score_correction_bias" in k for k in resumed)
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    assert summary["loss_history"][-1]["loss"] == reference_summary["loss_history"][-1]["loss"]
    assert summary["eval_loss"] == reference_summary["eval_loss"]
    for a, b in zip(_load_keras(fn_args).weights, _load_keras(reference_args).weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)

    # A rerun once finished trains nothing and re-exports the same model.
    summary, lines = _run(fn_args)
    assert summary["start_step"] == 20 and "resuming from step 20" in "\n".join(lines)
    assert summary["eval_loss"] == reference_summary["eval_loss"]

    # A different model in the same checkpoint_dir is refused, naming what differs.
    other = _fn_args(tmp_path / "other", examples, custom_config=_custom_config(
        model_config=TINY.replace(hidden_size=48), checkpoint_dir=checkpoints))
    with pytest.raises(tl.CheckpointMismatchError, match="model_config"):
        _run(other)


def test_absurd_learning_rate_stops_with_divergence_error(tmp_path, examples):
    fn_args = _fn_args(tmp_path, examples, train_steps=30, learning_rate=1e6, warmup_steps=0,
                       grad_clip_norm=None, checkpoint_every=2, log_every=1)
    with pytest.raises(RuntimeError, match=r"training diverged: loss is nan at step (\d+)") as info:
        _run(fn_args)
    step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert step < 30
    # No checkpoint holds the diverged state; nothing was exported.
    state = tf.train.get_checkpoint_state(os.path.join(fn_args.model_run_dir, "checkpoints"))
    steps = [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]
    assert steps and max(steps) < step
    assert not os.path.exists(fn_args.serving_model_dir)


def test_injected_nan_is_reported_at_its_step(tmp_path, examples):
    fn_args = _fn_args(tmp_path, examples, train_steps=10, checkpoint_every=2)
    with pytest.raises(RuntimeError, match=r"training diverged: loss is nan at step 4 .*"
                                           r"last good checkpoint is step 2"):
        _run(fn_args, callbacks=[_PoisonAt(3)])


def test_float8_training(tmp_path, examples):
    fn_args = _fn_args(tmp_path, examples, train_steps=6, precision="float8", checkpoint_every=2,
                       log_every=3)
    summary, _ = _run(fn_args)
    assert summary["precision"]["float8"] is True and summary["final_step"] == 6
    # Checkpoints at 2, 4, 6: only the last two are kept.
    assert summary["checkpoint_steps"] == [4, 6]
    assert not tf.io.gfile.glob(os.path.join(fn_args.model_run_dir, "checkpoints", "ckpt-2.*"))
    assert all(math.isfinite(h["loss"]) for h in summary["loss_history"])
    assert math.isfinite(summary["eval_loss"])
    # The float8 scales exist, are checkpointed, and were updated by training.
    values = _checkpoint_values(os.path.join(fn_args.model_run_dir, "checkpoints", "ckpt-6"))
    scales = {k: v for k, v in values.items() if "q_a_proj" in k and k.endswith("inputs_scale/.ATTRIBUTES/VARIABLE_VALUE")}
    assert scales and all(float(v) != 1.0 for v in scales.values())
    # The export is the float32 master weights: SavedModel == model.keras.
    tokens = generate(SPEC, 4)
    serve = tf.saved_model.load(fn_args.serving_model_dir).signatures["serving_default"]
    logits = serve(examples=tf.constant(serialize_sequences(tokens)))["logits"].numpy()
    np.testing.assert_allclose(logits, np.asarray(_load_keras(fn_args)(tokens)), atol=1e-4, rtol=0)


_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from components import training_loop as tl
    from components import trainer
    from tfx.components.trainer.fn_args_utils import FnArgs
    strategy = tl.select_strategy(["/cpu:0", "/cpu:1"])
    fn_args = FnArgs(**json.loads(sys.argv[1]))
    lines = []
    summary = trainer.run_fn(fn_args, log_fn=lines.append)
    print("RESULT " + json.dumps({
        "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
        "summary": summary, "lines": lines}))
""")


def test_mirrored_strategy_on_two_logical_cpus(tmp_path, examples):
    fn_args = _fn_args(tmp_path, examples, train_steps=4, checkpoint_every=2, log_every=2,
                       devices=["/cpu:0", "/cpu:1"])
    args = {k: getattr(fn_args, k) for k in ("train_files", "eval_files", "train_steps",
                                              "eval_steps", "serving_model_dir", "model_run_dir",
                                              "custom_config")}
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT, json.dumps(args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    result_lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and result_lines, proc.stderr[-3000:]
    result = json.loads(result_lines[-1][len("RESULT "):])
    assert result["strategy"] == "MirroredStrategy" and result["replicas"] == 2
    summary = result["summary"]
    assert summary["strategy"] == "MirroredStrategy" and summary["num_replicas"] == 2
    assert summary["final_step"] == 4 and summary["checkpoint_steps"] == [2, 4]
    assert all(math.isfinite(h["loss"]) for h in summary["loss_history"])
    assert math.isfinite(summary["eval_loss"])
    # Expert counts are exact across replicas: 2 steps x global batch tokens x top_k.
    moe = summary["expert_utilization_last_interval"]["layers_1"]
    assert moe["assignments"] == 2 * BATCH * SEQ_LEN * TINY.num_experts_per_tok
    assert sum(moe["load_fraction"]) == pytest.approx(1.0)


# ------------------------------------------------------- fast, no training
def test_strategy_and_precision_choice():
    assert tl.select_strategy([]) is tf.distribute.get_strategy()
    assert tl.select_strategy(["/cpu:0"]) is tf.distribute.get_strategy()
    assert tl.resolve_precision("auto", []) == ("float32", False)
    assert tl.resolve_precision("auto", ["/gpu:0"]) == ("mixed_bfloat16", False)
    assert tl.resolve_precision("bf16", []) == ("mixed_bfloat16", False)
    assert tl.resolve_precision("float32", ["/gpu:0", "/gpu:1"]) == ("float32", False)
    assert tl.resolve_precision("float8", []) == ("float32", True)
    assert tl.resolve_precision("float8", ["/gpu:0"]) == ("mixed_bfloat16", True)
    assert tl.select_devices(["/cpu:0", "/cpu:1"]) == ["/cpu:0", "/cpu:1"]


def test_warmup_cosine_schedule():
    schedule = tl.WarmupCosineSchedule(1e-3, warmup_steps=10, total_steps=110)
    lr = [float(schedule(step)) for step in range(0, 120)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lr[:9], lr[1:10]))  # linear warmup
    assert all(a >= b for a, b in zip(lr[10:110], lr[11:111]))  # cosine decay
    assert lr[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-5)  # halfway
    assert lr[110] == pytest.approx(1e-4) and lr[119] == pytest.approx(1e-4)
    assert float(tl.WarmupCosineSchedule(1e-3, 0, 10)(0)) == pytest.approx(1e-3)


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
    (lambda c: c["training"].update(devices="/gpu:0"), r"\['training'\]\['devices'\]"),
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
    fn_args = _fn_args(tmp_path, examples, train_steps=2, batch_size=3, devices=["/cpu:0", "/cpu:1"])
    with pytest.raises(TrainerConfigError, match="batch_size.*not divisible"):
        trainer.run_fn(fn_args)
