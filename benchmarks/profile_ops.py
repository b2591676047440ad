"""Where the engine's own step spends its time, per HLO op: the step runs
under `jax.profiler`, the XLA:CPU thunk events are read back from the trace
(`jax.profiler.ProfileData`), each op's self time (nested events subtracted)
is summed, and ops are grouped by the model part their `op_name` names.

    KERAS_BACKEND=jax .venv-engine/bin/python -m benchmarks.profile_ops --config train_vs_reference

Times are busy thread-milliseconds per step (every pool thread summed), so
they add up to more than the step's wall time when ops run concurrently.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile

# (substring of op_name, part), first match wins.
_PARTS = (("jit(bucketed)/cond", "routed experts: overflow tile loop"),
          ("mlp/while", "routed experts: tile loops"),
          ("jit(bucketed)/e", "routed experts: buckets' batched dots"), ("shared_experts", "shared experts"),
          ("/gate/", "router"), ("layers_0))/mlp", "dense MLP"), ("layers_0)/mlp", "dense MLP"),
          ("/mlp", "routed experts: sort/gather/combine"), ("self_attn", "attention"),
          ("layernorm", "norms"), ("/norm", "norms"), ("lm_head", "LM head + loss"),
          ("log_softmax", "LM head + loss"), ("embed", "embeddings"))


def part_of(op_name: str) -> str:
    # The tile loops sit under mlp/ directly or inside the jitted loop
    # function (mlp/jit(swiglu)/while, mlp/jit(gmm)/while); the buckets'
    # einsums are named by their subscripts (mlp/jit(bucketed)/ech,ehi->eci)
    # and the overflow past full buckets runs under mlp/jit(bucketed)/cond.
    op_name = re.sub(r"/mlp/jit\([^)]*\)/while", "/mlp/while", op_name)
    return next((part for key, part in _PARTS if key in op_name), "other")


def self_times(trace_file: str):
    """{op: self ns} over the XLA:CPU pool threads of one trace."""
    from jax.profiler import ProfileData

    totals = collections.Counter()
    for plane in ProfileData.from_file(trace_file).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            stack = []  # (end ns, op) of the enclosing events
            for e in sorted(line.events, key=lambda e: (e.start_ns, -e.duration_ns)):
                if e.name.startswith("ThunkExecutor"):
                    continue
                while stack and stack[-1][0] <= e.start_ns:
                    stack.pop()
                if stack:
                    totals[stack[-1][1]] -= e.duration_ns
                totals[e.name] += e.duration_ns
                stack.append((e.start_ns + e.duration_ns, e.name))
    return totals


def profile(run, compiled_text: str, steps: int = 3, top: int = 20, within: str = ""):
    """-> ({part: thread-ms per step}, {op: (thread-ms per step, op_name)})."""
    import jax

    names = dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"',
                            compiled_text, re.M))
    with tempfile.TemporaryDirectory() as out:
        jax.profiler.start_trace(out)
        for _ in range(steps):
            result = run()
        jax.block_until_ready(result)
        jax.profiler.stop_trace()
        trace = max(glob.glob(f"{out}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
        totals = self_times(trace)
    parts = collections.Counter()
    for op, ns in totals.items():
        parts[part_of(names.get(op, ""))] += ns / steps / 1e6
    ops = [(op, ns) for op, ns in totals.most_common() if not within or part_of(names.get(op, "")) == within]
    ops = {op: (ns / steps / 1e6, names.get(op, "")) for op, ns in ops[:top]}
    return dict(parts.most_common()), ops


def main(argv=None) -> int:
    from benchmarks import common

    common.configure("jax")
    import numpy as np

    from benchmarks.configs import profile_config
    from training.engine import Engine
    from training.settings import TrainingSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="train_vs_reference",
                        help="a preset name or 'train_vs_reference'")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=20, help="how many of the costliest ops to list")
    parser.add_argument("--part", default="", help="list only the ops of this part (e.g. attention)")
    args = parser.parse_args(argv)
    config, batch, seq_len = profile_config(args.config)
    engine = Engine(config, TrainingSettings(batch_size=batch, seq_len=seq_len,
                                             train_steps=args.steps + 3), log_fn=lambda line: None)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch, seq_len))
    run, _ = engine.step_runner(ids.astype("int32"))
    run(), run()  # compiled; warm
    parts, ops = profile(run, engine.last_compiled.as_text(), args.steps, args.top, args.part)
    total = sum(parts.values())
    print(f"busy thread-ms per step {total:.1f}, load average {os.getloadavg()[0]:.2f}")
    for part, ms in parts.items():
        print(f"| {part} | {ms:.1f} | {100 * ms / total:.0f}% |")
    for op, (ms, name) in ops.items():
        print(f"{ms:8.2f}  {op}  {name[-100:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
