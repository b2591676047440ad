"""Parallel overhead of the training engine on virtual CPU devices: the
Trainer's step (training.engine) on the same global batch on 1 device and on
N devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set in a child
process because it must precede the JAX import): data parallel (batch N) and
expert parallel (batch N/4 x expert 4, batch 1 x expert N; the `_kept`
layouts with --no-dispatch-recompute, the dispatch activations kept for the
backward pass), with the compiled step's arguments and temporaries per device. On one CPU the N devices share
the same cores, so the step ratio measures the cost of the partitioning and
the collectives (equal total work would be 1.0), not a speed-up.

    python -m benchmarks.engine_scaling --devices 8 --out /tmp/engine_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

TARGET_RATIO = 1.25  # N-device / 1-device step, same global batch (issue 15)


def _measure(preset: str, batch: int, seq_len: int, repeats: int) -> dict:
    import jax

    from benchmarks.train_vs_reference import measure_engine
    from model import get_preset

    config = get_preset(preset)
    n = jax.device_count()
    out = {"devices_available": n, "target_ratio": TARGET_RATIO}
    layouts = [(f"devices_{1}", 1, 1, True), (f"devices_{n}", n, 1, True)]
    for recompute, suffix in ((True, ""), (False, "_kept")):
        for ep in (4, n):
            if n > 1 and n % ep == 0 and config.n_routed_experts % ep == 0 and ep > 1:
                layouts.append((f"devices_{n}_ep{ep}{suffix}", n, ep, recompute))
    for key, devices, ep, recompute in layouts:
        result = measure_engine(config, batch, seq_len, repeats, devices=jax.devices()[:devices],
                                expert_parallel=ep, dispatch_recompute=recompute)
        out[key] = {"step_ms": result["timing"], "mesh": result["mesh"],
                    "tokens_per_s": result["tokens_per_s"],
                    "per_device_bytes": result["per_device_bytes"]}
    one = out["devices_1"]["step_ms"]["median_ms"]
    out["dp_overhead_ratio"] = out[f"devices_{n}"]["step_ms"]["median_ms"] / one
    for key, _, ep, recompute in layouts[2:]:
        out[f"ep{ep}{'' if recompute else '_kept'}_overhead_ratio"] = (
            out[key]["step_ms"]["median_ms"] / one)
    dp = out[f"devices_{n}"]["per_device_bytes"]
    out["per_device_bytes_vs_data_parallel"] = {
        key: {k: v / dp[k] for k, v in out[key]["per_device_bytes"].items()}
        for key, _, _, _ in layouts[2:]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--preset", default="mini")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = _measure(args.preset, args.batch, args.seq_len, args.repeats)
        result.update(preset=args.preset, batch=args.batch, seq_len=args.seq_len,
                      cpu_count=os.cpu_count(), loadavg=list(os.getloadavg()))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        return 0
    from training.launch import engine_python, worker_env

    out = args.out or tempfile.mktemp(suffix=".json")
    env = worker_env(args.devices)
    cmd = [engine_python(env), "-m", "benchmarks.engine_scaling", "--child", "--out", out,
           "--devices", str(args.devices), "--preset", args.preset, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--repeats", str(args.repeats)]
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
