"""Test support, not shipped: runs a compiled KFP v2 pipeline spec on this
machine, doing what a KFP backend does, so the compiled artifact itself is
tested without a cluster (tests/e2e/test_kubeflow_local.py).

For every task of ``root.dag``, in topological order:

* **container** executors (every TFX component): the backend's work is
  resolving the task's inputs (constant and pipeline parameters, upstream
  output artifacts with their URIs and metadata), choosing output URIs under
  the pipeline root (``<root>/<pipeline>/<run id>/<task>/<output key>``),
  building the ``ExecutorInput`` and substituting it for ``{{$}}`` (and the
  other ``{{$.…}}`` placeholders) in the container's command and args. The
  command then runs here as a new process, with this interpreter standing in
  for the image's ``python`` and the task directory as its working
  directory, so nothing is imported from the caller's directory. A
  ``python -m`` command is forked from tests/support/kfp_fork_server.py,
  which has imported the spec's entrypoints and executor classes once
  (~10 s a task otherwise, before any work); ``fork_server=False`` starts
  every command as a fresh interpreter instead. Afterwards
  the ``ExecutorOutput`` file the entrypoint wrote gives the output
  artifacts' final URIs and metadata (custom properties). A lifecycle
  ``preCacheCheck`` hook (TFX's FileBasedExampleGen driver) runs first,
  as on Vertex AI.
* **resolver** executors (the latest-blessed-model resolver): evaluated here
  in Python as the backend evaluates them: each ``outputArtifactQueries``
  filter (``schema_title="…" AND state=LIVE AND metadata.k.number_value=v
  AND name="{{$.inputs.artifacts['input'].metadata['k']}}"``) over the LIVE
  artifacts of this pipeline's context in ML Metadata; the newest match, or
  nothing (a first run).
* **importer** executors: register (or, without ``reimport``, reuse) an
  artifact at the given URI.

Everything is recorded in ML Metadata (SQLite, ``metadata_path``, default
``<root>/metadata.sqlite``) the way KFP lays it out: a ``system.Pipeline``
context (shared by all runs: what resolvers query) and a
``system.PipelineRun`` context per run, one execution per task, artifacts
typed by their KFP schema title (``tfx.Model``, ``components.ValidationReport``)
with the executor's metadata as custom properties, and INPUT/OUTPUT events.

Not modelled: caching (every task executes), trigger conditions, iterators,
sub-DAGs, and the resource requests (logged, not enforced).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

PIPELINE_CONTEXT_TYPE = "system.Pipeline"
RUN_CONTEXT_TYPE = "system.PipelineRun"
EXECUTION_TYPES = {"container": "system.ContainerExecution", "importer": "system.ImporterExecution",
                   "resolver": "system.ResolverExecution"}
EXECUTOR_OUTPUT_FILE = "executor_output.json"
LOG_FILE = "executor.log"


class LocalExecutionError(RuntimeError):
    """A task failed (or the spec uses something not modelled here).
    ``.result`` holds the run so far when a task failed."""

    def __init__(self, message: str, result: Optional["LocalRunResult"] = None):
        super().__init__(message)
        self.result = result


@dataclasses.dataclass
class ArtifactRecord:
    name: str
    schema_title: str
    uri: str
    metadata: Dict[str, Any]
    mlmd_id: Optional[int] = None

    def runtime_artifact(self, type_schema: Dict[str, Any]) -> Dict[str, Any]:
        return {"name": self.name, "type": type_schema, "uri": self.uri, "metadata": self.metadata}


@dataclasses.dataclass
class TaskRun:
    name: str
    kind: str  # container | resolver | importer
    state: str = "pending"  # pending | succeeded | failed | not run
    outputs: Dict[str, List[ArtifactRecord]] = dataclasses.field(default_factory=dict)
    output_parameters: Dict[str, Any] = dataclasses.field(default_factory=dict)
    task_dir: Optional[str] = None
    log_path: Optional[str] = None
    seconds: float = 0.0
    command: Optional[List[str]] = None  # resolved, with {{$}} shortened


@dataclasses.dataclass
class LocalRunResult:
    pipeline_name: str
    run_id: str
    pipeline_root: str
    metadata_path: str
    order: List[str]
    tasks: Dict[str, TaskRun]

    @property
    def succeeded(self) -> bool:
        return all(t.state == "succeeded" for t in self.tasks.values())

    def artifact(self, task: str, key: str) -> Optional[ArtifactRecord]:
        """The single output `key` of `task` (None if it produced none)."""
        records = self.tasks[task].outputs.get(key, [])
        return records[0] if records else None


# --------------------------------------------------------------------------- spec helpers
def load_spec(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(pipelineSpec dict, runtimeConfig dict) of a compiled file; the spec
    is validated by parsing it as KFP's PipelineSpec proto."""
    from kubeflow.compile import load_pipeline_job, pipeline_spec_proto

    job = load_pipeline_job(path)
    pipeline_spec_proto(job)
    return job["pipelineSpec"], job.get("runtimeConfig", {})


def task_dependencies(task: Dict[str, Any]) -> List[str]:
    deps = set(task.get("dependentTasks", []))
    inputs = task.get("inputs", {})
    for spec in inputs.get("artifacts", {}).values():
        if "taskOutputArtifact" in spec:
            deps.add(spec["taskOutputArtifact"]["producerTask"])
    for spec in inputs.get("parameters", {}).values():
        if "taskOutputParameter" in spec:
            deps.add(spec["taskOutputParameter"]["producerTask"])
    return sorted(deps)


def topological_order(tasks: Dict[str, Dict[str, Any]]) -> List[str]:
    """Task names in dependency order (ties by name, so runs are repeatable)."""
    deps = {name: set(task_dependencies(task)) for name, task in tasks.items()}
    unknown = {d for ds in deps.values() for d in ds} - set(tasks)
    if unknown:
        raise LocalExecutionError(f"tasks depend on unknown tasks {sorted(unknown)}")
    order: List[str] = []
    ready = sorted(n for n, d in deps.items() if not d)
    while ready:
        name = ready.pop(0)
        order.append(name)
        for other, d in deps.items():
            if name in d:
                d.discard(name)
                if not d and other not in order and other not in ready:
                    ready.append(other)
        ready.sort()
    if len(order) != len(tasks):
        raise LocalExecutionError(f"dependency cycle among {sorted(set(tasks) - set(order))}")
    return order


def schema_title(type_schema: Dict[str, Any]) -> str:
    if "schemaTitle" in type_schema:
        return type_schema["schemaTitle"]
    import yaml

    return (yaml.safe_load(type_schema.get("instanceSchema", "")) or {}).get("title", "system.Artifact")


def _legacy_value(value: Dict[str, Any]) -> Any:
    """A schema-2.0 `Value` ({intValue|doubleValue|stringValue}) as Python."""
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    return value.get("stringValue", "")


# --------------------------------------------------------------------------- ML Metadata
class _Metadata:
    """The KFP-shaped ML Metadata record of local runs."""

    def __init__(self, path: str, pipeline_name: str, run_id: str):
        from ml_metadata.metadata_store import metadata_store
        from ml_metadata.proto import metadata_store_pb2 as mlmd

        self.mlmd = mlmd
        config = mlmd.ConnectionConfig()
        config.sqlite.filename_uri = path
        config.sqlite.connection_mode = mlmd.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
        self.store = metadata_store.MetadataStore(config)
        self.pipeline_context = self._context(PIPELINE_CONTEXT_TYPE, pipeline_name)
        self.run_context = self._context(RUN_CONTEXT_TYPE, run_id)
        self._types: Dict[str, int] = {}

    def _context(self, type_name: str, name: str):
        type_id = self.store.put_context_type(self.mlmd.ContextType(name=type_name))
        existing = self.store.get_context_by_type_and_name(type_name, name)
        if existing is not None:
            return existing
        context = self.mlmd.Context(type_id=type_id, name=name)
        context.id = self.store.put_contexts([context])[0]
        return context

    def _artifact_type(self, title: str) -> int:
        if title not in self._types:
            self._types[title] = self.store.put_artifact_type(self.mlmd.ArtifactType(name=title))
        return self._types[title]

    # value conversions: KFP keeps an artifact's metadata as custom properties
    def _to_mlmd(self, value: Any):
        from google.protobuf import struct_pb2

        v = self.mlmd.Value()
        if isinstance(value, bool):
            v.bool_value = value
        elif isinstance(value, (int, float)):
            v.double_value = float(value)
        elif isinstance(value, str):
            v.string_value = value
        else:
            struct = struct_pb2.Struct()
            struct.update({"value": value})
            v.struct_value.CopyFrom(struct)
        return v

    @staticmethod
    def _from_mlmd(value) -> Any:
        from google.protobuf import json_format

        kind = value.WhichOneof("value")
        if kind == "struct_value":
            return json_format.MessageToDict(value.struct_value).get("value")
        return getattr(value, kind) if kind else None

    def record(self, artifact) -> ArtifactRecord:
        title = self.store.get_artifact_types_by_id([artifact.type_id])[0].name
        metadata = {k: self._from_mlmd(v) for k, v in artifact.custom_properties.items()}
        return ArtifactRecord(artifact.name, title, artifact.uri, metadata, artifact.id)

    def new_artifact(self, record: ArtifactRecord, state: str):
        artifact = self.mlmd.Artifact(type_id=self._artifact_type(record.schema_title),
                                      name=record.name, uri=record.uri,
                                      state=self.mlmd.Artifact.State.Value(state))
        for k, v in record.metadata.items():
            artifact.custom_properties[k].CopyFrom(self._to_mlmd(v))
        return artifact

    def start(self, task: str, kind: str, inputs: Dict[str, List[ArtifactRecord]],
              outputs: Dict[str, List[ArtifactRecord]], properties: Dict[str, str]):
        """Registers a RUNNING execution with its inputs and PENDING outputs."""
        type_id = self.store.put_execution_type(self.mlmd.ExecutionType(name=EXECUTION_TYPES[kind]))
        execution = self.mlmd.Execution(type_id=type_id, name=f"{self.run_context.name}/{task}",
                                        last_known_state=self.mlmd.Execution.RUNNING)
        execution.custom_properties["task_name"].string_value = task
        for k, v in properties.items():
            execution.custom_properties[k].string_value = v
        pairs = []
        for direction, records, state in (("INPUT", inputs, None), ("OUTPUT", outputs, "PENDING")):
            for key, items in records.items():
                for index, record in enumerate(items):
                    if record.mlmd_id is not None:
                        artifact = self.store.get_artifacts_by_id([record.mlmd_id])[0]
                    else:
                        artifact = self.new_artifact(record, state or "LIVE")
                    event = self.mlmd.Event(type=self.mlmd.Event.Type.Value(direction))
                    event.path.steps.add().key = key
                    event.path.steps.add().index = index
                    pairs.append((artifact, event))
        execution_id, artifact_ids, _ = self.store.put_execution(
            execution, pairs, [self.pipeline_context, self.run_context], reuse_context_if_already_exist=True)
        i = 0
        for _, records in (("INPUT", inputs), ("OUTPUT", outputs)):
            for items in records.values():
                for record in items:
                    record.mlmd_id = artifact_ids[i]
                    i += 1
        return execution_id

    def finish(self, execution_id: int, state: str, outputs: Dict[str, List[ArtifactRecord]],
               produced: bool) -> None:
        """Final state; outputs LIVE (with their final uri/metadata) or ABANDONED."""
        execution = self.store.get_executions_by_id([execution_id])[0]
        execution.last_known_state = self.mlmd.Execution.State.Value(state)
        self.store.put_executions([execution])
        if not produced:
            return
        artifacts = []
        for items in outputs.values():
            for record in items:
                artifact = self.new_artifact(record, "LIVE" if state == "COMPLETE" else "ABANDONED")
                artifact.id = record.mlmd_id
                artifacts.append(artifact)
        if artifacts:
            self.store.put_artifacts(artifacts)

    def query(self, filter_text: str) -> List[ArtifactRecord]:
        """Artifacts of this pipeline's context matching a KFP resolver filter,
        newest first. Supports what KubeflowV2DagRunner emits: schema_title,
        state, name and metadata.<key>.(number|string|bool)_value terms joined
        by AND."""
        conditions = []
        for term in re.split(r"\s+AND\s+", filter_text.strip()):
            match = re.fullmatch(r'(schema_title|name|state|metadata\.([\w.-]+)\.(number|string|bool)_value)'
                                 r'\s*=\s*("(?:[^"\\]|\\.)*"|[\w.+-]+)', term.strip())
            if not match:
                raise LocalExecutionError(f"resolver filter term not supported locally: {term!r}")
            raw = match.group(4)
            value = json.loads(raw) if raw.startswith('"') else raw
            conditions.append((match.group(1).split(".")[0], match.group(2), match.group(3), value))
        found = []
        for artifact in self.store.get_artifacts_by_context(self.pipeline_context.id):
            record = self.record(artifact)
            ok = True
            for field, key, kind, value in conditions:
                if field == "schema_title":
                    ok = record.schema_title == value
                elif field == "name":
                    ok = artifact.name == value
                elif field == "state":
                    ok = self.mlmd.Artifact.State.Name(artifact.state) == value
                else:
                    have = record.metadata.get(key)
                    if kind == "number":
                        try:
                            ok = have is not None and not isinstance(have, bool) and float(have) == float(value)
                        except (TypeError, ValueError):
                            ok = False
                    elif kind == "bool":
                        ok = isinstance(have, bool) and have == (str(value).lower() == "true")
                    else:
                        ok = have == value
                if not ok:
                    break
            if ok:
                found.append((artifact.create_time_since_epoch, artifact.id, record))
        return [r for _, _, r in sorted(found, key=lambda x: (x[0], x[1]), reverse=True)]


# --------------------------------------------------------------------------- placeholders
_PLACEHOLDER = re.compile(r"\{\{\$(.*?)\}\}")


def _resolve_placeholders(text: str, executor_input: Dict[str, Any], executor_input_json: str,
                          context: Dict[str, str]) -> str:
    def one(match: "re.Match") -> str:
        expr = match.group(1)
        if expr == "":
            return executor_input_json
        m = re.fullmatch(r"\.inputs\.parameters\['([^']+)'\]", expr)
        if m:
            inputs = executor_input["inputs"]
            if m.group(1) in inputs.get("parameterValues", {}):
                value = inputs["parameterValues"][m.group(1)]
            else:
                value = _legacy_value(inputs.get("parameters", {}).get(m.group(1), {}))
            return value if isinstance(value, str) else json.dumps(value)
        m = re.fullmatch(r"\.(inputs|outputs)\.artifacts\['([^']+)'\]\.(uri|path)", expr)
        if m:
            artifacts = executor_input[m.group(1)].get("artifacts", {}).get(m.group(2), {}).get("artifacts", [])
            if not artifacts:
                raise LocalExecutionError(f"placeholder {match.group(0)}: no such artifact")
            return artifacts[0]["uri"]
        m = re.fullmatch(r"\.outputs\.parameters\['([^']+)'\]\.output_file", expr)
        if m:
            return executor_input["outputs"]["parameters"][m.group(1)]["outputFile"]
        if expr.lstrip(".") in context:
            return context[expr.lstrip(".")]
        raise LocalExecutionError(f"placeholder {match.group(0)} is not supported locally")

    return _PLACEHOLDER.sub(one, text)


# --------------------------------------------------------------------------- fork server
FORK_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kfp_fork_server.py")


def preload_modules(spec: Dict[str, Any]) -> List[str]:
    """What the container tasks import: their ``python -m`` entrypoints and
    the modules of their ``--executor_class_path`` classes."""
    modules = []
    for executor in spec.get("deploymentSpec", {}).get("executors", {}).values():
        container = executor.get("container")
        if not container:
            continue
        parts = [*container.get("command", []), *container.get("args", [])]
        for i, part in enumerate(parts[:-1]):
            if part == "-m":
                modules.append(parts[i + 1])
            elif part == "--executor_class_path":
                modules.append(parts[i + 1].rsplit(".", 1)[0])
    return list(dict.fromkeys(modules))


class _ForkServer:
    """A kfp_fork_server.py process: ``python -m`` commands forked from one
    interpreter that has done the imports (see that module)."""

    def __init__(self, python: str, modules: Sequence[str], env: Dict[str, str], cwd: str, log_path: str):
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen([python, FORK_SERVER, *modules], cwd=cwd, env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        ready = self.proc.stdout.readline()
        if not ready:
            self.close()
            raise LocalExecutionError(f"the fork server exited while importing {list(modules)} "
                                      f"(log: {log_path})")

    def run(self, module: str, args: Sequence[str], cwd: str, env: Dict[str, str], log_path: str,
            timeout: Optional[float]) -> Tuple[int, bool]:
        """(exit status, timed out) of `python -m module args` run in `cwd`."""
        request = {"module": module, "args": list(args), "cwd": cwd, "env": env, "log": log_path,
                   "timeout": timeout}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise LocalExecutionError(f"the fork server died running {module} (log: {log_path})")
        reply = json.loads(reply)
        return reply["rc"], reply["timed_out"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- the runner
class _Run:
    def __init__(self, spec: Dict[str, Any], runtime_config: Dict[str, Any], pipeline_root: str,
                 metadata_path: str, run_id: str, parameters: Dict[str, Any], python: str,
                 env: Optional[Dict[str, str]], task_timeout: Optional[float], log: Callable[[str], None]):
        self.spec = spec
        self.pipeline_name = spec["pipelineInfo"]["name"]
        self.pipeline_root = pipeline_root
        self.run_id = run_id
        self.run_dir = os.path.join(pipeline_root, self.pipeline_name, run_id)
        self.python = python
        self.env = env
        self.task_timeout = task_timeout
        self.log = log
        self.fork_server: Optional[_ForkServer] = None
        self.md = _Metadata(metadata_path, self.pipeline_name, run_id)
        self.tasks: Dict[str, TaskRun] = {}
        self.root_parameters = self._root_parameters(runtime_config, parameters)

    def _root_parameters(self, runtime_config, overrides) -> Dict[str, Any]:
        values: Dict[str, Any] = {}
        definitions = self.spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
        for name, definition in definitions.items():
            if "defaultValue" in definition:
                values[name] = definition["defaultValue"]
        for name, value in runtime_config.get("parameters", {}).items():
            values[name] = _legacy_value(value)
        values.update(runtime_config.get("parameterValues", {}))
        unknown = sorted(set(overrides) - set(definitions))
        if unknown:
            raise LocalExecutionError(f"unknown pipeline parameters {unknown}; the pipeline declares "
                                      f"{sorted(definitions)}")
        values.update(overrides)
        missing = sorted(set(definitions) - set(values))
        if missing:
            raise LocalExecutionError(f"pipeline parameters without a value: {missing}")
        return values

    # ----------------------------------------------------------- inputs
    def _input_artifacts(self, task: Dict[str, Any], component: Dict[str, Any]) -> Dict[str, List[ArtifactRecord]]:
        result = {}
        definitions = component.get("inputDefinitions", {}).get("artifacts", {})
        for key, spec in task.get("inputs", {}).get("artifacts", {}).items():
            if "taskOutputArtifact" not in spec:
                raise LocalExecutionError(f"input artifact {key}: only taskOutputArtifact inputs are "
                                          f"supported locally, got {sorted(spec)}")
            ref = spec["taskOutputArtifact"]
            records = self.tasks[ref["producerTask"]].outputs.get(ref["outputArtifactKey"], [])
            if records:
                result[key] = records
            elif not definitions.get(key, {}).get("isOptional") and \
                    self.tasks[ref["producerTask"]].kind != "resolver":
                raise LocalExecutionError(f"input artifact {key}: {ref['producerTask']} produced no "
                                          f"{ref['outputArtifactKey']!r}")
        return result

    def _input_parameters(self, task: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(parameterValues, legacy parameters) of the ExecutorInput."""
        values, legacy = {}, {}
        for key, spec in task.get("inputs", {}).get("parameters", {}).items():
            if "runtimeValue" in spec:
                runtime = spec["runtimeValue"]
                if "constant" in runtime:
                    values[key] = runtime["constant"]
                elif "constantValue" in runtime:
                    legacy[key] = runtime["constantValue"]
                else:
                    raise LocalExecutionError(f"parameter {key}: unsupported runtimeValue {runtime}")
            elif "componentInputParameter" in spec:
                values[key] = self.root_parameters[spec["componentInputParameter"]]
            elif "taskOutputParameter" in spec:
                ref = spec["taskOutputParameter"]
                values[key] = self.tasks[ref["producerTask"]].output_parameters[ref["outputParameterKey"]]
            else:
                raise LocalExecutionError(f"parameter {key}: unsupported input {sorted(spec)}")
        return values, legacy

    # ----------------------------------------------------------- tasks
    def run_task(self, name: str) -> None:
        task = self.spec["root"]["dag"]["tasks"][name]
        if task.get("triggerPolicy", {}).get("condition"):
            raise LocalExecutionError(f"{name}: trigger conditions are not supported locally")
        if "iteratorPolicy" in task or "parameterIterator" in task or "artifactIterator" in task:
            raise LocalExecutionError(f"{name}: iterators are not supported locally")
        component = self.spec["components"][task["componentRef"]["name"]]
        if "dag" in component:
            raise LocalExecutionError(f"{name}: sub-DAGs are not supported locally")
        executor = self.spec["deploymentSpec"]["executors"][component["executorLabel"]]
        kind = next(k for k in ("container", "resolver", "importer") if k in executor) \
            if any(k in executor for k in ("container", "resolver", "importer")) else None
        if kind is None:
            raise LocalExecutionError(f"{name}: executor kind {sorted(executor)} is not supported locally")
        run = self.tasks[name] = TaskRun(name=name, kind=kind)
        run.task_dir = os.path.join(self.run_dir, name)
        os.makedirs(run.task_dir, exist_ok=True)
        started = time.perf_counter()
        try:
            getattr(self, f"_run_{kind}")(run, task, component, executor[kind])
        finally:
            run.seconds = time.perf_counter() - started

    def _run_resolver(self, run: TaskRun, task, component, resolver) -> None:
        inputs = self._input_artifacts(task, component)
        input_json = {k: {"artifacts": [{"metadata": r.metadata, "uri": r.uri, "name": r.name}
                                        for r in v]} for k, v in inputs.items()}
        for key, query in resolver.get("outputArtifactQueries", {}).items():
            text = query["filter"]
            refs = re.findall(r"\{\{\$\.inputs\.artifacts\['([^']+)'\]\.metadata\['([^']+)'\]\}\}", text)
            unresolvable = False
            for input_key, meta_key in refs:
                artifacts = input_json.get(input_key, {}).get("artifacts", [])
                value = artifacts[0]["metadata"].get(meta_key) if artifacts else None
                if value is None:
                    unresolvable = True  # nothing upstream: nothing to look up
                    break
                text = text.replace("{{$.inputs.artifacts['%s'].metadata['%s']}}" % (input_key, meta_key),
                                    value if isinstance(value, str) else json.dumps(value))
            found = [] if unresolvable else self.md.query(text)[:1]
            run.outputs[key] = found
            self.log(f"  {key}: " + (f"{found[0].name} ({found[0].uri})" if found else "nothing matches")
                     + f"  [{text}]")
        execution_id = self.md.start(run.name, "resolver", inputs, run.outputs, {})
        self.md.finish(execution_id, "COMPLETE", {}, produced=False)
        run.state = "succeeded"

    def _run_importer(self, run: TaskRun, task, component, importer) -> None:
        uri_spec = importer.get("artifactUri", {})
        if "runtimeParameter" in uri_spec:
            uri = self.root_parameters[uri_spec["runtimeParameter"]]
        elif "constant" in uri_spec:
            uri = uri_spec["constant"]
        else:
            uri = _legacy_value(uri_spec.get("constantValue", {}))
        title = schema_title(importer.get("typeSchema", {}))
        key = next(iter(component.get("outputDefinitions", {}).get("artifacts", {})), "artifact")
        existing = [] if importer.get("reimport") else [
            r for r in self.md.query(f'schema_title="{title}"') if r.uri == uri]
        if existing:
            run.outputs[key] = existing[:1]
            execution_id = self.md.start(run.name, "importer", {}, run.outputs, {})
            self.md.finish(execution_id, "COMPLETE", {}, produced=False)
        else:
            record = ArtifactRecord(f"{self.run_id}/{run.name}/{key}", title, uri,
                                    dict(importer.get("metadata", {})))
            run.outputs[key] = [record]
            execution_id = self.md.start(run.name, "importer", {}, run.outputs, {})
            self.md.finish(execution_id, "COMPLETE", run.outputs, produced=True)
        run.state = "succeeded"

    def _executor_input(self, run: TaskRun, task, component, inputs) -> Dict[str, Any]:
        values, legacy = self._input_parameters(task)
        in_defs = component.get("inputDefinitions", {}).get("artifacts", {})
        out_defs = component.get("outputDefinitions", {}).get("artifacts", {})
        for key, records in inputs.items():
            if key not in in_defs:
                raise LocalExecutionError(f"{run.name}: input {key} is not in the component's inputDefinitions")
        executor_input = {
            "inputs": {
                "parameterValues": values,
                "parameters": legacy,
                "artifacts": {k: {"artifacts": [r.runtime_artifact(in_defs[k]["artifactType"]) for r in v]}
                              for k, v in inputs.items()},
            },
            "outputs": {
                "artifacts": {},
                "parameters": {},
                "outputFile": os.path.join(run.task_dir, EXECUTOR_OUTPUT_FILE),
            },
        }
        for key, definition in out_defs.items():
            record = ArtifactRecord(f"{self.run_id}/{run.name}/{key}", schema_title(definition["artifactType"]),
                                    os.path.join(run.task_dir, key), {})
            run.outputs[key] = [record]
            executor_input["outputs"]["artifacts"][key] = {
                "artifacts": [record.runtime_artifact(definition["artifactType"])]}
        for key in component.get("outputDefinitions", {}).get("parameters", {}):
            executor_input["outputs"]["parameters"][key] = {
                "outputFile": os.path.join(run.task_dir, "parameters", key)}
        # Validate against the proto the entrypoint parses.
        from google.protobuf import json_format
        from kfp.pipeline_spec import pipeline_spec_pb2

        json_format.ParseDict(executor_input, pipeline_spec_pb2.ExecutorInput())
        return executor_input

    def _command(self, parts: Sequence[str], executor_input, run: TaskRun) -> List[str]:
        encoded = json.dumps(executor_input, sort_keys=True)
        context = {"pipeline_job_name": self.run_id, "pipeline_job_uuid": self.run_id,
                   "pipeline_task_name": run.name, "pipeline_task_uuid": f"{self.run_id}-{run.name}",
                   "pipeline_root": self.pipeline_root}
        command = [_resolve_placeholders(p, executor_input, encoded, context) for p in parts]
        if command and os.path.basename(command[0]) in ("python", "python3", "python3.10"):
            command[0] = self.python  # the image's interpreter is this environment's
        return command

    def _task_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["KERAS_BACKEND"] = "tensorflow"  # as the images set it
        env.update(self.env or {})
        return env

    def _subprocess(self, command: List[str], run: TaskRun, what: str) -> None:
        env = self._task_env()
        with open(run.log_path, "a") as log:
            log.write(f"$ {what}: {' '.join(c if len(c) < 200 else c[:60] + '...' for c in command)}\n")
        if self.fork_server is not None and command[0] == self.python and command[1:2] == ["-m"]:
            returncode, timed_out = self.fork_server.run(command[2], command[3:], run.task_dir, env,
                                                         run.log_path, self.task_timeout)
        else:
            with open(run.log_path, "a") as log:
                try:
                    returncode = subprocess.run(command, cwd=run.task_dir, env=env, stdout=log,
                                                stderr=subprocess.STDOUT, timeout=self.task_timeout).returncode
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
        if timed_out:
            raise LocalExecutionError(f"{run.name}: {what} timed out after {self.task_timeout}s "
                                      f"(log: {run.log_path})")
        if returncode != 0:
            with open(run.log_path) as f:
                tail = "".join(f.readlines()[-40:])
            raise LocalExecutionError(f"{run.name}: {what} exited with {returncode} "
                                      f"(log: {run.log_path})\n{tail}")

    def _run_container(self, run: TaskRun, task, component, container) -> None:
        from google.protobuf import json_format
        from kfp.pipeline_spec import pipeline_spec_pb2

        inputs = self._input_artifacts(task, component)
        executor_input = self._executor_input(run, task, component, inputs)
        resources = container.get("resources", {})
        props = {"image": container.get("image", ""), "resources": json.dumps(resources, sort_keys=True)}
        args = container.get("args", [])
        if "--executor_class_path" in args:
            props["executor_class_path"] = args[args.index("--executor_class_path") + 1]
        execution_id = self.md.start(run.name, "container", inputs, run.outputs, props)
        run.log_path = os.path.join(run.task_dir, LOG_FILE)
        request = ", ".join(f"{k}={v}" for k, v in sorted(resources.items()))
        self.log(f"  image {props['image']}" + (f", requests {request}" if request else ""))
        state = "FAILED"
        try:
            hook = container.get("lifecycle", {}).get("preCacheCheck")
            if hook:
                self._subprocess(self._command([*hook.get("command", []), *hook.get("args", [])],
                                               executor_input, run), run, "preCacheCheck hook")
            command = self._command([*container.get("command", []), *args], executor_input, run)
            run.command = [c if "{" not in c[:1] else "<executor input JSON>" for c in command]
            self._subprocess(command, run, "executor")
            output_file = executor_input["outputs"]["outputFile"]
            if os.path.exists(output_file):
                with open(output_file) as f:
                    output = json_format.Parse(f.read(), pipeline_spec_pb2.ExecutorOutput(),
                                               ignore_unknown_fields=True)
                output = json_format.MessageToDict(output)
                for key, artifact_list in output.get("artifacts", {}).items():
                    produced = artifact_list.get("artifacts", [])
                    for record, artifact in zip(run.outputs.get(key, []), produced):
                        record.uri = artifact.get("uri") or record.uri
                        record.metadata = artifact.get("metadata", {})
                run.output_parameters.update(output.get("parameterValues", {}))
                for key, value in output.get("parameters", {}).items():
                    run.output_parameters.setdefault(key, _legacy_value(value))
            for key in component.get("outputDefinitions", {}).get("parameters", {}):
                path = executor_input["outputs"]["parameters"][key]["outputFile"]
                if key not in run.output_parameters and os.path.exists(path):
                    with open(path) as f:
                        run.output_parameters[key] = f.read()
            state = "COMPLETE"
            run.state = "succeeded"
        finally:
            if state != "COMPLETE":
                run.state = "failed"
            self.md.finish(execution_id, state, run.outputs, produced=True)


def run_compiled_locally(spec_json_path: str, pipeline_root_dir: str, metadata_path: Optional[str] = None,
                         *, run_id: Optional[str] = None, parameters: Optional[Dict[str, Any]] = None,
                         python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                         task_timeout: Optional[float] = None, fork_server: bool = True,
                         log: Callable[[str], None] = print) -> LocalRunResult:
    """Runs every task of the compiled spec (a KubeflowV2DagRunner JSON, or a
    PipelineSpec JSON/YAML) here, as described in the module docstring.

    `pipeline_root_dir` plays the run's pipeline root (as
    ``create_run(pipeline_root=...)`` would); `parameters` are the run's
    pipeline parameters. Raises `LocalExecutionError` (with ``.result``) when
    a task fails; the tasks after it are not run. `fork_server=False` starts
    each task as a fresh interpreter (slower, as a container would)."""
    spec, runtime_config = load_spec(spec_json_path)
    pipeline_root = os.path.abspath(pipeline_root_dir)
    os.makedirs(pipeline_root, exist_ok=True)
    metadata_path = os.path.abspath(metadata_path or os.path.join(pipeline_root, "metadata.sqlite"))
    os.makedirs(os.path.dirname(metadata_path), exist_ok=True)
    run_id = run_id or f"{spec['pipelineInfo']['name']}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
    runner = _Run(spec, runtime_config, pipeline_root, metadata_path, run_id, dict(parameters or {}),
                  python or sys.executable, env, task_timeout, log)
    tasks = spec["root"]["dag"]["tasks"]
    order = topological_order(tasks)
    result = LocalRunResult(runner.pipeline_name, run_id, pipeline_root, metadata_path, order, runner.tasks)
    compiled_root = spec.get("defaultPipelineRoot") or runtime_config.get("gcsOutputDirectory")
    if compiled_root and os.path.abspath(compiled_root) != pipeline_root and "://" not in pipeline_root:
        log(f"note: the spec was compiled for pipeline root {compiled_root}; paths in its parameters "
            "(serving and checkpoint directories) still point there")
    log(f"local KFP run {run_id}: {len(order)} tasks under {runner.run_dir}")
    os.makedirs(runner.run_dir, exist_ok=True)
    if fork_server:
        started = time.perf_counter()
        runner.fork_server = _ForkServer(runner.python, preload_modules(spec), runner._task_env(), runner.run_dir,
                                         os.path.join(runner.run_dir, "fork_server.log"))
        log(f"  fork server ready in {time.perf_counter() - started:.1f}s")
    try:
        for index, name in enumerate(order, 1):
            log(f"[{index}/{len(order)}] {name}")
            try:
                runner.run_task(name)
            except LocalExecutionError as e:
                for rest in order[index:]:
                    runner.tasks.setdefault(rest, TaskRun(name=rest, kind="?", state="not run"))
                e.result = result
                raise
            log(f"  {runner.tasks[name].state} in {runner.tasks[name].seconds:.1f}s")
    finally:
        if runner.fork_server is not None:
            runner.fork_server.close()
    return result
