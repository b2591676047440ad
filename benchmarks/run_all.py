"""Runs the benchmark suite and writes one JSON result file.

    python -m benchmarks.run_all --quick --out benchmarks/results/cpu_quick.json
    python -m benchmarks.run_all --full --out benchmarks/results/cpu_full.json
    python -m benchmarks.run_all --smoke --out /tmp/smoke.json        # CI, < 1 minute
    python -m benchmarks.run_all --quick --backend tensorflow --out tf.json

Each section runs in its own Python process (a fresh backend, a clean global
dtype policy, and a crash in one section - XLA aborts the process on some
bugs - is recorded as that section's error instead of losing the run).
Sections run one after another, never in parallel, so they do not compete
for the cores. See benchmarks/README.md for what every key means.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

SECTIONS = ("mla_vs_mha", "moe_scaling", "decode", "generate", "fp8_vs_bf16", "train_vs_reference")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------- one section
def run_section(name: str, mode: str, reference_python: Optional[str],
                skip_reference: Optional[str]) -> Dict[str, Any]:
    """Runs one section in this process (the backend is already configured)."""
    if name == "mla_vs_mha":
        from . import mla_vs_mha

        return mla_vs_mha.run(mode)
    if name == "moe_scaling":
        from . import moe_scaling

        return moe_scaling.run(mode)
    if name == "decode":
        from . import decode

        return decode.run(mode)
    if name == "generate":
        from . import generate

        return generate.run(mode, reference_python, skip_reference)
    if name == "fp8_vs_bf16":
        from . import fp8_vs_bf16

        return fp8_vs_bf16.run(mode, include_float32=(mode == "full"))
    if name == "train_vs_reference":
        from . import train_vs_reference

        return train_vs_reference.run(mode, reference_python, skip_reference)
    if name.startswith("train_step:"):
        # Backend comparison: our training step alone, on the train config
        # with the group limit given after the colon (n_group).
        from . import train_vs_reference
        from .configs import SIZES, train_config

        sizes = SIZES[mode]
        n_group = int(name.split(":", 1)[1])
        config = train_config(mode).replace(n_group=n_group, topk_group=min(2, n_group))
        result = train_vs_reference.measure_ours(config, sizes.train_batch, sizes.train_seq_len,
                                                 sizes.train_repeats)
        result["config"] = {"n_group": config.n_group, "topk_group": config.topk_group}
        return result
    raise ValueError(f"unknown section {name!r}")


def _section_main(args) -> int:
    from . import common

    common.configure(args.backend, args.threads)
    start, load_before = time.time(), _loadavg()
    result = run_section(args.section, args.mode, args.reference_python, args.skip_reference)
    payload = {"result": result, "wall_s": time.time() - start,
               "loadavg_before": load_before, "loadavg_after": _loadavg()}
    with open(args.section_out, "w") as f:
        json.dump(payload, f, default=_json_default)
    return 0


def _json_default(value):
    import numpy as np

    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _spawn_section(name: str, args, backend: str, timeout_s: float) -> Dict[str, Any]:
    fd, out_path = tempfile.mkstemp(prefix=f"bench_{name.replace(':', '_')}_", suffix=".json")
    os.close(fd)
    # JAX sections run where the engine runs (its own venv when there is one).
    python = sys.executable
    if backend == "jax":
        from training.launch import engine_python

        python = engine_python()
    command = [python, "-m", "benchmarks.run_all", "--section", name,
               "--mode", args.mode, "--backend", backend, "--threads", str(args.threads),
               "--section-out", out_path]
    if args.reference_python:
        command += ["--reference-python", args.reference_python]
    if args.skip_reference:
        command += ["--skip-reference", args.skip_reference]
    env = dict(os.environ, KERAS_BACKEND=backend)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                and python == sys.executable else "")
    start = time.time()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stderr = None, (exc.stderr or b"").decode(errors="replace") if isinstance(
            exc.stderr, bytes) else (exc.stderr or "")
    meta: Dict[str, Any] = {"exit_code": code, "process_wall_s": round(time.time() - start, 2)}
    try:
        if code == 0:
            with open(out_path) as f:
                payload = json.load(f)
            meta.update(wall_s=round(payload["wall_s"], 2), loadavg_before=payload["loadavg_before"],
                        loadavg_after=payload["loadavg_after"])
            return {"result": payload["result"], "meta": meta}
    finally:
        os.unlink(out_path)
    lines = [l for l in (stderr or "").splitlines()
             if l.strip() and "Warning" not in l and not l.startswith(("I0000", "W0000"))]
    reason = "timed out" if code is None else f"exit code {code}"
    meta["error"] = f"section {name} failed ({reason}): " + " | ".join(lines[-6:])
    return {"result": None, "meta": meta}


def _inline_section(name: str, args) -> Dict[str, Any]:
    """Runs a section in this process (smoke mode: saves the start-up of a
    Python + backend per section). An exception becomes the section's error."""
    import traceback

    from . import common

    common.configure(args.backend, args.threads)
    start, load_before = time.time(), _loadavg()
    meta: Dict[str, Any] = {"exit_code": None}
    try:
        result = run_section(name, args.mode, args.reference_python, args.skip_reference)
        result = json.loads(json.dumps(result, default=_json_default))
        meta["exit_code"] = 0
    except Exception as exc:  # recorded, the other sections still run
        result = None
        meta["error"] = f"section {name} raised {type(exc).__name__}: {exc} | " + " | ".join(
            traceback.format_exc().strip().splitlines()[-4:])
    meta.update(wall_s=round(time.time() - start, 2), loadavg_before=load_before,
                loadavg_after=_loadavg())
    return {"result": result, "meta": meta}


# ------------------------------------------------------------- assembling
def _flatten_sections(results: Dict[str, Any], out: Dict[str, Any]) -> None:
    """Puts each section's rows at the top-level key the README documents
    (a list of records) and the rest under `<section>_details`."""
    for name in ("mla_vs_mha", "moe_scaling", "decode"):
        section = results.get(name)
        if section is None:
            continue
        out[name] = section.pop("rows")
        out[f"{name}_details"] = section
    if results.get("moe_scaling") is not None:
        out["moe_scaling_ratio"] = out["moe_scaling_details"].get("ratio_max_over_8_experts", {})
    for name in ("generate", "fp8_vs_bf16", "train_vs_reference"):
        if results.get(name) is not None:
            out[name] = results[name]


def targets_summary(out: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The targets of benchmarks/README.md, measured or not."""
    rows = []
    ratios = out.get("moe_scaling_ratio") or {}
    if ratios:
        worst_k, worst = max(ratios.items(), key=lambda kv: kv[1]["ratio"])
        base, hi = worst["experts"]
        rows.append({
            "target": f"MoE step: {hi} experts <= 1.25 x {base} experts (every top_k)",
            "measured": {k: round(v["ratio"], 3) for k, v in ratios.items()},
            "measured_min_times": {k: round(v.get("ratio_of_min_times", float("nan")), 3)
                                   for k, v in ratios.items()},
            "met": all(v["met"] for v in ratios.values()),
            "worst": f"top_k={worst_k}: {worst['ratio']:.3f}",
        })
    attn = out.get("mla_vs_mha") or []
    if attn:
        rows.append({
            "target": "MLA cache bytes == (kv_lora_rank + rope) x bytes x tokens",
            "measured": {str(r["seq_len"]): [r["mla_cache_bytes"], r["mla_bytes_analytic"]]
                         for r in attn},
            "met": all(r["mla_bytes_equal_analytic"] for r in attn),
        })
    decode = out.get("decode_details", {}).get("target")
    if decode:
        rows.append({
            "target": "absorbed decode >= 3 x naive tokens/s at 4096 context",
            "measured": {"context": decode["measured_context"],
                         "speedup": round(decode["measured"], 3),
                         "speedup_min_times": round(
                             (out.get("decode") or [{}])[-1].get("absorbed_speedup_of_min_times", 0), 3)},
            "met": decode["met"] if decode["measured_context"] >= 4096 else None,
            **({"note": "largest context measured < 4096 (run --full)"}
               if decode["measured_context"] < 4096 else {}),
        })
    gen = out.get("generate")
    if gen:
        rows.append({"target": f"compiled generate >= 4 x eager tokens/s "
                               f"(context {gen['context']}, batch {gen['batch']})",
                     "measured": round(gen["ours_over_eager"], 3),
                     "met": gen["target_over_eager"]["met"]})
        if "ours_over_reference" in gen:
            rows.append({"target": "compiled generate >= 1.5 x transformers generate tokens/s",
                         "measured": round(gen["ours_over_reference"], 3),
                         "measured_min_times": round(gen["ours_over_reference_of_min_times"], 3),
                         "met": gen["target_over_reference"]["met"]})
        else:
            rows.append({"target": "compiled generate >= 1.5 x transformers generate tokens/s",
                         "measured": None, "met": None,
                         "note": gen.get("reference_skipped", "reference not run")})
    train = out.get("train_vs_reference")
    if train:
        if "speedup" in train:
            rows.append({"target": "training tokens/s >= 1.25 x PyTorch reference",
                         "measured": round(train["speedup"], 3),
                         "measured_min_times": round(train.get("speedup_of_min_times", 0), 3),
                         "met": train["target"]["met"],
                         "judged_on": train["target"].get("judged_on", "medians")})
        else:
            rows.append({"target": "training tokens/s >= 1.25 x PyTorch reference",
                         "measured": None, "met": None,
                         "note": train.get("reference_skipped", "reference not run")})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="DeepSeek-V3 Keras benchmark suite")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                       help="tiny sizes, every code path (CI; < 1 minute)")
    group.add_argument("--quick", dest="mode", action="store_const", const="quick",
                       help="a few minutes on 2 CPU cores")
    group.add_argument("--full", dest="mode", action="store_const", const="full",
                       help="all sizes, more repeats (~10 minutes on 2 cores)")
    group.add_argument("--mode", dest="mode", choices=("smoke", "quick", "full"))
    parser.add_argument("--out", help="where to write the JSON result")
    parser.add_argument("--backend", choices=("jax", "tensorflow"),
                        default=os.environ.get("BENCH_BACKEND", "jax"),
                        help="Keras backend (default jax: compiles ~37x faster on CPU; see README)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for XLA/TF and torch (default: available cores)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--reference-python",
                        help="Python with torch + transformers for the reference "
                             "(else $DEEPSEEK_TFX_REFERENCE_PYTHON, else known venvs)")
    parser.add_argument("--skip-reference", metavar="REASON",
                        help="do not run the PyTorch reference; record REASON")
    parser.add_argument("--compare-backends", action="store_true", default=None,
                        help="also time our training step under JAX and TensorFlow (TF's XLA "
                             "compile alone takes ~8 minutes on 2 cores)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="run each section in its own process (default: on, off for --smoke)")
    parser.add_argument("--section-timeout", type=float, default=1800.0)
    # Internal: run one section in this process.
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--section-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.mode = args.mode or "quick"
    from .common import available_cores

    args.threads = args.threads or available_cores()
    if args.section:
        return _section_main(args)
    if not args.out:
        parser.error("--out FILE is required")
    if args.mode == "smoke" and not args.skip_reference and not args.reference_python:
        args.skip_reference = "smoke mode runs no PyTorch reference unless --reference-python is given"

    invoked = os.path.relpath(sys.executable) if sys.executable.startswith(ROOT) else sys.executable
    command = " ".join([invoked, "-m", "benchmarks.run_all"] + [shlex.quote(a) for a in
                                                                 (argv if argv is not None else sys.argv[1:])])
    from .configs import SIZES, attention_config, decode_config, fp8_config, moe_config, train_config

    sizes = SIZES[args.mode]
    started = time.time()
    out: Dict[str, Any] = {
        "command": command,
        "mode": args.mode,
        "backend": args.backend,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}")
    isolate = args.isolate if args.isolate is not None else args.mode != "smoke"
    out["isolated_sections"] = isolate
    results, meta = {}, {}
    for name in sections:
        print(f"[run_all] {name} ({args.mode}, {args.backend}) ...", file=sys.stderr, flush=True)
        if isolate:
            got = _spawn_section(name, args, args.backend, args.section_timeout)
        else:
            got = _inline_section(name, args)
        results[name], meta[name] = got["result"], got["meta"]
        status = meta[name].get("error") or f"{meta[name].get('wall_s')} s"
        print(f"[run_all] {name}: {status}", file=sys.stderr, flush=True)
    compare = args.compare_backends if args.compare_backends is not None else sizes.compare_backends
    if compare:
        comparison: Dict[str, Any] = {}
        # n_group=1 runs on both backends; the train config's n_group=4 aborts
        # TF's XLA (recorded as an error entry, see README finding 8).
        variants = [(f"train_step:{g}", backend) for g in (1, 4) for backend in ("jax", "tensorflow")]
        for name, backend in variants:
            print(f"[run_all] {name} under {backend} ...", file=sys.stderr, flush=True)
            got = _spawn_section(name, args, backend, args.section_timeout)
            key = f"{backend}_n_group_{name.split(':')[1]}"
            comparison[key] = (got["result"] if got["result"] is not None
                               else {"error": got["meta"].get("error")})
            meta[f"{name}@{backend}"] = got["meta"]
        jax_tps = (comparison.get("jax_n_group_1") or {}).get("tokens_per_s")
        tf_tps = (comparison.get("tensorflow_n_group_1") or {}).get("tokens_per_s")
        if jax_tps and tf_tps:
            comparison["faster"] = "jax" if jax_tps >= tf_tps else "tensorflow"
            comparison["jax_over_tensorflow"] = jax_tps / tf_tps
        out["backend_comparison"] = comparison

    # Machine and versions come from this process (same interpreter and
    # libraries as the sections).
    from . import common

    common.configure(args.backend, args.threads)
    out["machine"] = common.machine_info()
    out["versions"] = common.versions()
    out["threads"] = args.threads
    out["configs"] = {
        "sizes": dataclasses.asdict(sizes),
        "attention": attention_config(args.mode).to_dict(),
        "moe_layer_8_experts_top2": moe_config(8, 2, sizes.moe_hidden, sizes.moe_expert_dim).to_dict(),
        "decode": decode_config(args.mode).to_dict(),
        "fp8": fp8_config(args.mode).to_dict(),
        "train": train_config(args.mode).to_dict(),
    }
    _flatten_sections(results, out)
    out["targets"] = targets_summary(out)
    out["sections"] = meta
    loads = [m.get("loadavg_before", [0])[0] for m in meta.values() if m.get("loadavg_before")]
    if loads and max(loads) > 0.5 * args.threads:
        out["load_warning"] = (
            f"1-minute load average reached {max(loads)} on {args.threads} threads while sections "
            "ran: other processes shared the cores, so times are noisy and partly inflated "
            "(compare the min_ms columns, and rerun on an idle machine for clean numbers)")
    # A failed backend-comparison variant is recorded in backend_comparison
    # (TF + XLA aborts on the grouped router's gradient, see README) and does
    # not fail the run; a failed benchmark section does.
    errors = {name: m["error"] for name, m in meta.items()
              if m.get("error") and not name.startswith("train_step:")}
    if errors:
        out["errors"] = errors
    out["wall_s"] = round(time.time() - started, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=_json_default)
        f.write("\n")
    print(f"[run_all] wrote {args.out} in {out['wall_s']} s"
          + (f"; errors in {sorted(errors)}" if errors else ""), file=sys.stderr)
    for row in out["targets"]:
        print(f"[run_all] target: {row['target']}: measured {row['measured']} -> met={row['met']}",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
