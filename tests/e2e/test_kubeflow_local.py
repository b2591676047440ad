"""The Kubeflow Pipelines path without a cluster: the pipeline compiled with
TFX's KubeflowV2DagRunner is checked as KFP's PipelineSpec (tasks,
dependencies, executors, the Trainer's resources), then executed task by task
with the KFP-backend emulator of tests/support/kfp_local.py (each TFX
container entrypoint as a subprocess, the resolver evaluated against ML
Metadata), and `deploy`'s
failure and submission paths are exercised against loopback servers only.

Runtime: about 2.5 minutes on 2 CPU cores, almost all of it the two local
runs (9 container tasks each, forked from a fork server that imported TFX
once; fresh interpreters took ~10 s each before any work).
"""

import http.server
import importlib.util
import json
import os
import sys
import threading

import pytest

pytestmark = pytest.mark.e2e


def _kfp_local():
    """The KFP-backend emulator, tests/support/kfp_local.py, loaded by path:
    `tests` is no package of ours to import from (IPython ships a `tests`
    package, and TFMA puts IPython's extensions directory on sys.path)."""
    if "kfp_local" not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "kfp_local.py")
        spec = importlib.util.spec_from_file_location("kfp_local", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["kfp_local"] = module  # before exec: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["kfp_local"]

IMAGE = "registry.example/deepseek-tfx:test"
TRAINER_IMAGE = "registry.example/deepseek-tfx-gpu:test"
# Loose enough for a 20-step tiny model: this checks orchestration, not quality.
THRESHOLDS = {"max_loss_gap_nats": 5.0, "max_expert_load_ratio": 100, "max_expert_load_cv": 5,
              "max_cache_ratio_vs_mha": 0.5, "min_gain_over_uniform_nats": 0.01}
RESOLVER_TASKS = {"latest_blessed_model_resolver-model-blessing-resolver",
                  "latest_blessed_model_resolver-model-resolver"}
# task -> the tasks it must wait for (data and ordering edges).
EXPECTED_DEPENDENCIES = {
    "SyntheticTokenExampleGen": set(),
    "CuratedSchemaGen": set(),
    "StatisticsGen": {"SyntheticTokenExampleGen"},
    "ExampleValidator": {"StatisticsGen", "CuratedSchemaGen"},
    "DataValidationGate": {"ExampleValidator", "StatisticsGen"},
    "Trainer": {"SyntheticTokenExampleGen", "CuratedSchemaGen", "DataValidationGate"},
    "Evaluator": {"Trainer", "SyntheticTokenExampleGen"},
    "IntegrationValidator": {"Trainer", "SyntheticTokenExampleGen"},
    "Pusher": {"Trainer", "Evaluator", "IntegrationValidator"},
}
# Where each platform's Evaluator baseline comes from.
VERTEX_BASELINE_TASK = "latest_blessed_model_resolver-model-resolver"
KFP_BASELINE_TASK = "LatestPushedModel"


def _settings(tmp):
    from pipeline.settings import PipelineSettings

    return PipelineSettings(run_dir=str(tmp / "run"), preset="tiny", seq_len=16, train_examples=256,
                            eval_examples=64, train_steps=20, batch_size=16, thresholds=THRESHOLDS)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{platform: (path, job dict)} compiled in-process, plus the dirs."""
    from kubeflow.compile import compile_pipeline

    tmp = tmp_path_factory.mktemp("kfp")
    root = tmp / "root"
    out = {"tmp": tmp, "root": str(root)}
    for platform in ("vertex", "kfp"):
        path = compile_pipeline(_settings(tmp), str(tmp / f"{platform}.json"), image=IMAGE,
                                pipeline_root=str(root), trainer_image=TRAINER_IMAGE, platform=platform)
        with open(path) as f:
            out[platform] = (path, json.load(f))
    return out


def _tasks(job):
    return job["pipelineSpec"]["root"]["dag"]["tasks"]


def _executor(job, task):
    spec = job["pipelineSpec"]
    return spec["deploymentSpec"]["executors"][spec["components"][_tasks(job)[task]["componentRef"]["name"]]["executorLabel"]]


# --------------------------------------------------------------------------- the spec
@pytest.mark.parametrize("platform", ["vertex", "kfp"])
def test_spec_parses_as_kfp_pipeline_spec(compiled, platform):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    _, job = compiled[platform]
    json_format.ParseDict(job, pipeline_spec_pb2.PipelineJob())  # the wrapper
    spec = json_format.ParseDict(job["pipelineSpec"], pipeline_spec_pb2.PipelineSpec())  # strict
    assert spec.schema_version == "2.1.0"
    assert spec.pipeline_info.name == "deepseek-tfx"
    assert spec.default_pipeline_root == compiled["root"]
    assert job["runtimeConfig"]["gcsOutputDirectory"] == compiled["root"]
    # Every component task has a component and an executor.
    for task in spec.root.dag.tasks.values():
        label = spec.components[task.component_ref.name].executor_label
        assert label in spec.deployment_spec.fields["executors"].struct_value.fields


def test_one_task_per_component_with_dependencies(compiled, tmp_path):
    from pipeline.pipeline import create_pipeline

    component_ids = {c.id for c in create_pipeline(_settings(tmp_path)).components}
    assert component_ids - set(EXPECTED_DEPENDENCIES) == {"latest_blessed_model_resolver"}

    vertex, kfp = compiled["vertex"][1], compiled["kfp"][1]
    assert set(_tasks(vertex)) == set(EXPECTED_DEPENDENCIES) | RESOLVER_TASKS
    assert set(_tasks(kfp)) == set(EXPECTED_DEPENDENCIES) | {KFP_BASELINE_TASK}
    assert set(_tasks(kfp)[KFP_BASELINE_TASK]["dependentTasks"]) == {"Trainer"}
    for job, baseline in ((kfp, KFP_BASELINE_TASK), (vertex, VERTEX_BASELINE_TASK)):
        for name, expected in EXPECTED_DEPENDENCIES.items():
            extra = {baseline} if name == "Evaluator" else set()
            assert set(_tasks(job)[name].get("dependentTasks", [])) == expected | extra, name
    # The Trainer waits for the data gate though it consumes nothing from it.
    trainer = _tasks(kfp)["Trainer"]
    assert "DataValidationGate" in trainer["dependentTasks"]
    assert set(trainer["inputs"]["artifacts"]) == {"examples", "schema"}
    assert trainer["inputs"]["parameters"]["run_fn"]["runtimeValue"]["constant"] == "components.trainer.run_fn"
    # The Pusher reads TFMA's blessing and the integration checks' one.
    for job in (kfp, vertex):
        pusher = _tasks(job)["Pusher"]["inputs"]["artifacts"]
        assert pusher["model_blessing"]["taskOutputArtifact"] == {"producerTask": "Evaluator",
                                                                  "outputArtifactKey": "blessing"}
        assert pusher["infra_blessing"]["taskOutputArtifact"] == {"producerTask": "IntegrationValidator",
                                                                  "outputArtifactKey": "blessing"}
    # Vertex: the two-step resolver feeds the Evaluator's baseline.
    evaluator = _tasks(vertex)["Evaluator"]["inputs"]["artifacts"]
    assert evaluator["baseline_model"]["taskOutputArtifact"]["producerTask"] == VERTEX_BASELINE_TASK
    assert _tasks(vertex)[VERTEX_BASELINE_TASK]["inputs"]["artifacts"]["input"][
        "taskOutputArtifact"]["producerTask"] == "latest_blessed_model_resolver-model-blessing-resolver"


def test_kfp_platform_is_built_without_the_resolver(compiled, tmp_path, capsys):
    """Open-source KFP: the pipeline is built with baseline="latest_pushed" (no
    Resolver node at all), so the compiled JSON is TFX's, unedited."""
    from tfx import v1 as tfx

    from kubeflow.compile import compile_pipeline
    from pipeline.pipeline import create_pipeline

    job = compiled["kfp"][1]
    spec = job["pipelineSpec"]
    assert not any("resolver" in e for e in spec["deploymentSpec"]["executors"].values())
    assert not RESOLVER_TASKS & set(spec["components"])
    evaluator = _tasks(job)["Evaluator"]["inputs"]["artifacts"]
    assert evaluator["baseline_model"]["taskOutputArtifact"] == {"producerTask": KFP_BASELINE_TASK,
                                                                 "outputArtifactKey": "baseline"}
    assert "isOptional" not in spec["components"]["Evaluator"]["inputDefinitions"]["artifacts"]["model"]
    # The DAG definition itself has no Resolver when asked for the latest pushed baseline.
    nodes = create_pipeline(_settings(tmp_path), baseline="latest_pushed").components
    assert not any(isinstance(n, tfx.dsl.Resolver) for n in nodes)
    assert {n.id for n in nodes} == set(EXPECTED_DEPENDENCIES) | {KFP_BASELINE_TASK}
    # Compiling says so.
    capsys.readouterr()
    compile_pipeline(_settings(tmp_path), str(tmp_path / "kfp.json"), image=IMAGE,
                     pipeline_root=str(tmp_path / "root"), platform="kfp")
    err = capsys.readouterr().err
    assert "warning: open-source Kubeflow Pipelines cannot run TFX Resolver tasks" in err
    compile_pipeline(_settings(tmp_path), str(tmp_path / "vertex.json"), image=IMAGE,
                     pipeline_root=str(tmp_path / "root"), platform="vertex")
    assert "Resolver" not in capsys.readouterr().err
    vertex_resolvers = [e["resolver"] for e in compiled["vertex"][1]["pipelineSpec"]["deploymentSpec"]["executors"].values()
                        if "resolver" in e]
    filters = sorted(q["filter"] for r in vertex_resolvers for q in r["outputArtifactQueries"].values())
    assert filters[0].startswith('schema_title="tfx.Model" AND state=LIVE AND name=')
    assert filters[1] == 'schema_title="tfx.ModelBlessing" AND state=LIVE AND metadata.blessed.number_value=1'


@pytest.mark.parametrize("platform,gpu_type", [("kfp", "nvidia.com/gpu"), ("vertex", "NVIDIA_TESLA_A100")])
def test_trainer_carries_the_gpu_request_and_image(compiled, platform, gpu_type):
    job = compiled[platform][1]
    trainer = _executor(job, "Trainer")["container"]
    assert trainer["image"] == TRAINER_IMAGE
    assert trainer["resources"] == {"accelerator": {"type": gpu_type, "count": "1"},
                                    "cpuLimit": 8.0, "memoryLimit": 32.0}
    for name in _tasks(job):
        container = _executor(job, name).get("container")
        if container and name != "Trainer":
            assert container["image"] == IMAGE and "resources" not in container, name


def test_every_executor_imports_from_the_installed_package(compiled):
    from kubeflow.compile import check_executors_importable, executor_class_paths

    job = compiled["vertex"][1]
    paths = check_executors_importable(job)
    assert paths == executor_class_paths(job)
    assert set(paths.values()) >= {"components.synthetic_example_gen.SyntheticTokenExampleGenExecutor",
                                   "components.curated_schema.CuratedSchemaGen_Executor",
                                   "components.data_validation.DataValidationGateExecutor",
                                   "components.integration_validator.IntegrationValidator_Executor",
                                   "tfx.components.evaluator.executor.Executor",
                                   "tfx.components.trainer.executor.GenericExecutor"}
    assert "components.latest_pushed_model.LatestPushedModel_Executor" in check_executors_importable(
        compiled["kfp"][1]).values()
    assert not any(p.startswith("__main__") for p in paths.values())
    for name in _tasks(job):
        container = _executor(job, name).get("container")
        if container:
            assert container["command"] == ["python", "-m",
                                            "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"]
            assert "{{$}}" in container["args"]
    # The custom artifact type compiles to a schema title the entrypoint imports back.
    report = job["pipelineSpec"]["components"]["IntegrationValidator"]["outputDefinitions"]["artifacts"]["report"]
    assert report["artifactType"]["instanceSchema"].startswith("title: components.ValidationReport\n")
    # No module_file: nothing was packed into a wheel under the pipeline root.
    assert not os.path.exists(os.path.join(compiled["root"], "_wheels"))


def test_fork_server_runs_a_module_as_python_m_would(tmp_path):
    """The emulator's tasks are forked from one interpreter that did the
    imports: each child still gets its own cwd (first on sys.path), argv,
    environment and log, and its exit status and timeout are the task's."""
    kfp_local = _kfp_local()
    task = tmp_path / "task"
    task.mkdir()
    (task / "probe.py").write_text(
        "import json, os, sys, time\n"
        "print(json.dumps({'cwd': os.getcwd(), 'argv': sys.argv[1:], 'env': os.environ.get('PROBE'),\n"
        "                  'name': __name__}))\n"
        "if sys.argv[1] == 'sleep':\n"
        "    time.sleep(60)\n"
        "sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])\n")
    log = tmp_path / "task.log"
    server = kfp_local._ForkServer(sys.executable, ["json"], dict(os.environ), str(tmp_path),
                                   str(tmp_path / "server.log"))
    try:
        env = {**os.environ, "PROBE": "task env"}
        assert server.run("probe", ["0", "--flag"], str(task), env, str(log), timeout=30) == (0, False)
        record = json.loads(log.read_text().splitlines()[0])
        assert record == {"cwd": str(task), "argv": ["0", "--flag"], "env": "task env", "name": "__main__"}
        assert server.run("probe", ["3"], str(task), env, str(log), timeout=30) == (3, False)
        assert server.run("probe", ["bad input"], str(task), env, str(log), timeout=30) == (1, False)
        assert log.read_text().splitlines()[-1] == "bad input"  # SystemExit's message, as python prints it
        assert server.run("probe", ["sleep"], str(task), env, str(log), timeout=1)[1] is True
        assert server.run("no_such_module", [], str(task), env, str(log), timeout=30) == (1, False)
        assert "No module named no_such_module" in log.read_text()
    finally:
        server.close()
    assert server.proc.returncode == 0


def test_resource_and_beam_options():
    from kubeflow.compile import CompileError, beam_pipeline_args, parse_cpu, parse_memory

    assert parse_cpu("500m") == 0.5 and parse_cpu("8") == 8.0
    assert parse_memory("32G") == 32.0 and parse_memory("1Gi") == pytest.approx(1.073741824)
    assert parse_memory("512Mi") == pytest.approx(0.536870912)
    for bad in ("8 cores", "-1", "0"):
        with pytest.raises(CompileError):
            parse_cpu(bad)
    with pytest.raises(CompileError):
        parse_memory("32GB")
    assert beam_pipeline_args("DirectRunner", (), ["--direct_num_workers=1"]) == [
        "--runner=DirectRunner", "--direct_num_workers=1"]
    assert beam_pipeline_args("DirectRunner", (), []) == []  # Beam's default: no TFX sdist per pod
    assert beam_pipeline_args("FlinkRunner", ["--flink_master=flink:8081"], ["--direct_num_workers=1"]) == [
        "--runner=FlinkRunner", "--flink_master=flink:8081"]
    with pytest.raises(CompileError, match="--project"):
        beam_pipeline_args("DataflowRunner", ["--region=us-central1"])
    with pytest.raises(CompileError, match="--beam-runner"):
        beam_pipeline_args("DirectRunner", ["--runner=DataflowRunner"])


def test_compile_cli(compiled, capsys):
    from app.cli import main

    out = compiled["tmp"] / "cli.json"
    rc = main(["compile", "--output", str(out), "--image", IMAGE, "--pipeline-root", "gs://bucket/root",
               "--preset", "tiny", "--seq-len", "16", "--steps", "20", "--batch-size", "16",
               "--eval-examples", "64", "--train-examples", "256", "--gpu-count", "2", "--gpu-type",
               "nvidia.com/gpu", "--cpu", "4", "--memory", "16Gi", "--beam-runner", "FlinkRunner",
               "--beam-arg=--flink_master=flink:8081", "--beam-arg=--environment_type=LOOPBACK"])
    assert rc == 0, capsys.readouterr().err
    job = json.loads(out.read_text())
    trainer = _executor(job, "Trainer")["container"]
    assert trainer["resources"]["accelerator"] == {"type": "nvidia.com/gpu", "count": "2"}
    assert trainer["resources"]["cpuLimit"] == 4.0
    assert trainer["args"][-3:] == ["--runner=FlinkRunner", "--flink_master=flink:8081",
                                    "--environment_type=LOOPBACK"]
    params = _tasks(job)["Trainer"]["inputs"]["parameters"]
    custom = json.loads(params["custom_config"]["runtimeValue"]["constant"])
    assert custom["training"]["checkpoint_dir"].startswith("gs://bucket/root/checkpoints/")
    push = json.loads(_tasks(job)["Pusher"]["inputs"]["parameters"]["push_destination"]["runtimeValue"]["constant"])
    assert push["filesystem"]["base_directory"] == "gs://bucket/root/serving"
    # The OSS-KFP baseline reads the same serving directory.
    baseline = _tasks(job)[KFP_BASELINE_TASK]["inputs"]["parameters"]["serving_dir"]
    assert baseline["runtimeValue"]["constant"] == "gs://bucket/root/serving"
    assert job["pipelineSpec"]["defaultPipelineRoot"] == "gs://bucket/root"
    # The user's TFRecords in a bucket compile (checked where they are read, not here).
    remote = compiled["tmp"] / "remote.json"
    assert main(["compile", "--output", str(remote), "--image", IMAGE, "--pipeline-root", "gs://bucket/root",
                 "--preset", "tiny", "--seq-len", "16", "--examples-dir", "gs://bucket/tokens"]) == 0
    gen = _tasks(json.loads(remote.read_text()))["ImportExampleGen"]["inputs"]["parameters"]
    assert gen["input_base"]["runtimeValue"]["constant"] == "gs://bucket/tokens"
    # Bad options: one line, exit 2, no file.
    bad = compiled["tmp"] / "bad.json"
    assert main(["compile", "--output", str(bad), "--image", IMAGE, "--pipeline-root", "minio://mlpipeline/x"]) == 2
    assert "minio://" in capsys.readouterr().err and not bad.exists()


# --------------------------------------------------------------------------- deploy
def _serve(handler_cls):
    server = http.server.HTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _deploy_args(host, compiled, *extra):
    return ["deploy", "--host", host, "--package", compiled["kfp"][0], *extra]


def test_deploy_to_a_closed_port_fails_cleanly(compiled, capsys, tmp_path, monkeypatch):
    from app.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # kfp's context file would go here
    keep = tmp_path / "kept.json"
    # Compiling flags given, not --package: the host check comes first, so nothing is compiled.
    rc = main(["deploy", "--host", "http://127.0.0.1:9", "--image", IMAGE, "--pipeline-root",
               str(tmp_path / "root"), "--output", str(keep)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "cannot reach Kubeflow Pipelines at http://127.0.0.1:9" in err
    assert not keep.exists() and not (tmp_path / "root").exists() and not (tmp_path / "home").exists()
    assert main(_deploy_args("http://127.0.0.1:9", compiled)) == 1


@pytest.mark.parametrize("status,headers,expected", [
    (401, {}, "authentication failed"),
    (302, {"Location": "/dex/auth?client_id=kubeflow"}, "authentication required"),
    (200, {"Content-Type": "text/html"}, "authentication required"),
])
def test_deploy_auth_failures_are_one_line(compiled, capsys, status, headers, expected):
    from app.cli import main

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(b"<html>login</html>")

        def log_message(self, *args):
            pass

    server, host = _serve(Handler)
    try:
        assert main(_deploy_args(host, compiled, "--experiment", "e")) == 1
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_deploy_submits_the_pipeline_spec_yaml(compiled, capsys, tmp_path, monkeypatch):
    """A loopback stand-in for the KFP v2beta1 API: the kfp client uploads the
    PipelineSpec (with the pipeline root) of the compiled PipelineJob."""
    from app.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.startswith("/apis/v2beta1/healthz"):
                self._reply({"multi_user": False})
            elif self.path.startswith("/apis/v2beta1/experiments"):
                self._reply({"experiments": [], "total_size": 0})
            else:
                self.send_error(404)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            seen[self.path] = body
            if self.path.startswith("/apis/v2beta1/experiments"):
                self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
            elif self.path.startswith("/apis/v2beta1/runs"):
                self._reply({"run_id": "run-1", "display_name": body.get("display_name")})
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server, host = _serve(Handler)
    try:
        rc = main(_deploy_args(host, compiled, "--experiment", "tiny", "--run-name", "r1"))
        out, err = capsys.readouterr()
        # An undeclared --param is refused before anything is sent.
        posts = len(seen)
        assert main(_deploy_args(host, compiled, "--param", "steps=5")) == 1
        assert "not a parameter of the pipeline" in capsys.readouterr().err and len(seen) == posts
    finally:
        server.shutdown()
    assert rc == 0, err
    assert "run run-1 created in experiment tiny" in out
    assert seen["/apis/v2beta1/experiments"]["display_name"] == "tiny"
    run = seen["/apis/v2beta1/runs"]
    assert run["display_name"] == "r1" and run["experiment_id"] == "exp-1"
    assert run["runtime_config"]["pipeline_root"] == compiled["root"]
    sent = run["pipeline_spec"]
    expected = compiled["kfp"][1]["pipelineSpec"]
    assert sent["root"] == expected["root"] and sent["deploymentSpec"] == expected["deploymentSpec"]
    assert sent["defaultPipelineRoot"] == compiled["root"]


# --------------------------------------------------------------------------- local run
@pytest.fixture(scope="module")
def local_run(compiled):
    path, _ = compiled["vertex"]
    return _kfp_local().run_compiled_locally(path, compiled["root"], os.path.join(compiled["tmp"], "mlmd.sqlite"),
                                run_id="run-1", task_timeout=600)


def test_local_run_produces_the_pipeline_artifacts(local_run, compiled):
    r = local_run
    assert r.succeeded and set(r.order) == set(EXPECTED_DEPENDENCIES) | RESOLVER_TASKS
    assert r.order.index("Trainer") > r.order.index("DataValidationGate")
    # First run: nothing blessed before, so no baseline.
    assert r.tasks["latest_blessed_model_resolver-model-blessing-resolver"].outputs["model_blessing"] == []
    assert r.tasks["latest_blessed_model_resolver-model-resolver"].outputs["model"] == []

    def uri(task, key):
        artifact = r.artifact(task, key)
        assert artifact is not None and os.path.exists(artifact.uri), (task, key)
        assert artifact.uri.startswith(os.path.join(compiled["root"], "deepseek-tfx", "run-1", task))
        return artifact.uri

    examples = uri("SyntheticTokenExampleGen", "examples")
    assert os.listdir(os.path.join(examples, "Split-train")) and os.listdir(os.path.join(examples, "Split-eval"))
    assert json.loads(r.artifact("SyntheticTokenExampleGen", "examples").metadata["split_names"]) == ["train", "eval"]
    assert os.path.exists(os.path.join(uri("StatisticsGen", "statistics"), "Split-train", "FeatureStats.pb"))
    assert os.path.exists(os.path.join(uri("CuratedSchemaGen", "schema"), "schema.pbtxt"))
    assert os.path.exists(os.path.join(uri("ExampleValidator", "anomalies"), "Split-eval", "SchemaDiff.pb"))
    assert json.loads(open(uri("DataValidationGate", "result")).read())["passed"] is True
    model = uri("Trainer", "model")
    assert os.path.exists(os.path.join(model, "keras", "model.keras"))
    assert os.path.exists(os.path.join(model, "Format-Serving", "saved_model.pb"))
    summary = json.load(open(os.path.join(model, "training_summary.json")))
    assert summary["final_step"] == 20
    assert os.path.exists(os.path.join(uri("IntegrationValidator", "report"), "report.md"))
    infra = r.artifact("IntegrationValidator", "blessing")
    assert os.path.exists(os.path.join(uri("IntegrationValidator", "blessing"), "BLESSED")), infra.metadata
    assert infra.metadata["blessed"] == 1 and json.loads(infra.metadata["failures"]) == []
    blessing = r.artifact("Evaluator", "blessing")
    assert os.path.exists(os.path.join(uri("Evaluator", "blessing"), "BLESSED")), blessing.metadata
    assert blessing.metadata["blessed"] == 1
    import tensorflow_model_analysis as tfma

    metrics = tfma.load_eval_result(uri("Evaluator", "evaluation")).slicing_metrics[0][1][""][""]
    assert 0 < metrics["token_loss"]["doubleValue"] < 4.16  # log(64): better than uniform
    pushed = r.artifact("Pusher", "pushed_model")
    assert pushed.metadata["pushed"] == 1
    destination = pushed.metadata["pushed_destination"]
    assert destination.startswith(os.path.join(compiled["root"], "serving"))
    assert os.path.exists(os.path.join(destination, "saved_model.pb"))
    # The task ran TFX's entrypoint with the resolved ExecutorInput, in its own directory.
    assert r.tasks["Trainer"].command[1:3] == ["-m", "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"]


def test_local_run_is_recorded_in_ml_metadata_like_kfp(local_run):
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2 as mlmd

    config = mlmd.ConnectionConfig()
    config.sqlite.filename_uri = local_run.metadata_path
    store = metadata_store.MetadataStore(config)
    run_context = store.get_context_by_type_and_name("system.PipelineRun", "run-1")
    assert store.get_context_by_type_and_name("system.Pipeline", "deepseek-tfx") is not None
    executions = store.get_executions_by_context(run_context.id)
    assert len(executions) == 11
    assert all(e.last_known_state == mlmd.Execution.COMPLETE for e in executions)
    artifacts = store.get_artifacts_by_context(run_context.id)
    types = {store.get_artifact_types_by_id([a.type_id])[0].name for a in artifacts}
    assert types == {"tfx.Examples", "tfx.ExampleStatistics", "tfx.Schema", "tfx.ExampleAnomalies", "tfx.String",
                     "tfx.Model", "tfx.ModelRun", "tfx.ModelEvaluation", "tfx.ModelBlessing",
                     "tfx.InfraBlessing", "components.ValidationReport", "tfx.PushedModel"}
    assert all(a.state == mlmd.Artifact.LIVE for a in artifacts)
    trainer = next(e for e in executions if e.custom_properties["task_name"].string_value == "Trainer")
    assert json.loads(trainer.custom_properties["resources"].string_value)["accelerator"]["count"] == "1"


def test_resolver_queries_find_what_the_run_produced(local_run):
    md = _kfp_local()._Metadata(local_run.metadata_path, "deepseek-tfx", "probe")
    found = md.query('schema_title="tfx.ModelBlessing" AND state=LIVE AND metadata.blessed.number_value=1')
    # Only TFMA's blessing is a ModelBlessing; the checks' InfraBlessing is not a candidate.
    assert [a.name for a in found] == ["run-1/Evaluator/blessing"]
    model = local_run.artifact("Trainer", "model")
    by_name = md.query(f'schema_title="tfx.Model" AND state=LIVE AND name="{model.name}"')
    assert [a.uri for a in by_name] == [model.uri]
    assert md.query('schema_title="tfx.ModelBlessing" AND state=LIVE AND metadata.blessed.number_value=0') == []


def test_blessing_names_the_model_for_the_kfp_model_resolver(local_run):
    """TFX's KubeflowV2 entrypoint rewrites an Evaluator's current_model_id
    (an MLMD int id in the executor) to the runtime artifact name, which is
    what Vertex's model resolver filters on (name="{{...current_model_id}}")."""
    blessing = local_run.artifact("Evaluator", "blessing")
    assert blessing.metadata["current_model_id"] == local_run.artifact("Trainer", "model").name


def test_second_vertex_run_compares_with_the_first_runs_model(local_run, compiled):
    """What the current_model_id fix is for: run 2's resolver finds run 1's
    blessed model, and the Evaluator compares the new model against it."""
    path, _ = compiled["vertex"]
    second = _kfp_local().run_compiled_locally(path, compiled["root"], local_run.metadata_path, run_id="run-2",
                                  task_timeout=600)
    assert second.succeeded
    (baseline,) = second.tasks[VERTEX_BASELINE_TASK].outputs["model"]
    assert baseline.name == local_run.artifact("Trainer", "model").name
    blessing = second.artifact("Evaluator", "blessing")
    assert blessing.metadata["baseline_model_id"] == baseline.name
    assert blessing.metadata["current_model_id"] == second.artifact("Trainer", "model").name
    import tensorflow_model_analysis as tfma

    metrics = tfma.load_eval_result(second.artifact("Evaluator", "evaluation").uri,
                                    model_name="candidate").slicing_metrics[0][1][""][""]
    assert "token_loss_diff" in metrics
