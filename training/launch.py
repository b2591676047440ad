"""Starting the engine in a child process (the caller may have TensorFlow
loaded; Keras' backend is fixed per process). Used by the Trainer adapter,
the benchmarks and the tests."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
from typing import Callable, Dict, Iterable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# An interpreter of the caller's choice for the engine (the GPU image's
# JAX-CUDA venv, docker/Dockerfile.gpu). Without it: the engine's own venv of
# this checkout (scripts/bootstrap.sh, requirements/engine-lock.txt) when it
# exists, else this interpreter.
ENGINE_PYTHON = "DEEPSEEK_TFX_ENGINE_PYTHON"
ENGINE_VENV = os.path.join(ROOT, ".venv-engine")


def engine_python(env: Optional[Dict[str, str]] = None) -> str:
    """The interpreter that runs the engine: $DEEPSEEK_TFX_ENGINE_PYTHON,
    else .venv-engine/bin/python of this checkout, else this one."""
    env = os.environ if env is None else env
    if env.get(ENGINE_PYTHON):
        return env[ENGINE_PYTHON]
    venv_python = os.path.join(ENGINE_VENV, "bin", "python")
    return venv_python if os.path.exists(venv_python) else sys.executable


class EngineFailed(RuntimeError):
    """The engine process exited non-zero; the message carries its last lines."""


class TrainingDivergedError(EngineFailed):
    """The loss became NaN/inf; the message names the step."""


def worker_env(virtual_devices: Optional[int] = None,
               extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The child's environment: KERAS_BACKEND=jax, the project on PYTHONPATH
    (unless $DEEPSEEK_TFX_ENGINE_PYTHON has it installed), and optionally
    N virtual CPU devices (XLA_FLAGS must be set before JAX is imported,
    hence in the child)."""
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    chosen = {**env, **(extra or {})}
    if engine_python(chosen) == sys.executable:  # the project from this checkout
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    elif not chosen.get(ENGINE_PYTHON):
        # The engine venv: this checkout only; the caller's other entries
        # belong to its own interpreter (another Python version).
        env["PYTHONPATH"] = ROOT
        for name in ("PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(name, None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if virtual_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count="
                                             f"{int(virtual_devices)}"])
    env.update(extra or {})
    return env


def start_worker(spec: dict, spec_path: str, env: Dict[str, str], stdin=None) -> subprocess.Popen:
    os.makedirs(os.path.dirname(os.path.abspath(spec_path)), exist_ok=True)
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    python = engine_python(env)
    # With another interpreter the working directory must not shadow its
    # site-packages (python -m puts the cwd first on sys.path).
    cwd = ROOT if python == sys.executable else os.path.dirname(os.path.abspath(spec_path))
    return subprocess.Popen([python, "-u", "-m", "training.worker", spec_path], cwd=cwd, env=env, stdin=stdin,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)


# Lines of the child's output that are its own (the rest is library noise,
# kept for the error message).
_ENGINE_PREFIXES = ("engine:", "step ", "checkpoint step", "resuming from", "training diverged")


def wait_worker(proc: subprocess.Popen, log_fn: Callable[[str], None] = print) -> None:
    tail = collections.deque(maxlen=40)
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail.append(line)
        if line.startswith(_ENGINE_PREFIXES):
            log_fn(line)
    if proc.wait() != 0:
        from training.worker import DIVERGED_EXIT

        if proc.returncode == DIVERGED_EXIT:
            raise TrainingDivergedError([l for l in tail if l.startswith("training diverged")][-1])
        raise EngineFailed(f"the training engine exited with status {proc.returncode}:\n"
                           + "\n".join(tail))


class BatchFeeder(threading.Thread):
    """Writes each batch's raw int32 bytes to the child's stdin (the worker's
    `"tokens": "stdin"`). A thread, so the caller keeps reading the child's
    stdout while a full pipe blocks the writes. A child that exits before
    reading everything (done, resumed at the end, or crashed) breaks the
    pipe: that ends the feed quietly, the child's exit status tells what
    happened. Any other error (the data) is kept in `error`."""

    def __init__(self, pipe, batches: Iterable):
        super().__init__(name="engine-batch-feeder", daemon=True)
        self.pipe, self.batches = pipe, batches
        self.error: Optional[BaseException] = None
        self.written = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import numpy as np

        try:
            for batch in self.batches:
                if self.stop.is_set():
                    break
                self.pipe.write(np.ascontiguousarray(batch, np.int32).data)
                self.written += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        except BaseException as e:  # noqa: BLE001  (reported by run_worker)
            self.error = e
        finally:
            try:
                self.pipe.close()  # EOF for the child
            except OSError:
                pass


def run_worker(spec: dict, spec_path: str, env: Optional[Dict[str, str]] = None,
               log_fn: Callable[[str], None] = print, batches: Optional[Iterable] = None) -> dict:
    """Runs the engine to completion; returns its result.json. With
    `batches` (an iterable of [B, S] int arrays, for a spec with
    `"tokens": "stdin"`) a background thread streams them to the child."""
    if batches is None:
        proc = start_worker(spec, spec_path, env or worker_env())
        wait_worker(proc, log_fn)
    else:
        if spec.get("tokens") != "stdin":
            raise ValueError(f'run_worker: batches need spec["tokens"] == "stdin", '
                             f'got {spec.get("tokens")!r}')
        read_end, write_end = os.pipe()  # not inherited: the child's EOF comes with our close
        try:
            proc = start_worker(spec, spec_path, env or worker_env(), stdin=read_end)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        feeder = BatchFeeder(os.fdopen(write_end, "wb"), batches)
        feeder.start()
        try:
            wait_worker(proc, log_fn)
        except EngineFailed as failed:
            feeder.stop.set()
            feeder.join(timeout=60)
            if feeder.error is not None:  # the data ran out or broke: that is the cause
                raise feeder.error from failed
            raise
        finally:
            if proc.poll() is None:  # interrupted while the child runs
                proc.kill()
                proc.wait()
            feeder.stop.set()
        feeder.join(timeout=60)
    with open(os.path.join(spec["output_dir"], "result.json")) as f:
        return json.load(f)
