"""Reads a run's ML Metadata store: executions, artifacts, the blessings
(TFMA's ModelBlessing and the integration checks' InfraBlessing), the TFMA
evaluations (metrics, the change against the baseline, failed thresholds)
and the lineage from the pushed model back to its examples."""

from __future__ import annotations

import json
from typing import Any, Dict, List


def open_store(metadata):
    """The run's ML Metadata store, read-only: `metadata` is an SQLite path
    or a pipeline.metadata_store.MetadataTarget (SQLite or MySQL)."""
    from pipeline.metadata_store import as_target

    return as_target(metadata).open(readonly=True)


def _value(v) -> Any:
    kind = v.WhichOneof("value")
    if kind == "struct_value":
        from google.protobuf import json_format
        return json_format.MessageToDict(v.struct_value)
    if kind == "proto_value":
        return str(v.proto_value.type_url)
    return getattr(v, kind) if kind else None


def properties(node) -> Dict[str, Any]:
    """An execution's or artifact's properties and custom properties, as plain values."""
    out = {k: _value(v) for k, v in node.properties.items()}
    out.update({k: _value(v) for k, v in node.custom_properties.items()})
    return out


EXECUTION_STATES = {0: "UNKNOWN", 1: "NEW", 2: "RUNNING", 3: "COMPLETE", 4: "FAILED", 5: "CACHED", 6: "CANCELED"}


def collect(metadata) -> Dict[str, Any]:
    """Everything in the store (an SQLite path or a MetadataTarget)."""
    from ml_metadata.proto import metadata_store_pb2

    from pipeline.metadata_store import as_target

    store = open_store(metadata)
    metadata_path = as_target(metadata).describe()
    artifact_types = {t.id: t.name for t in store.get_artifact_types()}
    execution_types = {t.id: t.name for t in store.get_execution_types()}
    context_types = {t.id: t.name for t in store.get_context_types()}
    contexts = store.get_contexts()
    runs = [{"id": c.id, "name": c.name, "type": context_types[c.type_id],
             "created": c.create_time_since_epoch} for c in contexts
            if context_types[c.type_id] == "pipeline_run"]
    executions = [{
        "id": e.id, "type": execution_types[e.type_id], "state": EXECUTION_STATES.get(e.last_known_state, "?"),
        "component": properties(e).get("component_id", execution_types[e.type_id].split(".")[-1]),
        "created": e.create_time_since_epoch,
    } for e in store.get_executions()]
    artifacts = [{
        "id": a.id, "type": artifact_types[a.type_id], "uri": a.uri,
        "state": metadata_store_pb2.Artifact.State.Name(a.state), "properties": properties(a),
    } for a in store.get_artifacts()]
    events = store.get_events_by_execution_ids([e["id"] for e in executions]) if executions else []
    edges = [{"execution_id": ev.execution_id, "artifact_id": ev.artifact_id,
              "kind": "input" if ev.type in (metadata_store_pb2.Event.INPUT,
                                             metadata_store_pb2.Event.DECLARED_INPUT) else "output"}
             for ev in events]
    evaluations = [dict(read_evaluation(a["uri"]), id=a["id"], uri=a["uri"])
                   for a in artifacts if a["type"] == "ModelEvaluation"]
    producer = {e["artifact_id"]: e["execution_id"] for e in edges if e["kind"] == "output"}
    blessings = [a for a in artifacts if a["type"] in ("ModelBlessing", "InfraBlessing")]
    for b in blessings:
        failures = b["properties"].get("failures")
        b["failures"] = json.loads(failures) if isinstance(failures, str) and failures else []
        if b["type"] == "ModelBlessing":  # TFMA's: its reasons are in the evaluation beside it
            sibling = next((ev for ev in evaluations
                            if producer.get(ev["id"]) == producer.get(b["id"])), None)
            b["failures"] = sibling["failures"] if sibling else []
    # A Pusher that was not allowed to push still writes a PushedModel (pushed = 0).
    pushed = [a for a in artifacts if a["type"] == "PushedModel" and a["properties"].get("pushed") == 1]
    return {"metadata_path": metadata_path, "runs": runs, "executions": executions,
            "artifacts": artifacts, "events": edges, "blessings": blessings,
            "evaluations": evaluations,
            "lineage": lineage(artifacts, executions, edges, pushed[-1]["id"]) if pushed else []}


def read_evaluation(uri: str) -> Dict[str, Any]:
    """The overall-slice TFMA metrics of a ModelEvaluation: {"metrics": the
    candidate's, "baseline": the baseline's, "change": candidate - baseline,
    "validated": bool or None, "failures": the thresholds that failed}."""
    from app import tfma_files

    out: Dict[str, Any] = {"metrics": {}, "baseline": {}, "change": {}, "validated": None, "failures": []}
    for record in tfma_files.load_metrics(uri):
        if record.slice_key.single_slice_keys:  # overall slice only
            continue
        for kv in record.metric_keys_and_values:
            if not kv.value.HasField("double_value"):
                continue
            value = kv.value.double_value.value
            table = ("change" if kv.key.is_diff else
                     "baseline" if kv.key.model_name == "baseline" else "metrics")
            out[table][kv.key.name] = value
    try:
        validation = tfma_files.load_validation_result(uri)
    except Exception:  # noqa: BLE001 - no validation file: no thresholds were configured
        return out
    out["validated"] = bool(validation.validation_ok)
    for per_slice in validation.metric_validations_per_slice:
        for failure in per_slice.failures:
            threshold = failure.metric_threshold
            if threshold.HasField("change_threshold"):
                limit = threshold.change_threshold.absolute.value
                what = f"change vs baseline {failure.metric_value.double_value.value:+.4f} > {limit:+.4f}"
            else:
                bound, value = threshold.value_threshold, failure.metric_value.double_value.value
                what = (f"{value:.4f} > upper bound {bound.upper_bound.value:.4f}"
                        if bound.HasField("upper_bound") and value > bound.upper_bound.value else
                        f"{value:.4f} < lower bound {bound.lower_bound.value:.4f}")
            out["failures"].append(f"tfma {failure.metric_key.name}: {what}")
    if validation.missing_thresholds:
        out["failures"].append(f"tfma: thresholds without a metric: {len(validation.missing_thresholds)}")
    return out


def lineage(artifacts: List[dict], executions: List[dict], edges: List[dict],
            artifact_id: int) -> List[dict]:
    """Walks producer executions back from an artifact: a list of
    {artifact, produced_by, inputs} steps, newest first."""
    by_id = {a["id"]: a for a in artifacts}
    ex_by_id = {e["id"]: e for e in executions}
    steps, frontier, seen = [], [artifact_id], set()
    while frontier:
        aid = frontier.pop(0)
        if aid in seen:
            continue
        seen.add(aid)
        producer = next((e["execution_id"] for e in edges
                         if e["artifact_id"] == aid and e["kind"] == "output"), None)
        inputs = [e["artifact_id"] for e in edges
                  if producer is not None and e["execution_id"] == producer and e["kind"] == "input"]
        art = by_id[aid]
        steps.append({"artifact_id": aid, "type": art["type"], "uri": art["uri"],
                      "produced_by": ex_by_id[producer]["component"] if producer else None,
                      "inputs": inputs})
        frontier.extend(inputs)
    return steps


def render(info: Dict[str, Any], print_fn=print) -> None:
    print_fn(f"ML Metadata: {info['metadata_path']}")
    print_fn(f"\nRuns ({len(info['runs'])}):")
    for r in info["runs"]:
        print_fn(f"  {r['name']}")
    print_fn(f"\nExecutions ({len(info['executions'])}):")
    for e in info["executions"]:
        print_fn(f"  #{e['id']:<4} {e['component']:<34} {e['state']}")
    print_fn("\nArtifacts:")
    for a in info["artifacts"]:
        shown = {k: v for k, v in a["properties"].items()
                 if k in ("split_names", "optimal_loss", "blessed", "eval_loss", "pushed",
                          "pushed_version", "num_train", "num_eval", "name", "producer_component",
                          # a run on text: the tokenizer and what the text ExampleGen read
                          "vocab_size", "source", "train_documents", "eval_documents",
                          "train_bytes", "eval_bytes", "train_tokens", "eval_tokens")}
        print_fn(f"  #{a['id']:<4} {a['type']:<26} {a['uri']}")
        if shown:
            print_fn(f"        {json.dumps(shown, default=str)}")
    print_fn("\nEvaluations (TFMA, overall slice):")
    for ev in info.get("evaluations", []):
        verdict = {True: "thresholds passed", False: "thresholds FAILED", None: "no thresholds"}[ev["validated"]]
        print_fn(f"  #{ev['id']} {verdict}")
        for name, value in sorted(ev["metrics"].items()):
            change = ev["change"].get(name)
            vs = (f"  baseline {ev['baseline'][name]:.4f}, change {change:+.4f}"
                  if change is not None and name in ev["baseline"] else "")
            print_fn(f"      {name:<20} {value:.4f}{vs}")
        for failure in ev["failures"]:
            print_fn(f"      - {failure}")
    print_fn("\nBlessings (Pusher pushes only when the model and infra blessings both say blessed):")
    for b in info["blessings"]:
        verdict = "blessed" if b["properties"].get("blessed") == 1 else "NOT blessed"
        print_fn(f"  #{b['id']} {b['type']:<13} {verdict} (model {b['properties'].get('current_model_id')})")
        for failure in b["failures"]:
            print_fn(f"      - {failure}")
    if info["lineage"]:
        print_fn("\nLineage of the latest pushed model:")
        for step in info["lineage"]:
            origin = f"<- {step['produced_by']}" if step["produced_by"] else "(imported)"
            print_fn(f"  {step['type']:<20} #{step['artifact_id']:<4} {origin}  inputs {step['inputs']}")
    else:
        print_fn("\nNo model has been pushed.")


def to_dot(info: Dict[str, Any]) -> str:
    """Graphviz source of the artifact/execution graph (`dot -Tpng`)."""
    lines = ["digraph lineage {", "  rankdir=LR;"]
    for e in info["executions"]:
        lines.append(f'  e{e["id"]} [shape=box,label="{e["component"]}\\n{e["state"]}"];')
    for a in info["artifacts"]:
        lines.append(f'  a{a["id"]} [shape=ellipse,label="{a["type"]} #{a["id"]}"];')
    for ev in info["events"]:
        if ev["kind"] == "input":
            lines.append(f'  a{ev["artifact_id"]} -> e{ev["execution_id"]};')
        else:
            lines.append(f'  e{ev["execution_id"]} -> a{ev["artifact_id"]};')
    lines.append("}")
    return "\n".join(lines) + "\n"
