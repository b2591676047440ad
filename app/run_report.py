"""What one pipeline run did, read from ML Metadata by its pipeline-run id
(not the newest record in the store, which may belong to an earlier run):
each component's state, the blessings it produced, whether it pushed; and,
for a failed run, a short account of the failure."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Dict, List, Optional

from app.inspect_metadata import EXECUTION_STATES, open_store, properties


@dataclasses.dataclass
class Blessing:
    component: str
    type: str
    blessed: bool
    failures: List[str]


@dataclasses.dataclass
class RunOutcome:
    run_id: str
    states: Dict[str, str]  # component -> COMPLETE / CACHED / FAILED / ...
    blessings: List[Blessing]
    pushed: Optional[Dict[str, Any]]  # the PushedModel's properties, when pushed

    @property
    def failed(self) -> List[str]:
        return [c for c, s in self.states.items() if s == "FAILED"]


def run_outcome(metadata, run_id: str) -> RunOutcome:
    """The record of the run `run_id` (the `pipeline_run` context's name) in
    `metadata` (an SQLite path or a pipeline.metadata_store.MetadataTarget)."""
    from ml_metadata.proto import metadata_store_pb2

    from pipeline.metadata_store import as_target

    store = open_store(metadata)
    context = store.get_context_by_type_and_name("pipeline_run", run_id)
    if context is None:
        raise LookupError(f"no pipeline run {run_id!r} in {as_target(metadata).describe()}")
    executions = store.get_executions_by_context(context.id)
    types = {t.id: t.name for t in store.get_execution_types()}
    component = {e.id: properties(e).get("component_id", types[e.type_id].split(".")[-1]) for e in executions}
    states = {component[e.id]: EXECUTION_STATES.get(e.last_known_state, "?") for e in executions}
    outputs: Dict[int, int] = {}  # artifact id -> producing execution id
    for ev in store.get_events_by_execution_ids(list(component)):
        if ev.type in (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT):
            outputs[ev.artifact_id] = ev.execution_id
    artifact_types = {t.id: t.name for t in store.get_artifact_types()}
    blessings, pushed, evaluations = [], None, {}
    artifacts = store.get_artifacts_by_id(list(outputs))
    for artifact in artifacts:
        if artifact_types[artifact.type_id] == "ModelEvaluation":
            evaluations[outputs[artifact.id]] = artifact.uri
    for artifact in artifacts:
        kind, props = artifact_types[artifact.type_id], properties(artifact)
        if kind.endswith("Blessing"):
            failures = props.get("failures")
            failures = json.loads(failures) if isinstance(failures, str) and failures else []
            producer = outputs[artifact.id]
            if not failures and props.get("blessed") != 1 and producer in evaluations:
                # The Evaluator's blessing carries no reasons: TFMA's validation result does.
                from app.inspect_metadata import read_evaluation

                failures = read_evaluation(evaluations[producer])["failures"]
            blessings.append(Blessing(component[producer], kind, props.get("blessed") == 1, failures))
        elif kind == "PushedModel" and props.get("pushed") == 1:
            pushed = props
    return RunOutcome(run_id, states, blessings, pushed)


# --------------------------------------------------------------------------- failures
_TFRECORD_SIGNS = ("TFRecord", "corrupted record", "DataLossError", "truncated record")


def looks_like_bad_tfrecord(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return any(sign in text for sign in _TFRECORD_SIGNS)


def find_corrupt_tfrecord(paths: List[str]) -> Optional[str]:
    """The first file in `paths` that is not a readable TFRecord file, as
    "<path>: <reason>"; None when all read. Beam's reader names no file."""
    import tensorflow as tf

    for path in paths:
        compression = "GZIP" if path.endswith(".gz") else ""
        count = 0
        try:
            for _ in tf.data.TFRecordDataset(path, compression_type=compression):
                count += 1
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            reason = e.message.split("}}")[-1].split("[Op:")[0].strip()
            return f"{path}: {reason} (after {count} good records)"
    return None


def tfrecord_candidates(examples_dir: Optional[str], pipeline_root: str) -> List[str]:
    """The user's TFRecords, else the Examples this pipeline wrote."""
    if examples_dir:
        patterns = [os.path.join(examples_dir, split, "*") for split in ("train", "eval")]
    else:
        patterns = [os.path.join(pipeline_root, "*ExampleGen", "examples", "*", "Split-*", "*")]
    return sorted(p for pattern in patterns for p in glob.glob(pattern) if os.path.isfile(p))


def failure_lines(error: BaseException, max_lines: int = 12, width: int = 300) -> List[str]:
    """The error's message, cut to a few readable lines."""
    lines = [line[:width] + (" ..." if len(line) > width else "")
             for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        lines = [type(error).__name__]
    elif not lines[0].startswith(type(error).__name__):
        lines[0] = f"{type(error).__name__}: {lines[0]}"
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines in the log)"]
    return lines
