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
3. Runs `python -m training.worker` with KERAS_BACKEND=jax and streams the
   `train_steps x gradient_accumulation` training batches to its stdin as
   they come out of tf.data (a writer thread, `training.launch.BatchFeeder`;
   nothing of the size of the run is written to disk). A resumed run reads
   and discards the batches of its done steps, so it sees the same batches
   at the same steps. Its progress, checkpoint and balance lines are
   forwarded to `log_fn`. The engine trains on every device JAX sees (data
   parallel, or `expert_parallel`), resumes from `training.checkpoint_dir`,
   and writes the trained weights.
4. Loads the weights into a float32 TF-backend model, evaluates it on
   `fn_args.eval_files` (`model.evaluation`), writes TensorBoard scalars to
   `fn_args.model_run_dir`, and exports under the model artifact uri:
   `keras/model.keras`, `training_summary.json`, and the SavedModel
   (`serving_default`, `generate`; `components.export`) in serving_model_dir.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

import numpy as np

from components.trainer_config import TrainerConfigError, custom_config, parse_fn_args  # noqa: F401
from components.trainer_input import read_batches, stream_batches
from training.worker import json_safe

SUMMARY_FILE = "training_summary.json"
KERAS_MODEL_PATH = os.path.join("keras", "model.keras")


def model_artifact_uri(serving_model_dir: str) -> str:
    """TFX's serving_model_dir is `<model uri>/Format-Serving`."""
    return os.path.dirname(os.path.normpath(serving_model_dir))


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


def _write_tensorboard(log_dir: str, history) -> None:
    import tensorflow as tf

    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for h in history:
            step = h["step"]
            for key in ("loss", "next_token_loss", "perplexity", "learning_rate",
                        "tokens_per_second"):
                if h.get(key) is not None:
                    tf.summary.scalar(f"train/{key}", h[key], step=step)
            for layer, s in (h.get("experts") or {}).items():
                for key in ("load_max_min_ratio", "load_cv", "dropped_fraction", "bias_mean",
                            "bias_spread"):
                    if s.get(key) is not None:
                        tf.summary.scalar(f"moe/{layer}/{key}", s[key], step=step)
    writer.flush()
    writer.close()


# ----------------------------------------------------------------- run_fn
def run_fn(fn_args, log_fn: Callable[[str], None] = print) -> dict:
    """TFX entry point (log_fn exists for tests and scripts). Returns the
    training summary it also writes."""
    settings = parse_fn_args(fn_args)

    import tensorflow as tf

    from components import export
    from model.evaluation import eval_metrics
    from training import launch
    from training.metrics import expert_summary

    t = settings.training
    config, train_steps = settings.model_config, t.train_steps
    started = time.perf_counter()
    workdir = os.path.join(fn_args.model_run_dir, "engine")
    os.makedirs(workdir, exist_ok=True)
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
        "engine": t.to_dict(),
        "tokens": "stdin",  # the batches of train_batches, in order
        "output_dir": os.path.join(workdir, "out"),
    }
    try:
        engine = launch.run_worker(spec, os.path.join(workdir, "spec.json"), log_fn=log_fn,
                                   batches=train_batches)
    except launch.TrainingDivergedError as e:
        raise RuntimeError(str(e)) from None
    if engine["final_step"] != train_steps:
        raise RuntimeError(f"training ended at step {engine['final_step']}, expected {train_steps}")
    _write_tensorboard(fn_args.model_run_dir, engine["loss_history"])

    inference = load_trained_model(config, os.path.join(spec["output_dir"], "weights.npz"))
    artifact = model_artifact_uri(fn_args.serving_model_dir)
    evaluation, eval_experts = {}, {}
    if eval_tokens is not None:
        evaluation = eval_metrics(inference, eval_tokens, t.batch_size)
        for layer, stats in inference.get_expert_utilization().items():
            load = np.asarray(stats["load"])
            eval_experts[layer] = expert_summary(load, stats["dropped_fraction"] * load.sum(),
                                                 np.asarray(stats["bias"]))
        log_fn(f"eval loss {evaluation['eval_loss']:.4f} (ppl {evaluation['eval_perplexity']:.2f})"
               f" over {evaluation['eval_batches']} batches")
    keras_path = export.save_keras_model(inference, os.path.join(artifact, KERAS_MODEL_PATH))
    export.export_saved_model(inference, settings.seq_len, fn_args.serving_model_dir)

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
        "expert_parallel": engine["expert_parallel"],
        "gradient_accumulation": engine["gradient_accumulation"],
        "parameters": int(sum(math.prod(v.shape) for v in inference.weights)),
        "final_train_loss": last.get("loss"),
        "final_train_next_token_loss": last.get("next_token_loss"),
        "final_train_perplexity": last.get("perplexity"),
        "tokens_trained": engine["tokens_trained"],
        "train_seconds": engine["train_seconds"],
        "tokens_per_second": engine["tokens_per_second"],
        "steady_tokens_per_second": engine["steady_tokens_per_second"],
        "first_step_seconds": engine["first_step_seconds"],
        "wall_seconds": time.perf_counter() - started,
        "loss_history": [{k: v for k, v in h.items() if k != "experts"} for h in history],
        "expert_utilization_last_interval": experts,
        "expert_load_per_layer": {layer: s["load_fraction"] for layer, s in experts.items()},
        "expert_utilization_eval": eval_experts,
        **evaluation,
        "checkpoint_dir": t.checkpoint_dir,
        "checkpoint_steps": engine["checkpoint_steps"],
        "keras_model": keras_path,
        "serving_model_dir": fn_args.serving_model_dir,
        "tensorboard_dir": fn_args.model_run_dir,
    }
    tf.io.gfile.makedirs(artifact)
    with tf.io.gfile.GFile(os.path.join(artifact, SUMMARY_FILE), "w") as f:
        f.write(json.dumps(json_safe(summary), indent=2))
    return summary
