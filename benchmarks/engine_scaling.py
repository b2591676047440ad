"""Data-parallel overhead of the training engine on virtual CPU devices: the
Trainer's step (training.engine) on the same global batch on 1 device and on
N devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set in a child
process because it must precede the JAX import). On one CPU the N devices
share the same cores, so this measures the cost of the SPMD partitioning and
collectives, not a speed-up.

    python -m benchmarks.engine_scaling --devices 8 --out /tmp/engine_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def _measure(preset: str, batch: int, seq_len: int, repeats: int) -> dict:
    import jax

    from benchmarks.train_vs_reference import measure_engine
    from model import get_preset

    config = get_preset(preset)
    out = {"devices_available": jax.device_count()}
    for n in (1, jax.device_count()):
        result = measure_engine(config, batch, seq_len, repeats, devices=jax.devices()[:n])
        out[f"devices_{n}"] = {"step_ms": result["timing"], "mesh": result["mesh"],
                               "tokens_per_s": result["tokens_per_s"]}
    one, many = out["devices_1"], out[f"devices_{jax.device_count()}"]
    out["dp_overhead_ratio"] = many["step_ms"]["median_ms"] / one["step_ms"]["median_ms"]
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
    from training.launch import worker_env

    out = args.out or tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, "-m", "benchmarks.engine_scaling", "--child", "--out", out,
           "--devices", str(args.devices), "--preset", args.preset, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--repeats", str(args.repeats)]
    subprocess.run(cmd, check=True, env=worker_env(args.devices))
    with open(out) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
