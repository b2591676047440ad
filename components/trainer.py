"""The Trainer's module file: `run_fn(fn_args)` for
`tfx.components.Trainer(run_fn="components.trainer.run_fn", ...)` (TFX's
GenericExecutor).

What it does, in order:
1. Validates `fn_args.custom_config` (see `components.trainer_config`) and
   fn_args.train_steps / eval_steps, before anything heavy happens.
2. Picks the devices (every visible GPU, else the CPU), the strategy
   (MirroredStrategy over the GPUs, TF's default strategy on CPU) and the
   precision ("auto": mixed_bfloat16 on GPU, float32 on CPU; "float8":
   Keras float8 training of the Dense layers via `model.quantize("float8")`).
3. Builds `DeepSeekV3ForCausalLM`, compiles it with AdamW + linear warmup /
   cosine decay and `NextTokenLoss`, resumes from the latest checkpoint in
   `training.checkpoint_dir` if there is one ("resuming from step N"), and
   trains exactly `fn_args.train_steps` steps on `fn_args.train_files`,
   checkpointing every `checkpoint_every` steps and at the end (last two
   kept), logging every `log_every` steps to the console and to TensorBoard
   in `fn_args.model_run_dir`. A NaN/inf loss raises
   `RuntimeError("training diverged: loss is nan at step N ...")`.
4. Makes a float32 inference copy, evaluates it on `fn_args.eval_files`
   (training.eval_batches, else fn_args.eval_steps, else the whole split),
   and writes, under the model artifact uri (the parent of
   `fn_args.serving_model_dir`): `keras/model.keras`,
   `training_summary.json`, and the SavedModel (signatures `serving_default`
   and `generate`, see `components.export`) in `serving_model_dir`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Optional, Sequence

from components.trainer_config import TrainerConfigError, TrainerSettings, parse_custom_config, validate_steps  # noqa: F401

SUMMARY_FILE = "training_summary.json"
KERAS_MODEL_PATH = os.path.join("keras", "model.keras")


def model_artifact_uri(serving_model_dir: str) -> str:
    """TFX's serving_model_dir is `<model uri>/Format-Serving`."""
    return os.path.dirname(os.path.normpath(serving_model_dir))


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run_fn(fn_args, extra_callbacks: Optional[Sequence] = None,
           log_fn: Callable[[str], None] = print) -> dict:
    """TFX entry point. `extra_callbacks` (Keras callbacks run after the
    trainer's own each step) and `log_fn` exist for tests and scripts; TFX
    calls run_fn(fn_args). Returns the training summary it also writes."""
    settings = parse_custom_config(fn_args.custom_config, fn_args.model_run_dir)
    train_steps, eval_steps = validate_steps(fn_args.train_steps, fn_args.eval_steps)
    if not fn_args.serving_model_dir:
        raise TrainerConfigError("fn_args.serving_model_dir: empty")
    if not fn_args.model_run_dir:
        raise TrainerConfigError("fn_args.model_run_dir: empty")

    # Heavy imports only after the configuration is known to be valid.
    import keras
    import tensorflow as tf

    from components import export
    from components import training_loop as tl
    from model.deepseek_v3 import DeepSeekV3ForCausalLM
    from model.losses import NextTokenLoss

    t = settings.training
    config = settings.model_config
    train_patterns = tl.resolve_file_patterns(fn_args.train_files, "train_files")
    eval_patterns = (tl.resolve_file_patterns(fn_args.eval_files, "eval_files")
                     if fn_args.eval_files else None)

    devices = tl.select_devices(t.devices)
    if t.batch_size % max(len(devices), 1):
        raise TrainerConfigError(
            f"custom_config['training']['batch_size']: {t.batch_size} is not divisible by the "
            f"{len(devices)} devices {devices} (one replica each)")
    strategy = tl.select_strategy(devices)
    replicas = strategy.num_replicas_in_sync
    policy, float8 = tl.resolve_precision(t.precision, devices)
    fingerprint = {"model_config": config.to_dict(), "seq_len": settings.seq_len,
                   "batch_size": t.batch_size, "seed": t.seed, "float8": float8,
                   "train_steps": train_steps}
    log_fn(f"trainer: {config.num_hidden_layers} layers, vocab {config.vocab_size}, "
           f"seq_len {settings.seq_len}, batch {t.batch_size}, {train_steps} steps on "
           f"{devices or ['CPU']} ({type(strategy).__name__}, {replicas} replica(s)), "
           f"policy {policy}{' + float8' if float8 else ''}")

    started = time.perf_counter()
    with tl.dtype_policy(policy):
        keras.utils.set_random_seed(t.seed)
        schedule = tl.WarmupCosineSchedule(t.learning_rate, t.warmup_steps, train_steps)
        with strategy.scope():
            model = DeepSeekV3ForCausalLM(config)
            if float8:
                model.quantize("float8")
            optimizer = tl.make_optimizer(model, schedule, t.weight_decay, t.grad_clip_norm)
            model.compile(optimizer=optimizer, loss=NextTokenLoss(),
                          metrics=[tl.next_token_loss_metric()], jit_compile=False)
            optimizer.build(model.trainable_variables)
        checkpoint = tl.TrainingCheckpoint(t.checkpoint_dir, model, optimizer, fingerprint)
        start_step = checkpoint.restore_latest()
        if start_step > train_steps:
            raise TrainerConfigError(
                f"fn_args.train_steps: the checkpoint in {t.checkpoint_dir} is already at step "
                f"{start_step} > train_steps {train_steps}; use a fresh training.checkpoint_dir")
        if start_step:
            log_fn(f"resuming from step {start_step} ({checkpoint.latest})")

        tokens_per_step = t.batch_size * settings.seq_len
        monitor = tl.TrainingMonitor(
            start_step=start_step, total_steps=train_steps, log_every=t.log_every,
            checkpoint_every=t.checkpoint_every, tokens_per_step=tokens_per_step,
            schedule=schedule, checkpoint=checkpoint, log_dir=fn_args.model_run_dir,
            harvest_every_step=replicas > 1, log_fn=log_fn)
        remaining = train_steps - start_step
        train_started = time.perf_counter()
        if remaining > 0:
            dataset = tl.train_dataset(train_patterns, settings.seq_len, t.batch_size, t.seed,
                                       skip_batches=start_step)
            model.fit(dataset, epochs=1, steps_per_epoch=remaining, verbose=0,
                      callbacks=[tl.RouterBiasUpdate(model), monitor, *(extra_callbacks or [])])
        else:
            log_fn(f"checkpoint is at step {start_step} = train_steps; nothing left to train")
        train_seconds = time.perf_counter() - train_started
        final_step = int(optimizer.iterations.numpy())
        if final_step != train_steps:
            raise RuntimeError(f"training ended at step {final_step}, expected {train_steps}")

    # Everything below runs in float32 on one device.
    inference = export.inference_model(model, config)
    artifact = model_artifact_uri(fn_args.serving_model_dir)
    evaluation = {}
    eval_experts = {}
    if eval_patterns:
        eval_batches = t.eval_batches or eval_steps
        evaluation = tl.evaluate_loss(inference, eval_patterns, settings.seq_len, t.batch_size,
                                      eval_batches)
        stats = tl.ExpertStats(inference)
        stats.harvest()
        eval_experts = stats.summary()
        log_fn(f"eval loss {evaluation['eval_loss']:.4f} (ppl {evaluation['eval_perplexity']:.2f}) "
               f"over {evaluation['eval_batches']} batches")
    keras_path = export.save_keras_model(inference, os.path.join(artifact, KERAS_MODEL_PATH))
    export.export_saved_model(inference, settings.seq_len, fn_args.serving_model_dir)

    last = monitor.history[-1] if monitor.history else {}
    trained_steps = train_steps - start_step
    summary = {
        "seq_len": settings.seq_len,
        "model_config": config.to_dict(),
        "training": t.to_dict(),
        "train_steps": train_steps,
        "start_step": start_step,
        "resumed": start_step > 0,
        "final_step": final_step,
        "precision": {"requested": t.precision, "policy": policy, "float8": float8},
        "devices": devices or ["CPU"],
        "strategy": type(strategy).__name__,
        "num_replicas": replicas,
        "parameters": int(sum(math.prod(v.shape) for v in inference.weights)),
        "final_train_loss": last.get("loss"),
        "final_train_next_token_loss": last.get("next_token_loss"),
        "final_train_perplexity": last.get("perplexity"),
        "tokens_trained": trained_steps * tokens_per_step,
        "train_seconds": train_seconds,
        "tokens_per_second": (trained_steps * tokens_per_step / train_seconds
                              if trained_steps and train_seconds > 0 else None),
        "wall_seconds": time.perf_counter() - started,
        "loss_history": monitor.history,
        "expert_utilization_last_interval": monitor.last_expert_summary,
        "expert_utilization_eval": eval_experts,
        **evaluation,
        "checkpoint_dir": t.checkpoint_dir,
        "checkpoint_steps": checkpoint.all_steps(),
        "keras_model": keras_path,
        "serving_model_dir": fn_args.serving_model_dir,
        "tensorboard_dir": fn_args.model_run_dir,
    }
    tf.io.gfile.makedirs(artifact)
    with tf.io.gfile.GFile(os.path.join(artifact, SUMMARY_FILE), "w") as f:
        f.write(json.dumps(_json_safe(summary), indent=2))
    return summary
