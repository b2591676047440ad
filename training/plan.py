"""What one training step needs per device, before booking the devices:
the engine's step compiled without training (virtual CPU devices stand in
for the real ones), read back as the mesh, the bytes each device holds
(parameters, optimizer state, the step's temporaries) and the collectives a
step runs, with their sizes (`deepseek-tfx plan`).

    python -m training.plan --preset mini --batch 32 --seq-len 64 --devices 8 \\
        --expert-parallel 4 [--json]

The compile happens in a child process (the device count must be set before
JAX starts), as the Trainer's engine does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

import numpy as np


def _shard_bytes(variables) -> int:
    total = 0
    for v in variables:
        value = v.value
        total += int(np.prod(value.sharding.shard_shape(value.shape))) * value.dtype.itemsize
    return total


def measure(config, settings, devices=None) -> dict:
    """In an engine process (KERAS_BACKEND=jax): compile the step and read it."""
    import jax

    from training import hlo
    from training.engine import Engine

    engine = Engine(config, settings, devices=devices, log_fn=lambda line: None)
    batches = np.zeros((settings.gradient_accumulation, settings.batch_size, settings.seq_len),
                       np.int32)
    compiled = engine.compiled_step(batches)
    memory = compiled.memory_analysis()
    ops = hlo.collectives(compiled.as_text())

    # A loop without a known trip count runs the dispatch's extra rounds
    # (capacity overflow): every other collective runs a known number of times.
    steady = [op for op in hlo.per_step(ops) if op.repeats is not None]
    extra = [op for op in ops if op.repeats is None]

    model = engine.model
    return {
        "mesh": engine.plan.to_dict(),
        "devices": len(engine.devices),
        "platform": engine.platform,
        "policy": engine.policy,
        "per_device_bytes": {
            "parameters": _shard_bytes(model.trainable_variables + model.non_trainable_variables),
            "optimizer_state": _shard_bytes(engine.optimizer.variables),
            "arguments": int(memory.argument_size_in_bytes),
            "outputs": int(memory.output_size_in_bytes),
            "temporaries": int(memory.temp_size_in_bytes),
            "generated_code": int(memory.generated_code_size_in_bytes),
        },
        "collectives_per_step": {"totals": hlo.summary(steady),
                                 "ops": [op.to_dict() for op in steady]},
        # What each extra all-to-all round of an overflowing MoE call adds.
        "overflow_round_collectives": [op.to_dict() for op in extra],
        "dispatch_capacity_factor": getattr(settings, "dispatch_capacity_factor", None),
        "dispatch_recompute": getattr(settings, "dispatch_recompute", None),
        "jax": jax.__version__,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def format_plan(plan: dict) -> str:
    m, b = plan["mesh"], plan["per_device_bytes"]
    lines = [f"mesh: batch {m['batch']} x expert {m['expert']} ({plan['devices']} "
             f"{plan['platform']} devices, policy {plan['policy']})",
             "per device:",
             f"  parameters       {_mib(b['parameters'])}",
             f"  optimizer state  {_mib(b['optimizer_state'])}",
             f"  temporaries      {_mib(b['temporaries'])}  (the step's working memory)",
             f"  arguments        {_mib(b['arguments'])}",
             "collectives per step (result bytes per device):"]
    totals = plan["collectives_per_step"]["totals"]
    if not totals:
        lines.append("  none")
    for kind, t in sorted(totals.items()):
        lines.append(f"  {kind:<20} {t['count']:>4} x, {_mib(t['bytes'])}")
    seen = {}
    for op in plan["collectives_per_step"]["ops"]:
        key = (op["kind"], tuple(op["shapes"]), op["replica_groups"])
        seen[key] = seen.get(key, 0) + (op["repeats"] or 1)
    for (kind, shapes, groups), n in sorted(seen.items(), key=lambda kv: -kv[1]):
        shown = ", ".join(shapes[:2]) + (f", ... ({len(shapes)})" if len(shapes) > 2 else "")
        lines.append(f"    {n:>3} x {kind} {shown} groups {groups or '-'}")
    if plan["overflow_round_collectives"]:
        extra = sum(op["bytes"] for op in plan["overflow_round_collectives"])
        lines.append(f"a micro-batch that overflows the dispatch capacity (factor "
                     f"{plan['dispatch_capacity_factor']}) runs extra all-to-all rounds: "
                     f"{_mib(extra)} each, over all MoE layers")
    return "\n".join(lines)


def run_plan(preset: str, batch_size: int, seq_len: int, devices: int,
             expert_parallel: int = 1, gradient_accumulation: int = 1,
             precision: str = "auto", model_overrides: Optional[dict] = None,
             **dispatch) -> dict:
    """Compiles the step for `devices` virtual CPU devices in a child process;
    `dispatch`: dispatch_capacity_factor / dispatch_recompute (TrainingSettings)."""
    from model import get_preset
    from training.launch import ROOT, engine_python, worker_env
    from training.parallel import plan_mesh
    from training.settings import TrainingSettings

    config = get_preset(preset, **(model_overrides or {}))
    settings = TrainingSettings(batch_size=batch_size, seq_len=seq_len, train_steps=1,
                                expert_parallel=expert_parallel,
                                gradient_accumulation=gradient_accumulation,
                                precision=precision, **dispatch).check_model(config)
    plan_mesh(devices, expert_parallel, config.n_routed_experts, batch_size)  # fail here, early
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = os.path.join(tmp, "spec.json"), os.path.join(tmp, "plan.json")
        with open(spec, "w") as f:
            json.dump({"model_config": config.to_dict(), "engine": settings.to_dict()}, f)
        env = worker_env(devices, {"JAX_PLATFORMS": "cpu"})
        python = engine_python(env)
        proc = subprocess.run([python, "-m", "training.plan", "--child", spec, out], env=env,
                              cwd=ROOT if python == sys.executable else tmp,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"compiling the step failed:\n{tail}")
        with open(out) as f:
            result = json.load(f)
    result["preset"], result["batch_size"], result["seq_len"] = preset, batch_size, seq_len
    return result


def _child(spec_path: str, out_path: str) -> int:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from model.config import DeepSeekV3Config
    from training.settings import TrainingSettings

    with open(spec_path) as f:
        spec = json.load(f)
    config = DeepSeekV3Config.from_dict(spec["model_config"])
    result = measure(config, TrainingSettings.from_dict(spec["engine"]))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="mini")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--devices", type=int, default=8, help="virtual CPU devices (the mesh size)")
    p.add_argument("--expert-parallel", type=int, default=1)
    p.add_argument("--gradient-accumulation", type=int, default=1)
    p.add_argument("--precision", default="auto")
    from training.settings import TrainingSettings as defaults

    p.add_argument("--dispatch-capacity-factor", type=float,
                   default=defaults.dispatch_capacity_factor)
    p.add_argument("--dispatch-recompute", action=argparse.BooleanOptionalAction,
                   default=defaults.dispatch_recompute,
                   help="recompute the dispatch in the backward pass (the Trainer's default)")
    p.add_argument("--model-overrides", default=None, help="JSON dict of model config fields")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_from_args(args, out=sys.stdout, err=sys.stderr) -> int:
    from model import ConfigError
    from training.parallel import MeshError
    from training.settings import TrainingSettingsError

    try:
        overrides = json.loads(args.model_overrides) if args.model_overrides else None
        plan = run_plan(args.preset, args.batch_size, args.seq_len, args.devices,
                        args.expert_parallel, args.gradient_accumulation, args.precision,
                        overrides, dispatch_capacity_factor=args.dispatch_capacity_factor,
                        dispatch_recompute=args.dispatch_recompute)
    except (MeshError, TrainingSettingsError, ConfigError, ValueError, TypeError) as e:
        print(f"deepseek-tfx plan: {e}", file=err)
        return 2
    except RuntimeError as e:
        print(f"deepseek-tfx plan: {e}", file=err)
        return 1
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan), file=out)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1], argv[2])
    p = argparse.ArgumentParser(prog="python -m training.plan", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
