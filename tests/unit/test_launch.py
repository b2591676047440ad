"""The engine child's lifecycle (training.launch): it dies with its parent,
gets the parent's SIGTERM, is killed when hung (optional), survives bytes
that are not UTF-8, and every failure is one paragraph naming the cause,
the exit status and the log."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from training import compile_cache, launch
from training.checkpoint import CheckpointMismatchError
from training.parallel import MeshError
from training.worker import ENGINE_ERROR_EXIT, named_error

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child(tmp_path, code, log=True):
    return launch.spawn([sys.executable, "-c", textwrap.dedent(code)], str(tmp_path), dict(os.environ),
                        log_path=str(tmp_path / "engine.log") if log else None)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_dead(pid, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_the_child_dies_with_its_parent(tmp_path):
    script_child = "import time; time.sleep(600)"
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, sys, time
            sys.path.insert(0, {ROOT!r})
            from training import launch
            child = launch.spawn([sys.executable, "-c", {script_child!r}], {str(tmp_path)!r},
                                 dict(os.environ))
            print(child.pid, flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert _alive(child_pid)
    assert os.getpgid(child_pid) == child_pid  # its own process group
    parent.kill()
    parent.wait()
    assert _wait_dead(child_pid), "the engine child outlived its killed parent"


def test_sigterm_to_the_parent_reaches_the_child_first(tmp_path):
    marker = tmp_path / "child-got-sigterm"
    child = textwrap.dedent(f"""
        import signal, sys, time
        def bye(*_):
            open({str(marker)!r}, "w").close()
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("engine: ready", flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, sys
            sys.path.insert(0, {ROOT!r})
            from training import launch
            child = launch.spawn([sys.executable, "-c", {child!r}], {str(tmp_path)!r}, dict(os.environ))
            launch.wait_worker(child, log_fn=lambda line: print(line, flush=True))
            print("parent: after the child", flush=True)
        """)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "engine: ready"
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=30)
    assert marker.exists()  # forwarded: the child ran its handler
    assert parent.returncode == -signal.SIGTERM  # then the parent's own default action


def test_a_hung_child_is_killed_after_the_stall_timeout(tmp_path):
    proc = _child(tmp_path, """
        import time
        print("engine: started", flush=True)
        time.sleep(600)
    """)
    started = time.monotonic()
    with pytest.raises(launch.EngineFailed) as info:
        launch.wait_worker(proc, log_fn=lambda line: None, stall_timeout_s=2)
    assert time.monotonic() - started < 60
    message = str(info.value)
    assert "printed nothing for 2 s and was killed as hung" in message
    assert str(tmp_path / "engine.log") in message and "\n" not in message
    assert not _alive(proc.pid)


def test_exit_minus_9_is_explained(tmp_path):
    proc = _child(tmp_path, """
        import os, signal
        print("engine: allocating", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    with pytest.raises(launch.EngineFailed) as info:
        launch.wait_worker(proc, log_fn=lambda line: None)
    message = str(info.value)
    assert "killed (SIGKILL), most likely by the out-of-memory killer" in message
    assert "exit status -9" in message and str(tmp_path / "engine.log") in message
    assert "\n" not in message
    assert "engine: allocating" in (tmp_path / "engine.log").read_text()


def test_bytes_that_are_not_utf8_do_not_kill_a_healthy_child(tmp_path):
    proc = _child(tmp_path, """
        import sys
        sys.stdout.buffer.write(b"library noise \\xff\\xfe\\n")
        sys.stdout.buffer.write(b"step 1/1 | loss 1.0 \\xc3\\n")
        sys.stdout.flush()
    """)
    lines = []
    launch.wait_worker(proc, log_fn=lines.append)
    assert proc.returncode == 0 and lines == ["step 1/1 | loss 1.0 \ufffd"]
    assert "library noise" in (tmp_path / "engine.log").read_text()


def test_an_unnamed_failure_is_one_paragraph_with_the_last_line(tmp_path):
    proc = _child(tmp_path, """
        raise RuntimeError("something specific broke")
    """)
    with pytest.raises(launch.EngineFailed) as info:
        launch.wait_worker(proc, log_fn=lambda line: None)
    message = str(info.value)
    assert message.startswith("the training engine failed: RuntimeError: something specific broke")
    assert "exit status 1" in message and "\n" not in message
    assert "Traceback" in (tmp_path / "engine.log").read_text()


@pytest.mark.parametrize("error, expected", [
    (MeshError("expert_parallel 3 does not divide the 8 devices"), "the device mesh cannot run this training"),
    (CheckpointMismatchError("differing: ['optimizer']"), "the checkpoint does not fit this training"),
    (EOFError("the token stream ended after 3 of 10 micro-batches"), "the training batches ended early"),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB"),
     "out of device memory (RESOURCE_EXHAUSTED)"),
])
def test_named_engine_errors(tmp_path, error, expected):
    message = named_error(error)
    assert message.startswith(expected)
    line = f"engine error: {message}"
    proc = _child(tmp_path, f"""
        import sys
        print("Traceback (most recent call last): ...", file=sys.stderr)
        print({line!r}, flush=True)
        sys.exit({ENGINE_ERROR_EXIT})
    """)
    with pytest.raises(launch.EngineFailed) as info:
        launch.wait_worker(proc, log_fn=lambda line: None)
    text = str(info.value)
    assert text.startswith(expected) and f"exit status {ENGINE_ERROR_EXIT}" in text and "\n" not in text


def test_the_real_worker_reports_a_mesh_error_in_one_paragraph(tmp_path):
    from model import get_preset

    spec = {"model_config": get_preset("tiny").to_dict(),
            "engine": {"batch_size": 4, "seq_len": 8, "train_steps": 1, "expert_parallel": 2},
            "tokens": str(tmp_path / "none.npy"), "output_dir": str(tmp_path / "out")}
    with pytest.raises(launch.EngineFailed) as info:
        launch.run_worker(spec, str(tmp_path / "spec.json"), launch.worker_env(1), log_fn=lambda l: None)
    message = str(info.value)
    assert message.startswith("the device mesh cannot run this training: expert_parallel 2"), message
    assert f"exit status {ENGINE_ERROR_EXIT}" in message and str(tmp_path / "engine.log") in message
    assert "Traceback" in (tmp_path / "engine.log").read_text()
    json.loads((tmp_path / "spec.json").read_text())


@pytest.mark.parametrize("value, expected", [
    (None, os.path.expanduser("~/.cache/deepseek-tfx/jax-compilation")),
    ("", os.path.expanduser("~/.cache/deepseek-tfx/jax-compilation")),
    ("off", None), ("OFF", None), ("0", None),
    ("~/jaxc", os.path.expanduser("~/jaxc")), ("rel/dir", os.path.abspath("rel/dir")),
])
def test_the_compilation_cache_directory_comes_from_the_environment(value, expected):
    env = {} if value is None else {compile_cache.CACHE_ENV: value}
    assert compile_cache.cache_dir(env) == expected


class _YieldingStdout:
    """A stdout whose every write gives other threads the GIL, as a pipe
    write may: lines written in more than one call then interleave."""

    def __init__(self):
        self.parts = []

    def write(self, text):
        time.sleep(0)
        self.parts.append(text)
        time.sleep(0)

    def flush(self):
        pass


def test_engine_lines_from_two_threads_stay_whole(monkeypatch):
    """The worker logs from its training loop and its checkpoint writer's
    thread; every line must reach the Trainer whole (a merged "checkpoint
    step N" was never mirrored). With print() in place of emit this fails:
    print writes the text and the newline in two calls."""
    import threading

    from training import worker

    out = _YieldingStdout()
    monkeypatch.setattr(sys, "stdout", out)
    write = worker.emit

    def lines(name):
        for i in range(300):
            write(f"{name} {i}")

    threads = [threading.Thread(target=lines, args=(name,)) for name in ("step", "checkpoint step")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = "".join(out.parts).splitlines()
    assert sorted(got) == sorted(f"{n} {i}" for n in ("step", "checkpoint step") for i in range(300))
