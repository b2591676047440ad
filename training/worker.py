"""The engine's process entry point: `python -m training.worker SPEC.json`.

Started by the Trainer adapter (components/trainer.py) with KERAS_BACKEND=jax,
or by hand on a machine with JAX and no TensorFlow. SPEC:

    {"model_config": DeepSeekV3Config.to_dict(),
     "engine": TrainingSettings.to_dict() (training.settings; defaults for what is left out),
     "tokens": "<.npy [micro-batches, B, S] int32>" | "stdin",
     "padding_mask": "<.npy, same shape>" | null,
     "output_dir": "<dir>",          # gets result.json and weights.npz
     "num_devices": int | null,      # default: every device (all processes)
     "save_weights": true, "stop_after": null, "report_shardings": false,
     "report_collectives": false,    # the compiled step's collectives (training/hlo.py)
     "logits_for": "<.npy [N, S] int32>" | null,  # -> output_dir/logits.npy
     "data_identity": str | null,   # part of the checkpoint fingerprint
     "base_model": {"path": "<HF checkpoint dir>", "identity": str} | null}
                                    # start from those weights (model.base_model)

"logits_for": after training, the model's float32 logits for those token
rows, from the engine's own weights in this process (the check that the
export in another environment computes the same function).

"tokens": "stdin" streams the batches: stdin carries train_steps x
gradient_accumulation micro-batches of [batch_size, seq_len] int32 (native
byte order, C order) back to back (training.token_stream.TokenStream); a
resumed run reads and discards the micro-batches of the steps it has done.
`training.launch.run_worker(..., batches=...)` feeds them. With several
processes each one reads its own stdin and must get the same stream.

Console lines go to stdout (flushed), and beside them one JSON line per
engine metrics record (`METRICS_PREFIX` + json; the engine's `metrics_fn`:
the start step, then every log interval), which
`training.launch.wait_worker` hands to its `metrics_fn`. Multi-process: set
KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID in every
process (see training.parallel); process 0 writes the outputs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading

DIVERGED_EXIT = 3
# A failure the engine can name (mesh, checkpoint mismatch, the token stream
# ending early, out of device memory): one line `engine error: ...` on stdout
# (launch.failure_paragraph reads it), the traceback on stderr for the log.
ENGINE_ERROR_EXIT = 4
ENGINE_ERROR_PREFIX = "engine error:"


def named_error(error: BaseException):
    """The one-line account of an error the engine knows, or None."""
    from model.hf_checkpoint import CheckpointError
    from training.checkpoint import CheckpointMismatchError
    from training.parallel import MeshError

    text = " ".join(str(error).split())
    if isinstance(error, MeshError):
        return f"the device mesh cannot run this training: {text}"
    if isinstance(error, CheckpointMismatchError):
        return f"the checkpoint does not fit this training: {text}"
    if isinstance(error, CheckpointError):
        return f"the base model does not fit this model: {text}"
    if isinstance(error, EOFError):
        return f"the training batches ended early: {text}"
    if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
        first = text.split(" Traceback")[0][:300]
        return (f"out of device memory (RESOURCE_EXHAUSTED): lower batch_size, seq_len or the model "
                f"size, or use gradient_accumulation / more devices ({first})")
    return None


# Interval records for the Trainer's live TensorBoard: one JSON line each.
METRICS_PREFIX = "@metrics "
_STDOUT_LOCK = threading.Lock()


def emit(line: str) -> None:
    """One line to stdout (the Trainer's pipe), whole. The checkpoint
    writer's thread logs beside the training loop, and print() writes the
    text and its newline apart: two threads could merge their lines, and a
    "checkpoint step N" glued to another line is one the Trainer never
    mirrors to a remote checkpoint URI (seen in a test run)."""
    with _STDOUT_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def json_safe(value):
    """JSON-ready: non-finite floats become null (also used by the Trainer adapter)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def sharding_report(engine) -> dict:
    """Per variable: global shape and the shape each device holds."""
    from training.checkpoint import relative_path

    def shard(v):
        value = v.value
        return {"shape": list(value.shape),
                "shard_shape": list(value.sharding.shard_shape(value.shape)),
                "replicated": bool(value.sharding.is_fully_replicated)}

    return {"model": {relative_path(v): shard(v) for v in engine.model.weights},
            "optimizer": {v.path: shard(v) for v in engine.optimizer.variables}}


def main(argv=None) -> int:
    try:
        return _main(argv)
    except Exception as e:  # noqa: BLE001 - named or not, the traceback goes to the log
        message = named_error(e)
        if message is None:
            raise
        import traceback

        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        emit(f"{ENGINE_ERROR_PREFIX} {message}")
        return ENGINE_ERROR_EXIT


def _main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m training.worker SPEC.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from model.config import DeepSeekV3Config
    from training.parallel import initialize_from_env
    from training.settings import TrainingSettings

    config = DeepSeekV3Config.from_dict(spec["model_config"])
    settings = TrainingSettings.from_dict(spec["engine"]).check_model(config)
    initialize_from_env(settings.seed)  # before any device is touched
    import jax

    from training import compile_cache

    compile_cache.enable()
    import numpy as np

    from training.engine import Engine

    def log(line: str) -> None:
        if jax.process_index() == 0:
            emit(line)

    devices = jax.devices()
    if spec.get("num_devices"):
        devices = devices[:int(spec["num_devices"])]
    def report(record: dict) -> None:
        log(METRICS_PREFIX + json.dumps(json_safe(record)))

    engine = Engine(config, settings, devices=devices, log_fn=log, data_identity=spec.get("data_identity"),
                    metrics_fn=report, base_model=spec.get("base_model"))
    log(f"engine: {config.num_hidden_layers} layers, vocab {config.vocab_size}, seq_len "
        f"{settings.seq_len}, batch {settings.batch_size} x {settings.gradient_accumulation} "
        f"accumulation, {settings.train_steps} steps on {len(devices)} {engine.platform} "
        f"device(s) in {jax.process_count()} process(es), mesh batch {engine.plan.batch} x "
        f"expert {engine.plan.expert}, policy {engine.policy}"
        f"{' + float8' if engine.float8 else ''}")
    if spec["tokens"] == "stdin":
        from training.token_stream import TokenStream

        tokens = TokenStream(sys.stdin.buffer, settings.train_steps * settings.gradient_accumulation,
                             settings.batch_size, settings.seq_len)
    else:
        tokens = np.load(spec["tokens"], mmap_mode="r")
    mask = np.load(spec["padding_mask"], mmap_mode="r") if spec.get("padding_mask") else None
    from training.engine import TrainingDiverged

    try:
        result = engine.train(tokens, mask, stop_after=spec.get("stop_after"))
    except TrainingDiverged as e:
        log(str(e))
        return DIVERGED_EXIT
    out = spec["output_dir"]
    if spec.get("report_shardings"):
        result["shardings"] = sharding_report(engine)
    if spec.get("report_collectives") and engine.last_compiled is not None:
        from training import hlo

        result["collectives"] = [op.to_dict() for op in
                                 hlo.collectives(engine.last_compiled.as_text())]
    from training.environment import engine_environment

    result["engine_environment"] = engine_environment()
    result["compilation_cache"] = compile_cache.stats()
    weights = engine.weights()  # collective in multi-process runs: every process calls it
    logits = None
    if spec.get("logits_for"):  # after the weights: the call counts expert loads
        ids = np.load(spec["logits_for"]).astype(np.int32)
        logits = np.asarray(engine.model(ids, training=False), np.float32)
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        if spec.get("save_weights", True):
            tmp = os.path.join(out, "weights.npz.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, **weights)
            os.replace(tmp, os.path.join(out, "weights.npz"))
        if logits is not None:
            np.save(os.path.join(out, "logits.npy"), logits)
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(json_safe(result), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
