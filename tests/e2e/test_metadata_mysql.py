"""ML Metadata on MySQL (MariaDB): `--metadata-mysql` for run, inspect and
generate against a throwaway server (tests/support/mariadb_server.py). Two runs
start at once on a database neither has created; one is rerun from the
cache; inspect and generate read the shared store; a wrong password, an
unreachable server and a user without permissions each fail in one line."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))
import mariadb_server as mariadb  # noqa: E402

# The tiny pipeline of tests/e2e/test_cli.py, with a loose gate.
TINY = ["--preset", "tiny", "--seq-len", "16", "--train-examples", "256", "--eval-examples", "32",
        "--steps", "10", "--batch-size", "16"]
LOOSE_GATE = {"max_loss_gap_nats": 5.0, "max_expert_load_ratio": 100.0, "max_expert_load_cv": 5.0,
              "min_gain_over_uniform_nats": 0.05}

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret-for-tests"
# Change thresholds are against whichever run's model was blessed first.
GATE = {**LOOSE_GATE, "max_regression_nats": 10.0}


@pytest.fixture(scope="module")
def server():
    if not mariadb.available():
        pytest.skip("no MariaDB binaries (scripts/ensure_mariadb.sh installs them)")
    db = mariadb.MariaDB().start()
    db.add_user("tfx", PASSWORD)
    db.add_user("nobody", PASSWORD, grant=None)
    yield db
    db.stop()


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": ROOT, "DEEPSEEK_TFX_MYSQL_PASSWORD": PASSWORD, **extra}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env or _env(), **kw)


def _finish(proc, timeout=1500):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _run_args(run_dir, url, data_params):
    return ["run", "--run-dir", str(run_dir), "--metadata-mysql", url, *TINY,
            "--data-params", json.dumps(data_params), "--thresholds", json.dumps(GATE)]


@pytest.fixture(scope="module")
def two_runs(server, tmp_path_factory):
    """Two `run`s started together on one fresh database (different data,
    so neither can reuse the other's executions)."""
    url = server.url("tfx", "mlmd_shared")
    base = tmp_path_factory.mktemp("mysql")
    dirs = [base / "a", base / "b"]
    params = [{"order": 1, "temperature": 0.5}, {"order": 1, "temperature": 0.6}]
    started = time.perf_counter()
    procs = [_cli(*_run_args(d, url, p)) for d, p in zip(dirs, params)]
    results = [_finish(p) for p in procs]
    return {"url": url, "dirs": dirs, "params": params, "results": results,
            "seconds": time.perf_counter() - started}


def _info(url):
    from app.inspect_metadata import collect
    from pipeline.metadata_store import MetadataTarget

    os.environ["DEEPSEEK_TFX_MYSQL_PASSWORD"] = PASSWORD
    return collect(MetadataTarget.of(mysql_url=url))


def test_two_concurrent_runs_on_one_new_database_both_push(two_runs):
    for code, out, err in two_runs["results"]:
        assert code == 0, (out[-2000:], err[-2000:])
        assert "Model blessed and pushed" in out
    info = _info(two_runs["url"])
    assert len(info["runs"]) == 2
    pushed = [a for a in info["artifacts"] if a["type"] == "PushedModel" and a["properties"]["pushed"] == 1]
    assert len(pushed) == 2
    states = [e["state"] for e in info["executions"]]
    # Two runs sharing one store may reuse each other's identical executions
    # (TFX's cache); none may fail or be left running.
    assert set(states) <= {"COMPLETE", "CACHED"}, states
    assert states.count("COMPLETE") >= len(states) // 2, states
    for run_dir in two_runs["dirs"]:
        assert not os.path.exists(run_dir / "metadata.sqlite")  # nothing went to SQLite
        assert len(os.listdir(run_dir / "serving")) == 1


def test_the_password_is_written_nowhere(server, two_runs):
    """TFX logs the connection config (password included) at INFO: masked
    in the run's log; and ML Metadata itself holds no copy."""
    dump = subprocess.run(["mariadb-dump", "--no-defaults", f"--socket={server.socket}", "-uroot",
                           "mlmd_shared"], capture_output=True, check=True).stdout
    assert b"Artifact" in dump and PASSWORD.encode() not in dump
    logs = [name for d in two_runs["dirs"] for name in os.listdir(d / "logs")]
    assert logs
    for run_dir in two_runs["dirs"]:
        for folder, _, files in os.walk(run_dir):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    assert PASSWORD.encode() not in f.read(), os.path.join(folder, name)


def test_inspect_shows_the_lineage_from_mysql(two_runs):
    proc = _cli("inspect", "--metadata-mysql", two_runs["url"], "--json")
    code, out, err = _finish(proc, 300)
    assert code == 0, err[-2000:]
    info = json.loads(out)
    assert info["metadata_path"] == two_runs["url"]
    types = [step["type"] for step in info["lineage"]]
    assert types[0] == "PushedModel" and "Model" in types and "Examples" in types
    by_type = {step["type"]: step for step in info["lineage"]}
    assert by_type["Model"]["produced_by"] == "Trainer"


def test_generate_uses_the_model_the_store_records_as_pushed(two_runs):
    info = _info(two_runs["url"])
    newest = max((a for a in info["artifacts"] if a["type"] == "PushedModel"), key=lambda a: a["id"])
    proc = _cli("generate", "--metadata-mysql", two_runs["url"], "--run-dir", "/nonexistent",
                "--prompt", "1,2,3", "--max-new-tokens", "4")
    code, out, err = _finish(proc, 300)
    assert code == 0, err[-2000:]
    version = os.path.basename(newest["properties"]["pushed_destination"].rstrip("/"))
    assert out.splitlines()[0] == f"model version {version}"
    assert len(json.loads(out.splitlines()[1].split("->")[1])) == 4


def test_cached_rerun_reuses_the_shared_stores_executions(two_runs):
    run_dir, params = two_runs["dirs"][0], two_runs["params"][0]
    code, out, err = _finish(_cli(*_run_args(run_dir, two_runs["url"], params)))
    assert code == 0, (out[-2000:], err[-2000:])
    assert "nothing new pushed" in out and len(os.listdir(run_dir / "serving")) == 1
    info = _info(two_runs["url"])
    assert len(info["runs"]) == 3
    latest = max(info["runs"], key=lambda r: r["created"])["name"]
    from app.run_report import run_outcome
    from pipeline.metadata_store import MetadataTarget

    states = run_outcome(MetadataTarget.of(mysql_url=two_runs["url"]), latest).states
    for component in ("SyntheticTokenExampleGen", "StatisticsGen", "CuratedSchemaGen",
                      "ExampleValidator", "DataValidationGate", "Trainer", "IntegrationValidator"):
        assert states[component] == "CACHED", (component, states)


@pytest.mark.parametrize("case", ["wrong_password", "unreachable", "no_permission"])
def test_store_refusals_are_one_line_and_run_nothing(server, tmp_path, capfd, monkeypatch, case):
    from app.cli import main

    url, env = server.url("tfx", "mlmd_refused"), _env()
    expected = {"wrong_password": "refused the login of 'tfx': wrong password",
                "unreachable": "cannot reach the server",
                "no_permission": "'nobody' has no permission to create or use database"}[case]
    if case == "wrong_password":
        env["DEEPSEEK_TFX_MYSQL_PASSWORD"] = "not-it"
    elif case == "unreachable":
        url = f"mysql://tfx@127.0.0.1:{mariadb.free_port()}/mlmd_refused"
    else:
        url = server.url("nobody", "mlmd_refused")
    code, out, err = _finish(_cli("run", "--run-dir", str(tmp_path / "run"), "--metadata-mysql", url,
                                  *TINY, env=env), 300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and not out.strip(), (out, err)
    assert expected in lines[0] and url in lines[0], lines
    assert not os.path.exists(tmp_path / "run" / "pipeline_root")
    # inspect and generate (in this process; fd-level capture sees MLMD's C++ log too)
    monkeypatch.setenv("DEEPSEEK_TFX_MYSQL_PASSWORD", env["DEEPSEEK_TFX_MYSQL_PASSWORD"])
    for command in (["inspect", "--metadata-mysql", url],
                    ["generate", "--metadata-mysql", url, "--prompt", "1"]):
        capfd.readouterr()
        code = main(command)
        out, err = capfd.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and not out.strip(), (command, out, err)
        assert expected in lines[0] and url in lines[0], (command, lines)


def test_unix_socket_option_reaches_the_same_server(server):
    from pipeline.metadata_store import MetadataTarget

    os.environ["DEEPSEEK_TFX_MYSQL_PASSWORD"] = PASSWORD
    target = MetadataTarget.of(mysql_url=server.url("tfx", "mlmd_socket", via_socket=True))
    assert target.mysql.unix_socket == server.socket
    target.check()  # creates the database and the MLMD schema
    assert "mlmd_socket" in server.sql("SHOW DATABASES").stdout.split()
    assert target.open().get_artifact_types() == []


def test_every_int_property_the_pipeline_records_fits_mlmds_mysql_schema(tmp_path):
    """MLMD's MySQL schema stores int properties as 32-bit INT (SQLite:
    64-bit); the ExampleGen's default eval_start_index (2**40) made every
    run on MySQL fail registering its first execution."""
    from tfx.dsl.compiler import compiler

    from pipeline.pipeline import create_pipeline
    from pipeline.settings import PipelineSettings

    ir = compiler.Compiler().compile(create_pipeline(PipelineSettings(run_dir=str(tmp_path))))
    ints = []

    def walk(message):
        for field, value in message.ListFields():
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                children = [v for v in value.values() if hasattr(v, "ListFields")]
            elif field.message_type is not None:
                children = list(value) if field.label == field.LABEL_REPEATED else [value]
            else:
                children = []
                if field.name == "int_value":
                    ints.append(value)
            for child in children:
                walk(child)

    for node in ir.nodes:
        walk(node.pipeline_node.parameters)
    assert ints and max(abs(v) for v in ints) < 2 ** 31, sorted(ints)[-3:]


@pytest.mark.parametrize("url, match", [
    ("postgres://u@h/db", "not a mysql://"),
    ("mysql://u:pw@h:3306/db", "not in the URL"),
    ("mysql://h:3306/db", "names no user"),
    ("mysql://u@h:3306/", "database name"),
    ("mysql://u@h:3306/db?ssl=1", "unknown option"),
])
def test_bad_mysql_urls_are_invalid_settings(url, match):
    from pipeline.settings import PipelineSettings, SettingsError

    with pytest.raises(SettingsError, match=match):
        PipelineSettings(metadata_mysql=url)
