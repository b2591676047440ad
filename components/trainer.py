"""The Trainer's module file: `run_fn(fn_args)` for
`tfx.components.Trainer(run_fn="components.trainer.run_fn", ...)` (TFX's
GenericExecutor). An adapter between TFX and the training engine
(`training/`, Keras on JAX), which runs in a child process because Keras'
backend is fixed per process and this one keeps TensorFlow.

What it does, in order:
1. Validates `fn_args.custom_config` into the one training-settings type
   (`components.trainer_config`, `training.settings`) and fn_args'
   train_steps / eval_steps, before anything heavy happens.
2. Reads the Examples the TFX way (`components.trainer_input`):
   `fn_args.data_accessor.tf_dataset_factory` over `fn_args.train_files` with
   the curated schema, seeded shuffle. The first training batch is read here
   (an empty split fails before the engine starts); the eval batches are
   read whole (eval_steps of them).
   With a `base_model` input (the pipeline's Importer of --base-model) its
   directory (a Hugging Face DeepSeek-V3 checkpoint, model.base_model) is
   checked against the model config before any data is read, and the
   engine starts from its weights.
3. Runs `python -m training.worker` with KERAS_BACKEND=jax and streams the
   `train_steps x gradient_accumulation` training batches to its stdin as
   they come out of tf.data (a writer thread, `training.launch.BatchFeeder`;
   nothing of the size of the run is written to disk). A resumed run reads
   and discards the batches of its done steps, so it sees the same batches
   at the same steps. Its progress, checkpoint and balance lines are
   forwarded to `log_fn`; its metrics records become TensorBoard events in
   `fn_args.model_run_dir` as they come (`components.tensorboard_events`).
   The engine trains on every device JAX sees (data parallel, or
   `expert_parallel`; on a CPU one device per core, training.host_devices),
   resumes from `training.checkpoint_dir`, and writes the trained weights.
4. Loads the weights into a float32 TF-backend model, evaluates it on
   `fn_args.eval_files` (`model.evaluation`), adds the eval metrics to the
   TensorBoard events, and exports under the model artifact uri:
   `keras/model.keras`, `training_summary.json`, and the SavedModel
   (`serving_default`, `generate`; `components.export`) in serving_model_dir,
   with the weights beside it in the Hugging Face layout (`config.json`,
   `model.safetensors`; model.hf_export): a pushed version is a base model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Optional

import numpy as np

from components.tensorboard_events import METRICS_FILE, TrainingEvents
from components.trainer_config import TrainerConfigError, custom_config, parse_fn_args  # noqa: F401
from components.trainer_input import TokenDataError, data_identity, read_batches, stream_batches  # noqa: F401
from training.host_devices import cpu_devices
from training.worker import json_safe

SUMMARY_FILE = "training_summary.json"
KERAS_MODEL_PATH = os.path.join("keras", "model.keras")


def model_artifact_uri(serving_model_dir: str) -> str:
    """TFX's serving_model_dir is `<model uri>/Format-Serving`. Not
    os.path.normpath: it folds a URI's `//` (ram://b/x -> ram:/b/x, a local
    path to tf.io.gfile and Keras)."""
    return serving_model_dir.rstrip("/").rsplit("/", 1)[0]


def examples_tokenizer(train_files) -> Optional[bytes]:
    """The tokenizer model the Examples carry (a run on text:
    components.text_example_gen), found from the train split's file pattern
    (`<examples uri>/Split-train/*`); None for token data."""
    import tensorflow as tf

    from components.text_example_gen import tokenizer_for_examples

    for pattern in train_files or []:
        path = tokenizer_for_examples(os.path.dirname(os.path.dirname(pattern)))
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path, "rb") as f:
                return f.read()
    return None


# --------------------------------------------------------------- weights
def load_trained_model(config, weights_path: str):
    """A float32 TF-backend model holding the engine's trained weights
    (float8 scale bookkeeping has no counterpart and is dropped)."""
    from model.deepseek_v3 import DeepSeekV3ForCausalLM
    from training.checkpoint import relative_path
    from training.precision import dtype_policy

    with dtype_policy("float32"):
        model = DeepSeekV3ForCausalLM(config)
    with np.load(weights_path) as trained:
        missing = []
        for variable in model.weights:
            key = relative_path(variable)
            if key not in trained.files:
                missing.append(key)
                continue
            variable.assign(trained[key].astype(variable.dtype))
    if missing:
        raise ValueError(f"the engine's weights have no variables {missing}")
    model.reset_expert_counts()
    return model


def _close_quietly(events) -> None:
    try:
        events.close()
    except RuntimeError:
        pass


def base_model_of(fn_args, config):
    """The `model.base_model.BaseModel` of the Trainer's `base_model` input
    (None without one), checked to hold every weight of `config`. TFX hands
    `<artifact uri>/Format-Serving`; an imported checkpoint directory is the
    artifact uri itself."""
    from model.base_model import BaseModel, BaseModelError

    path = getattr(fn_args, "base_model", None)
    if not path:
        return None
    if not os.path.isfile(os.path.join(path, "config.json")):
        path = model_artifact_uri(path)
    try:
        base = BaseModel.read(path)
        base.check_fits(config)
    except BaseModelError as e:
        raise TrainerConfigError(f"base_model: {e}") from None
    return base


# ----------------------------------------------------------------- run_fn
def run_fn(fn_args, log_fn: Callable[[str], None] = print) -> dict:
    """TFX entry point (log_fn exists for tests and scripts). Returns the
    training summary it also writes."""
    settings = parse_fn_args(fn_args)

    import tensorflow as tf

    from components import export
    from components.checkpoint_mirror import CheckpointMirror, is_remote
    from model.evaluation import eval_metrics
    from training import launch
    from training.metrics import expert_summary

    t = settings.training
    config, train_steps = settings.model_config, t.train_steps
    started = time.perf_counter()
    # The engine (no TensorFlow, so no tf.io.gfile) reads and writes local
    # files only: with a remote model_run_dir its work directory is a local
    # temporary one, and a remote checkpoint URI is mirrored
    # (components.checkpoint_mirror).
    remote_run_dir = is_remote(fn_args.model_run_dir)
    # Absolute: the child runs in another working directory.
    workdir = (tempfile.mkdtemp(prefix="deepseek-tfx-engine-") if remote_run_dir
               else os.path.abspath(os.path.join(fn_args.model_run_dir, "engine")))
    os.makedirs(workdir, exist_ok=True)
    mirror = None
    engine_checkpoints = t.checkpoint_dir and os.path.abspath(t.checkpoint_dir)
    if is_remote(t.checkpoint_dir):
        engine_checkpoints = os.path.join(workdir, "checkpoints")
        mirror = CheckpointMirror(t.checkpoint_dir, engine_checkpoints)
        fetched = mirror.fetch_latest()
        if fetched is not None:
            log_fn(f"trainer: fetched checkpoint step {fetched} from {t.checkpoint_dir}")
    base = base_model_of(fn_args, config)
    micro_batches = train_steps * t.gradient_accumulation
    train_batches = stream_batches(fn_args, settings, fn_args.train_files, micro_batches)
    eval_tokens = None
    if fn_args.eval_files:
        eval_tokens = read_batches(fn_args, settings, fn_args.eval_files,
                                   t.eval_batches or settings.eval_steps, "eval_files")
    log_fn(f"trainer: {config.num_hidden_layers} layers, vocab {config.vocab_size}, seq_len "
           f"{settings.seq_len}, batch {t.batch_size} x {t.gradient_accumulation} accumulation, "
           f"{train_steps} steps; {micro_batches} batches streamed to the engine (Keras on JAX "
           f"in a child process)")

    spec = {
        "model_config": config.to_dict(),
        # The engine checkpoints locally (mirrored when the URI is remote).
        "engine": t.replace(checkpoint_dir=engine_checkpoints).to_dict(),
        "data_identity": data_identity(fn_args.train_files),
        "base_model": {"path": base.path, "identity": base.identity} if base else None,
        "tokens": "stdin",  # the batches of train_batches, in order
        "output_dir": os.path.join(workdir, "out"),
    }

    def engine_line(line: str) -> None:
        if mirror is not None:
            mirror.on_line(line)  # each checkpoint to the URI as soon as it is in place
        log_fn(line)

    phases, mark = {}, started

    def phase(name: str) -> None:  # seconds since the previous phase ended
        nonlocal mark
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    phase("read_inputs")

    cpu = cpu_devices(t)
    if cpu.count is not None:
        log_fn(f"trainer: the engine gets {cpu.count} CPU device(s) ({cpu.why}; "
               f"unused with an accelerator)")
    events = TrainingEvents(fn_args.model_run_dir, log_fn)
    try:
        engine = launch.run_worker(spec, os.path.join(workdir, "spec.json"),
                                   env=launch.worker_env(cpu.count), log_fn=engine_line,
                                   batches=train_batches, stall_timeout_s=t.engine_stall_timeout_s,
                                   metrics_fn=events)
    except launch.TrainingDivergedError as e:
        _close_quietly(events)
        raise RuntimeError(str(e)) from None
    except launch.EngineFailed as e:
        _close_quietly(events)  # the points so far stay readable; the engine's error is the news
        if not remote_run_dir:
            raise
        # The local work directory does not outlive the pod: the log goes with the run.
        log_uri = _copy_engine_log(workdir, fn_args.model_run_dir)
        raise launch.EngineFailed(str(e).replace(os.path.join(workdir, "engine.log"), log_uri)) from None
    except BaseException:
        _close_quietly(events)
        raise
    if engine["final_step"] != train_steps:
        _close_quietly(events)
        raise RuntimeError(f"training ended at step {engine['final_step']}, expected {train_steps}")

    phase("engine")
    inference = load_trained_model(config, os.path.join(spec["output_dir"], "weights.npz"))
    phase("load_weights")
    artifact = model_artifact_uri(fn_args.serving_model_dir)
    evaluation, eval_experts = {}, {}
    if eval_tokens is not None:
        # One traced forward for every eval batch (eager: ~2x the time).
        forward = export.logits_fn(inference, settings.seq_len)
        evaluation = eval_metrics(lambda ids, training=False: forward(ids), eval_tokens,
                                  t.batch_size)
        for layer, stats in inference.get_expert_utilization().items():
            load = np.asarray(stats["load"])
            eval_experts[layer] = expert_summary(load, stats["dropped_fraction"] * load.sum(),
                                                 np.asarray(stats["bias"]))
        log_fn(f"eval loss {evaluation['eval_loss']:.4f} (ppl {evaluation['eval_perplexity']:.2f})"
               f" over {evaluation['eval_batches']} batches")
        events.write_eval(engine["final_step"], evaluation, eval_experts)
    events.close()
    phase("evaluate")
    keras_path = export.save_keras_model(inference, os.path.join(artifact, KERAS_MODEL_PATH))
    phase("export_keras")
    export.export_saved_model(inference, settings.seq_len, fn_args.serving_model_dir,
                              tokenizer_proto=examples_tokenizer(fn_args.train_files))
    phase("export_saved_model")
    hf_files = export.export_hf_checkpoint(inference, fn_args.serving_model_dir, log_fn)
    phase("export_hf")

    history = engine["loss_history"]
    last = history[-1] if history else {}
    experts = engine["expert_utilization_last_interval"]
    summary = {
        "seq_len": settings.seq_len,
        "model_config": config.to_dict(),
        "training": custom_config(config, t)["training"],
        "train_steps": train_steps,
        "start_step": engine["start_step"],
        "resumed": engine["resumed"],
        "final_step": engine["final_step"],
        "backend": engine["backend"],
        "engine_environment": engine.get("engine_environment"),  # Python, JAX, jaxlib, Keras
        "precision": engine["precision"],
        "devices": engine["devices"],
        "num_devices": engine["num_devices"],
        "processes": engine["processes"],
        "mesh": engine["mesh"],
        # The CPU devices the engine was given and why (training.host_devices).
        "cpu_devices": {"count": cpu.count, "why": cpu.why},
        "expert_parallel": engine["expert_parallel"],
        # All-to-all capacity overflows (extra rounds, nothing dropped); null on one device.
        "dispatch": engine.get("dispatch"),
        "gradient_accumulation": engine["gradient_accumulation"],
        "parameters": int(sum(math.prod(v.shape) for v in inference.weights)),
        "final_train_loss": last.get("loss"),
        "final_train_next_token_loss": last.get("next_token_loss"),
        "final_train_perplexity": last.get("perplexity"),
        "tokens_trained": engine["tokens_trained"],
        "train_seconds": engine["train_seconds"],
        "train_finished_at": engine["train_finished_at"],
        "tokens_per_second": engine["tokens_per_second"],
        "steady_tokens_per_second": engine["steady_tokens_per_second"],
        "first_step_seconds": engine["first_step_seconds"],
        # JAX's persistent cache (training.compile_cache): hits skip the compile.
        "compilation_cache": engine.get("compilation_cache"),
        "wall_seconds": time.perf_counter() - started,
        # Where the wall time went: reading the inputs, the engine child (start,
        # compile, training, weights out), the TF model's build from its
        # weights, the eval metrics and each export.
        "phase_seconds": phases,
        "loss_history": [{k: v for k, v in h.items() if k != "experts"} for h in history],
        "expert_utilization_last_interval": experts,
        "expert_load_per_layer": {layer: s["load_fraction"] for layer, s in experts.items()},
        "expert_utilization_eval": eval_experts,
        **evaluation,
        "checkpoint_dir": t.checkpoint_dir,
        "checkpoint_steps": mirror.remote_steps() if mirror else engine["checkpoint_steps"],
        "checkpoint_mirror_seconds": mirror.seconds if mirror else None,
        "keras_model": keras_path,
        "base_model": ({"path": base.path, "identity": base.identity,
                        "mtp_layers": config.num_nextn_predict_layers} if base else None),
        "hf_checkpoint_files": hf_files,
        "serving_model_dir": fn_args.serving_model_dir,
        "tensorboard_dir": fn_args.model_run_dir,
        "metrics_file": os.path.join(fn_args.model_run_dir, METRICS_FILE),
    }
    tf.io.gfile.makedirs(artifact)
    with tf.io.gfile.GFile(os.path.join(artifact, SUMMARY_FILE), "w") as f:
        f.write(json.dumps(json_safe(summary), indent=2))
    if remote_run_dir:
        _copy_engine_log(workdir, fn_args.model_run_dir)
        shutil.rmtree(workdir, ignore_errors=True)
    return summary


def _copy_engine_log(workdir: str, model_run_dir: str) -> str:
    import tensorflow as tf

    target = os.path.join(model_run_dir, "engine", "engine.log")
    source = os.path.join(workdir, "engine.log")
    if os.path.exists(source):
        tf.io.gfile.makedirs(os.path.dirname(target))
        tf.io.gfile.copy(source, target, overwrite=True)
    return target
