"""Training throughput: our jitted Keras training step against Hugging Face
transformers' DeepseekV3ForCausalLM (PyTorch, CPU) on the same dimensions,
batch, sequence length and thread count, measured in the same run.

The reference runs in its own Python (torch + transformers), found in this
order: the --reference-python argument, $DEEPSEEK_TFX_REFERENCE_PYTHON, then
the well-known venvs below. Without one the reference entry says
"skipped: <reason>" and only our number is reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import common
from .configs import SIZES, train_config

TARGET_SPEEDUP = 1.25
ENV_VAR = "DEEPSEEK_TFX_REFERENCE_PYTHON"
KNOWN_VENVS = ("/work/refenv/bin/python", "/work/refenv-bench/bin/python")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_torch.py")
REFERENCE_TIMEOUT_S = 900


def _next_token_loss(model, ids, mla_mode=None):
    from keras import ops

    from model.deepseek_v3 import sparse_ce

    logits = model(ids, training=True, mode=mla_mode)
    return ops.mean(sparse_ce(logits[:, :-1], ids[:, 1:]))


def measure_ours(config, batch: int, seq_len: int, repeats: int,
                 mla_mode: Optional[str] = None) -> Dict[str, Any]:
    """Our jitted training step. mla_mode None: the Trainer's step itself
    (training.engine: AdamW + schedule + clipping + bias update) when the
    backend is JAX; "absorbed": the latent MLA form through a plain step,
    for comparison."""
    import keras
    from keras import ops

    if mla_mode is None and keras.backend.backend() == "jax":
        return measure_engine_as_trained(config, batch, seq_len, repeats)

    from model import DeepSeekV3ForCausalLM
    from model.analysis import parameter_count, train_flops_per_token

    keras.utils.set_random_seed(0)
    model = DeepSeekV3ForCausalLM(config)
    step = common.TrainStep(model, keras.optimizers.AdamW(1e-3, weight_decay=0.01),
                            lambda m, ids: _next_token_loss(m, ids, mla_mode))
    ids = ops.convert_to_tensor(
        np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq_len)).astype("int32"))
    timing = common.time_calls(lambda: step(ids), repeats=repeats, warmup=2)
    tokens = batch * seq_len
    flops_per_token = train_flops_per_token(config, seq_len)
    tokens_per_s = tokens * 1e3 / timing["median_ms"]
    return {
        "tokens_per_s": tokens_per_s, "timing": timing, "compilations": step.compilations(),
        "model_flops_per_token": flops_per_token,
        "achieved_gflops_per_s": tokens_per_s * flops_per_token / 1e9,
        "parameters": parameter_count(config)["total"],
        "trainable_params_built": int(sum(int(np.prod(v.shape)) for v in model.trainable_variables)),
    }


def measure_engine_as_trained(config, batch: int, seq_len: int, repeats: int) -> Dict[str, Any]:
    """measure_engine on the CPU devices the Trainer gives the engine
    (training.host_devices: one per core that divides the batch), in a child
    process when this one has another count (XLA_FLAGS precedes the JAX
    import); `cpu_devices` in the result says which."""
    import jax

    from training.host_devices import cpu_devices
    from training.launch import engine_python, worker_env
    from training.settings import TrainingSettings

    chosen = cpu_devices(TrainingSettings(batch_size=batch, seq_len=seq_len))
    if chosen.count is None or chosen.count == jax.device_count() or jax.default_backend() != "cpu":
        result = measure_engine(config, batch, seq_len, repeats)
    else:
        env = worker_env(chosen.count)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "engine.json")
            subprocess.run([engine_python(env), "-m", "benchmarks.train_vs_reference",
                            "--engine-child", json.dumps({"config": config.to_dict(), "batch": batch,
                                                          "seq_len": seq_len, "repeats": repeats,
                                                          "out": out})],
                           env=env, cwd=ROOT, check=True, timeout=REFERENCE_TIMEOUT_S)
            with open(out) as f:
                result = json.load(f)
    result["cpu_devices"] = {"count": chosen.count, "why": chosen.why}
    return result


def _engine_child(args: Dict[str, Any]) -> None:
    common.configure("jax")
    from model.config import DeepSeekV3Config

    result = measure_engine(DeepSeekV3Config.from_dict(args["config"]), args["batch"],
                            args["seq_len"], args["repeats"])
    with open(args["out"], "w") as f:
        json.dump(result, f)


def measure_engine(config, batch: int, seq_len: int, repeats: int,
                   devices=None, expert_parallel: int = 1, **settings) -> Dict[str, Any]:
    """The Trainer's jitted step (training.engine) on one fixed batch, and
    the compiled step's bytes per device; `settings`: more TrainingSettings."""
    from model.analysis import parameter_count, train_flops_per_token
    from training.engine import Engine
    from training.settings import TrainingSettings

    engine = Engine(config, TrainingSettings(batch_size=batch, seq_len=seq_len,
                                             train_steps=repeats + 2,
                                             expert_parallel=expert_parallel, **settings),
                    devices=devices,
                    log_fn=lambda line: None)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch, seq_len))
    run, compile_seconds = engine.step_runner(ids.astype("int32"))
    timing = common.time_calls(run, repeats=repeats, warmup=2)
    timing["compile_ms"] = compile_seconds * 1e3
    tokens_per_s = batch * seq_len * 1e3 / timing["median_ms"]
    flops_per_token = train_flops_per_token(config, seq_len)
    memory = engine.last_compiled.memory_analysis()
    return {
        "tokens_per_s": tokens_per_s, "timing": timing, "compilations": 1,
        "step": "training.engine", "mesh": engine.plan.to_dict(),
        "per_device_bytes": {"arguments": int(memory.argument_size_in_bytes),
                             "temporaries": int(memory.temp_size_in_bytes)},
        "model_flops_per_token": flops_per_token,
        "achieved_gflops_per_s": tokens_per_s * flops_per_token / 1e9,
        "parameters": parameter_count(config)["total"],
        "trainable_params_built": int(sum(int(np.prod(v.shape))
                                          for v in engine.model.trainable_variables)),
    }


def find_reference_python(explicit: Optional[str]) -> Tuple[Optional[str], List[str]]:
    """-> (python path or None, notes on each candidate tried)."""
    candidates = []
    if explicit:
        candidates.append(("--reference-python", explicit))
    if os.environ.get(ENV_VAR):
        candidates.append((ENV_VAR, os.environ[ENV_VAR]))
    if not candidates:
        candidates += [("known venv", path) for path in KNOWN_VENVS]
    notes = []
    for source, path in candidates:
        path = shutil.which(path) or path  # a bare name such as "python3" is looked up on PATH
        if not os.path.exists(path):
            notes.append(f"{source}: {path} does not exist")
            continue
        probe = subprocess.run(
            [path, "-c", "import torch, transformers; "
                         "from transformers import DeepseekV3ForCausalLM"],
            capture_output=True, text=True, timeout=300)
        if probe.returncode == 0:
            return path, notes
        tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["?"]
        notes.append(f"{source}: {path} cannot import torch/transformers ({tail[0]})")
    return None, notes


def call_reference(python: str, args: List[str], threads: int) -> Dict[str, Any]:
    """Runs reference_torch.py with `args`; its REFERENCE_RESULT, or {"skipped": why}."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_BACKEND")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run([python, REFERENCE_SCRIPT] + args + ["--threads", str(threads)],
                              capture_output=True, text=True, env=env, timeout=REFERENCE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"skipped": f"reference timed out after {REFERENCE_TIMEOUT_S} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("REFERENCE_RESULT "):
            result = json.loads(line[len("REFERENCE_RESULT "):])
            result["python_executable"] = python
            return result
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    return {"skipped": f"reference failed (exit {proc.returncode}): {tail}"}


def run_reference(python: str, config, batch: int, seq_len: int, steps: int,
                  threads: int) -> Dict[str, Any]:
    return call_reference(python, ["--config-json", config.to_json(), "--batch", str(batch),
                                   "--seq-len", str(seq_len), "--steps", str(steps),
                                   "--warmup", "3"], threads)


def run(mode: str, reference_python: Optional[str] = None,
        skip_reference: Optional[str] = None) -> Dict[str, Any]:
    sizes = SIZES[mode]
    config = train_config(mode)
    batch, seq_len = sizes.train_batch, sizes.train_seq_len
    threads = common.available_cores() if not common._CONFIGURED else common._CONFIGURED["threads"]
    ours = measure_ours(config, batch, seq_len, sizes.train_repeats)
    # The same model trained with the absorbed (latent) MLA forward instead of
    # the default naive one (which is what the reference computes too).
    ours_absorbed = (None if mode == "smoke" else
                     measure_ours(config, batch, seq_len, sizes.train_repeats, mla_mode="absorbed"))
    if skip_reference:
        reference = {"skipped": skip_reference}
        notes: List[str] = []
    else:
        python, notes = find_reference_python(reference_python)
        if python is None:
            reference = {"skipped": "no Python with torch + transformers: " + "; ".join(notes)}
        else:
            reference = run_reference(python, config, batch, seq_len, sizes.reference_steps, threads)
    out: Dict[str, Any] = {
        "ours_tokens_per_s": ours["tokens_per_s"],
        "ours_absorbed_mla_tokens_per_s": ours_absorbed and ours_absorbed["tokens_per_s"],
        "reference_tokens_per_s": reference.get("tokens_per_s"),
        "config": config.to_dict(), "batch": batch, "seq_len": seq_len, "threads": threads,
        "ours": ours, "ours_absorbed_mla": ours_absorbed, "reference": reference,
    }
    if "skipped" in reference:
        out["reference_skipped"] = reference["skipped"]
    else:
        ratio = ours["tokens_per_s"] / reference["tokens_per_s"]
        out["speedup"] = ratio
        # Best-case ratio (min step times): less sensitive to other load on the machine.
        out["speedup_of_min_times"] = reference["min_ms"] / ours["timing"]["min_ms"]
        if ours_absorbed:
            out["speedup_absorbed_mla"] = ours_absorbed["tokens_per_s"] / reference["tokens_per_s"]
        # Judge on the medians unless a side was unstable (other load on the
        # machine: PyTorch eager with busy-waiting OpenMP threads suffers most),
        # then on the best-case (min) times, and say so.
        spreads = {"ours": ours["timing"]["max_ms"] / ours["timing"]["min_ms"],
                   "reference": reference["max_ms"] / reference["min_ms"]}
        unstable = max(spreads.values()) > 1.5
        judged = out["speedup_of_min_times"] if unstable else ratio
        out["target"] = {"speedup": TARGET_SPEEDUP, "met": judged >= TARGET_SPEEDUP,
                         "judged_on": "min times (unstable run)" if unstable else "medians",
                         "max_over_min": spreads}
        # Same dimensions => same trainable parameter count (the routing
        # correction bias is a buffer in HF and non-trainable in ours).
        out["same_parameter_count"] = ours["trainable_params_built"] == reference.get("parameters")
        if not out["same_parameter_count"]:
            out["parameter_mismatch"] = {"ours": ours["trainable_params_built"],
                                         "reference": reference.get("parameters")}
    if notes:
        out["reference_search"] = notes
    return out


if __name__ == "__main__":  # pragma: no cover - manual use
    if sys.argv[1:2] == ["--engine-child"]:  # measure_engine_as_trained's child
        _engine_child(json.loads(sys.argv[2]))
    else:
        print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "smoke"), indent=1))
