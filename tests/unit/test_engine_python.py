"""Which interpreter runs the engine (training.launch): the caller's
override, else the checkout's .venv-engine, else the caller's own; and the
child's PYTHONPATH for each."""

import os
import sys

import pytest

from training import launch

pytestmark = pytest.mark.unit


@pytest.fixture
def engine_venv(tmp_path, monkeypatch):
    venv = tmp_path / ".venv-engine"
    monkeypatch.setattr(launch, "ENGINE_VENV", str(venv))
    monkeypatch.delenv(launch.ENGINE_PYTHON, raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere/site-packages")
    return venv


def _make_python(venv):
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    return str(venv / "bin" / "python")


def test_without_engine_venv_the_callers_python_gets_the_checkout_first(engine_venv):
    assert launch.engine_python() == sys.executable
    env = launch.worker_env()
    assert env["PYTHONPATH"].split(os.pathsep) == [launch.ROOT, "/elsewhere/site-packages"]


def test_the_engine_venv_gets_the_checkout_and_nothing_of_the_callers(engine_venv, monkeypatch):
    python = _make_python(engine_venv)
    monkeypatch.setenv("VIRTUAL_ENV", "/work/.venv")
    assert launch.engine_python() == python
    env = launch.worker_env(2)
    assert env["PYTHONPATH"] == launch.ROOT and "VIRTUAL_ENV" not in env
    assert env["KERAS_BACKEND"] == "jax"
    assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"]


def test_the_override_wins_and_keeps_its_own_path(engine_venv, monkeypatch):
    _make_python(engine_venv)
    monkeypatch.setenv(launch.ENGINE_PYTHON, "/opt/engine/bin/python")
    assert launch.engine_python() == "/opt/engine/bin/python"
    assert launch.worker_env()["PYTHONPATH"] == "/elsewhere/site-packages"
    # ... also when given as an extra variable of the child
    monkeypatch.delenv(launch.ENGINE_PYTHON)
    env = launch.worker_env(extra={launch.ENGINE_PYTHON: "/opt/engine/bin/python"})
    assert env["PYTHONPATH"] == "/elsewhere/site-packages"
    assert launch.engine_python(env) == "/opt/engine/bin/python"
