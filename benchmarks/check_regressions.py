"""Compares two benchmark result files and fails on regressions.

    python -m benchmarks.check_regressions OLD.json NEW.json [--tolerance 0.15]

Metrics are recognised by their key names, wherever they sit in the file:
  times        keys ending in `_ms` (the medians; min/max/first-call samples
               are not compared): new/old > 1 + tolerance is a regression;
  throughputs  keys ending in `tokens_per_s`: new/old < 1 / (1 + tolerance);
  bytes        keys ending in `_bytes`: must be equal.
List entries are matched by their identity fields (seq_len, num_experts and
top_k, context, ...), not by position, so adding or removing a size does not
misalign the comparison. Metrics present in only one file are listed as
missing/new and do not fail the check unless --fail-on-missing is given.
Exit status: 0 no regression, 1 regression (or missing with
--fail-on-missing), 2 unreadable input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

IDENTITY_KEYS = ("seq_len", "num_experts", "top_k", "context", "batch", "name")
# Subtrees that describe the run rather than measure it.
SKIP_KEYS = {"machine", "versions", "configs", "config", "command", "sections", "targets",
             "started_at", "hf_config", "loss", "losses", "errors", "reference_search"}
# Timing fields that are samples or diagnostics, not the compared statistic.
# The medians inside timing dicts repeat the `<name>_ms` next to them.
SKIP_TIME_KEYS = {"min_ms", "max_ms", "first_call_ms", "median_ms", "process_wall_s", "wall_s"}


def classify(key: str) -> Optional[str]:
    if key in SKIP_TIME_KEYS:
        return None
    if key.endswith("tokens_per_s"):
        return "throughput"
    if key.endswith("_ms"):
        return "time"
    if key.endswith("_bytes") or key == "bytes":
        return "bytes"
    return None


def _label(item: Dict[str, Any], index: int) -> str:
    parts = [f"{k}={item[k]}" for k in IDENTITY_KEYS if k in item and not isinstance(item[k], (dict, list))]
    return "[" + ",".join(parts) + "]" if parts else f"[{index}]"


def metrics(tree: Any, path: str = "") -> Iterator[Tuple[str, str, float]]:
    """Yields (path, kind, value) for every recognised metric."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in SKIP_KEYS or key == "timing" or key.endswith("_timing"):
                continue
            sub = f"{path}.{key}" if path else key
            kind = classify(key)
            if kind and isinstance(value, (int, float)) and not isinstance(value, bool):
                yield sub, kind, float(value)
            elif isinstance(value, (dict, list)):
                yield from metrics(value, sub)
    elif isinstance(tree, list):
        for i, item in enumerate(tree):
            if isinstance(item, (dict, list)):
                label = _label(item, i) if isinstance(item, dict) else f"[{i}]"
                yield from metrics(item, path + label)


def compare(old: Dict[str, Any], new: Dict[str, Any], tolerance: float) -> Dict[str, Any]:
    old_m = {p: (k, v) for p, k, v in metrics(old)}
    new_m = {p: (k, v) for p, k, v in metrics(new)}
    rows: List[Dict[str, Any]] = []
    for path in sorted(set(old_m) | set(new_m)):
        if path not in new_m:
            rows.append({"path": path, "kind": old_m[path][0], "old": old_m[path][1], "new": None,
                         "ratio": None, "status": "missing"})
            continue
        if path not in old_m:
            rows.append({"path": path, "kind": new_m[path][0], "old": None, "new": new_m[path][1],
                         "ratio": None, "status": "new"})
            continue
        kind, o = old_m[path]
        n = new_m[path][1]
        ratio = n / o if o else (math.inf if n else 1.0)
        if "reference" in path and kind != "bytes":
            # The PyTorch reference is not our code: a change there says the
            # machine (or torch) changed. Shown, never a failure.
            changed = ratio > 1 + tolerance or ratio < 1 / (1 + tolerance)
            rows.append({"path": path, "kind": kind, "old": o, "new": n, "ratio": ratio,
                         "status": "reference changed" if changed else "ok"})
            continue
        if kind == "time":
            bad = ratio > 1 + tolerance
            good = ratio < 1 / (1 + tolerance)
        elif kind == "throughput":
            bad = ratio < 1 / (1 + tolerance)
            good = ratio > 1 + tolerance
        else:  # bytes: any change is a regression (the layout changed)
            bad, good = n != o, False
        status = "REGRESSION" if bad else ("improved" if good else "ok")
        rows.append({"path": path, "kind": kind, "old": o, "new": n, "ratio": ratio, "status": status})
    warnings = []
    for key in ("mode", "backend"):
        if old.get(key) != new.get(key):
            warnings.append(f"{key} differs: {old.get(key)!r} vs {new.get(key)!r}")
    om, nm = old.get("machine") or {}, new.get("machine") or {}
    for key in ("cpu_model", "cores"):
        if om.get(key) != nm.get(key):
            warnings.append(f"machine {key} differs: {om.get(key)!r} vs {nm.get(key)!r}")
    return {"rows": rows, "warnings": warnings,
            "regressions": sum(r["status"] == "REGRESSION" for r in rows),
            "missing": sum(r["status"] == "missing" for r in rows)}


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e5 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.4g}"


def render(report: Dict[str, Any], show_all: bool) -> str:
    rows = report["rows"] if show_all else [r for r in report["rows"] if r["status"] != "ok"]
    width = max([len(r["path"]) for r in rows] + [6])
    lines = [f"{'metric':<{width}}  {'kind':<10}  {'old':>12}  {'new':>12}  {'new/old':>8}  status"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"{r['path']:<{width}}  {r['kind']:<10}  {_fmt(r['old']):>12}  "
                     f"{_fmt(r['new']):>12}  {ratio:>8}  {r['status']}")
    counts = {}
    for r in report["rows"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines.append("summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    lines.extend(f"warning: {w}" for w in report["warnings"])
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compare two benchmark result files.")
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="allowed relative slowdown (default 0.15 = 15%%)")
    parser.add_argument("--all", action="store_true", help="list unchanged metrics too")
    parser.add_argument("--fail-on-missing", action="store_true",
                        help="exit 1 when a metric of OLD is absent from NEW")
    parser.add_argument("--json", help="also write the comparison as JSON here")
    args = parser.parse_args(argv)
    docs = []
    for path in (args.old, args.new):
        try:
            with open(path) as f:
                docs.append(json.load(f))
        except (OSError, ValueError) as exc:
            print(f"check_regressions: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(docs[-1], dict):
            print(f"check_regressions: {path} is not a JSON object", file=sys.stderr)
            return 2
    report = compare(docs[0], docs[1], args.tolerance)
    print(render(report, args.all))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if report["regressions"]:
        print(f"FAIL: {report['regressions']} regression(s) beyond tolerance {args.tolerance}")
        return 1
    if args.fail_on_missing and report["missing"]:
        print(f"FAIL: {report['missing']} metric(s) missing from {args.new}")
        return 1
    print("OK: no regression")
    return 0


if __name__ == "__main__":
    sys.exit(main())
