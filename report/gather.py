"""What the run report shows, gathered for one pipeline run from ML Metadata
(`app.inspect_metadata`, `app.run_report`) and the artifacts it
points to: the components with their state, wall time and the artifacts
between them; the Trainer's interval records and summary; TFMA's metrics,
baseline and thresholds; the integration checks; the verdict; the lineage."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional


class ReportError(ValueError):
    """The run cannot be reported (no store, no such run); one line."""


def _read_json(path: str) -> Optional[Any]:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def _failure_message(props: Dict[str, Any]) -> List[str]:
    """The exception at the end of TFX's stored execution result (a traceback)."""
    raw = props.get("__execution_result__")
    if not isinstance(raw, str):
        return []
    try:
        message = json.loads(raw).get("resultMessage", "")
    except ValueError:
        return []
    lines = [line for line in message.strip().splitlines() if line.strip()]
    # The last line that starts a "Type: message" block (not indented).
    start = max((i for i, line in enumerate(lines) if not line.startswith((" ", "\t"))
                 and ":" in line and not line.startswith("Traceback")), default=len(lines) - 1)
    return lines[start:][:12]


def latest_run_id(metadata_path: str) -> str:
    from app.inspect_metadata import collect

    runs = collect(metadata_path)["runs"]
    if not runs:
        raise ReportError(f"no pipeline run recorded in {metadata_path}")
    return max(runs, key=lambda r: (r["created"], r["id"]))["name"]


def _topological(nodes: List[dict], edges: List[dict]) -> List[dict]:
    order, placed = [], set()
    pending = sorted(nodes, key=lambda n: (n["created"], n["id"]))
    while pending:
        ready = next((n for n in pending
                      if all(e["from"] in placed for e in edges if e["to"] == n["component"])), pending[0])
        order.append(ready)
        placed.add(ready["component"])
        pending.remove(ready)
    return order


def gather(metadata_path: str, run_id: Optional[str] = None) -> Dict[str, Any]:
    from ml_metadata.proto import metadata_store_pb2

    from app.inspect_metadata import EXECUTION_STATES, collect, lineage, open_store, properties, read_evaluation
    from app.run_report import run_outcome

    if not os.path.exists(metadata_path):
        raise ReportError(f"no ML Metadata store at {metadata_path} (has the pipeline run?)")
    run_id = run_id or latest_run_id(metadata_path)
    try:
        outcome = run_outcome(metadata_path, run_id)
    except LookupError as e:
        raise ReportError(str(e)) from None
    store = open_store(metadata_path)
    context = store.get_context_by_type_and_name("pipeline_run", run_id)
    info = collect(metadata_path)
    by_artifact = {a["id"]: a for a in info["artifacts"]}
    producer = {e["artifact_id"]: e["execution_id"] for e in info["events"] if e["kind"] == "output"}
    types = {t.id: t.name for t in store.get_execution_types()}
    nodes = []
    for e in store.get_executions_by_context(context.id):
        props = properties(e)
        state = EXECUTION_STATES.get(e.last_known_state, "?")
        nodes.append({"id": e.id, "component": props.get("component_id", types[e.type_id].split(".")[-1]),
                      "state": state, "created": e.create_time_since_epoch,
                      "seconds": max(e.last_update_time_since_epoch - e.create_time_since_epoch, 0) / 1000.0,
                      "failure": _failure_message(props) if state == "FAILED" else []})
    component_of = {n["id"]: n["component"] for n in nodes}
    run_events = store.get_events_by_execution_ids(list(component_of)) if nodes else []
    inputs: Dict[str, List[int]] = {}
    outputs: Dict[str, List[int]] = {}
    edges = []
    for ev in run_events:
        name = component_of[ev.execution_id]
        if ev.type in (metadata_store_pb2.Event.INPUT, metadata_store_pb2.Event.DECLARED_INPUT):
            inputs.setdefault(name, []).append(ev.artifact_id)
            source = component_of.get(producer.get(ev.artifact_id))
            if source and source != name:
                edges.append({"from": source, "to": name, "artifact": by_artifact[ev.artifact_id]["type"]})
        else:
            outputs.setdefault(name, []).append(ev.artifact_id)
    edges = [dict(t) for t in {tuple(sorted(e.items())) for e in edges}]

    def output(component: str, type_name: str) -> Optional[dict]:
        found = [by_artifact[a] for a in outputs.get(component, []) if by_artifact[a]["type"] == type_name]
        return found[-1] if found else None

    def output_of_type(type_suffix: str) -> Optional[dict]:
        for component in outputs:
            for a in outputs[component]:
                if by_artifact[a]["type"].endswith(type_suffix):
                    return by_artifact[a]
        return None

    # Training: the Trainer's ModelRun (interval records) and Model (summary).
    from components.tensorboard_events import read_metrics

    model = output("Trainer", "Model")
    model_run = output("Trainer", "ModelRun")
    summary = _read_json(os.path.join(model["uri"], "training_summary.json")) if model else None
    records = read_metrics(model_run["uri"]) if model_run else []
    if not records and summary:  # a run from before the metrics file: the summary's curve
        records = summary.get("loss_history", [])

    evaluation = None
    ev_artifact = output_of_type("ModelEvaluation")
    if ev_artifact is not None:
        evaluation = dict(read_evaluation(ev_artifact["uri"]), uri=ev_artifact["uri"],
                          thresholds=_tfma_thresholds(ev_artifact["uri"]))
    checks = None
    report_artifact = output_of_type("ValidationReport")
    if report_artifact is not None:
        checks = _read_json(os.path.join(report_artifact["uri"], "report.json"))
    examples = next((by_artifact[a] for c in outputs for a in outputs[c]
                     if by_artifact[a]["type"] == "Examples"), None)

    pushed_artifact = next((by_artifact[a] for c in outputs for a in outputs[c]
                            if by_artifact[a]["type"] == "PushedModel"
                            and by_artifact[a]["properties"].get("pushed") == 1), None)
    target = pushed_artifact or model
    steps = (lineage(info["artifacts"], info["executions"], info["events"], target["id"])
             if target else [])
    failed = [n for n in nodes if n["state"] == "FAILED"]
    verdict = ("FAILED" if failed or (not outcome.pushed and not outcome.blessings)
               else "PUSHED" if outcome.pushed else "NOT PUSHED")
    return {
        "run_id": run_id, "metadata_path": metadata_path, "created": context.create_time_since_epoch,
        "components": _topological(nodes, edges), "edges": sorted(edges, key=lambda e: (e["from"], e["to"])),
        "outcome": outcome, "verdict": verdict, "pushed": outcome.pushed,
        "failed": [{"component": n["component"], "lines": n["failure"]} for n in failed],
        "summary": summary, "records": records,
        "model_run_uri": model_run["uri"] if model_run else None,
        "optimal_loss": (examples or {}).get("properties", {}).get("optimal_loss"),
        "evaluation": evaluation, "checks": checks, "lineage": steps,
    }


def _tfma_thresholds(uri: str) -> Dict[str, Dict[str, float]]:
    """{metric: {"upper_bound"|"lower_bound"|"change_upper"|"change_lower": value}}
    from the eval config TFMA wrote beside its results."""
    import tensorflow_model_analysis as tfma

    try:
        config = tfma.load_eval_result(uri).config
    except Exception:  # noqa: BLE001 - no readable config: no thresholds to show
        return {}
    out: Dict[str, Dict[str, float]] = {}
    for spec in config.metrics_specs:
        for metric in spec.metrics:
            if not metric.HasField("threshold"):
                continue
            # TFMA names a metric class TokenLoss's results token_loss.
            name = re.sub(r"(?<!^)(?=[A-Z])", "_", metric.class_name).lower()
            t, bounds = metric.threshold, out.setdefault(name, {})
            if t.HasField("value_threshold"):
                if t.value_threshold.HasField("upper_bound"):
                    bounds["upper_bound"] = t.value_threshold.upper_bound.value
                if t.value_threshold.HasField("lower_bound"):
                    bounds["lower_bound"] = t.value_threshold.lower_bound.value
            if t.HasField("change_threshold"):
                bounds["change_limit"] = t.change_threshold.absolute.value
                bounds["change_direction"] = t.change_threshold.direction
    return out
