"""Starting the engine in a child process (the caller may have TensorFlow
loaded; Keras' backend is fixed per process). Used by the Trainer adapter,
the benchmarks and the tests.

The child's lifecycle is tied to ours: it gets SIGKILL when this process
dies (prctl PR_SET_PDEATHSIG, so a killed pod or Trainer leaves no engine
training on), runs in its own process group, and SIGINT / SIGTERM / SIGHUP
sent to us are forwarded to that group. Optionally a child that prints
nothing for `stall_timeout_s` is killed as hung. Its output is read as
UTF-8 with undecodable bytes replaced (a stray byte must not kill a healthy
run) and kept whole in `engine.log` beside the spec; every failure ends in
one paragraph (EngineFailed) naming the cause and that log.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
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
    """The engine process failed; the message is one paragraph: the cause,
    the exit status and the path of the engine's full log."""


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
        # First: XLA stops reading XLA_FLAGS at a token that is not a flag.
        env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count="
                                     f"{int(virtual_devices)}"] + flags)
    env.update(extra or {})
    return env


_PR_SET_PDEATHSIG = 1


def _tie_to_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn for the child: SIGKILL when the parent dies, and its own
    process group (signals to it reach the engine's helpers too)."""

    def preexec() -> None:
        os.setpgid(0, 0)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: no parent-death signal
            pass
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def spawn(argv, cwd: str, env: Dict[str, str], stdin=None, log_path: Optional[str] = None) -> subprocess.Popen:
    """A child tied to this process (see the module docstring), its stdout
    and stderr merged into one text pipe read as UTF-8 with replacement."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                            bufsize=1, preexec_fn=_tie_to_parent(os.getpid()))
    proc.log_path = log_path
    return proc


def start_worker(spec: dict, spec_path: str, env: Dict[str, str], stdin=None) -> subprocess.Popen:
    spec_path = os.path.abspath(spec_path)
    os.makedirs(os.path.dirname(spec_path), exist_ok=True)
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    python = engine_python(env)
    # With another interpreter the working directory must not shadow its
    # site-packages (python -m puts the cwd first on sys.path).
    cwd = ROOT if python == sys.executable else os.path.dirname(spec_path)
    return spawn([python, "-u", "-m", "training.worker", spec_path], cwd, env, stdin,
                 log_path=os.path.join(os.path.dirname(spec_path), "engine.log"))


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signals the child's process group (the child alone if it has none)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


class _ForwardSignals:
    """SIGINT / SIGTERM / SIGHUP to this process go to the child's group;
    once the child has exited, the signal's own action runs here (the
    previous handler, or the default: usually our exit). Only the main
    thread can install handlers; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.previous, self.received = proc, {}, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self._forward)
        return self

    def _forward(self, signum, frame) -> None:
        self.received = signum
        kill_group(self.proc, signum)

    def __exit__(self, *exc) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        if self.received is None:
            return
        previous = self.previous[self.received]
        if callable(previous):
            previous(self.received, None)  # e.g. Python's SIGINT handler: KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), self.received)


class _Watchdog(threading.Thread):
    """Kills the child's group when it has printed nothing for `timeout_s`."""

    def __init__(self, proc: subprocess.Popen, timeout_s: float):
        super().__init__(name="engine-watchdog", daemon=True)
        self.proc, self.timeout_s = proc, float(timeout_s)
        self.last_output = time.monotonic()
        self.fired = False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(min(self.timeout_s / 4, 5.0)):
            if time.monotonic() - self.last_output > self.timeout_s and self.proc.poll() is None:
                self.fired = True
                kill_group(self.proc)
                return


# Lines of the child's output that are its own (the rest is library noise,
# kept in the log).
_ENGINE_PREFIXES = ("engine:", "step ", "checkpoint step", "resuming from", "training diverged")


def failure_paragraph(returncode: int, tail, log_path: Optional[str], stalled_s: Optional[float] = None,
                      signalled: Optional[int] = None) -> str:
    """One paragraph for a failed engine: the cause, the status, the log."""
    from training.worker import ENGINE_ERROR_EXIT, ENGINE_ERROR_PREFIX

    lines = [line.strip() for line in tail if line.strip()]
    if stalled_s is not None:
        cause = (f"the training engine printed nothing for {stalled_s:.0f} s and was killed as hung "
                 f"(stall timeout)")
    elif signalled is not None:
        cause = f"the training engine was stopped by {signal.Signals(signalled).name}, forwarded from the Trainer"
    elif returncode == -signal.SIGKILL:
        cause = ("the training engine was killed (SIGKILL), most likely by the out-of-memory killer: "
                 "lower batch_size, seq_len or the model size, or give the Trainer more memory")
    elif returncode < 0:
        cause = f"the training engine was killed by {signal.Signals(-returncode).name}"
    elif returncode == ENGINE_ERROR_EXIT:
        found = [line[len(ENGINE_ERROR_PREFIX):].strip() for line in lines if line.startswith(ENGINE_ERROR_PREFIX)]
        cause = found[-1] if found else "the training engine reported an error"
    else:
        last = lines[-1] if lines else "no output"
        cause = f"the training engine failed: {last[:500]}"
    log = f"; the engine's full output: {log_path}" if log_path else ""
    return f"{cause} (exit status {returncode}{log})"


def wait_worker(proc: subprocess.Popen, log_fn: Callable[[str], None] = print,
                stall_timeout_s: Optional[float] = None,
                metrics_fn: Optional[Callable[[dict], None]] = None) -> None:
    """Forwards the child's own lines to log_fn, its metrics records
    (training.worker.METRICS_PREFIX lines) to metrics_fn as they come, and
    all of its output to its engine.log until it exits; EngineFailed (one
    paragraph) unless it succeeded. Signals to this process are forwarded
    to the child."""
    from training.worker import METRICS_PREFIX

    tail = collections.deque(maxlen=40)
    log_path = getattr(proc, "log_path", None)
    watchdog = _Watchdog(proc, stall_timeout_s) if stall_timeout_s else None
    if watchdog:
        watchdog.start()
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    forward = _ForwardSignals(proc)
    try:
        with forward:
            for line in proc.stdout:
                if watchdog:
                    watchdog.last_output = time.monotonic()
                if log:
                    log.write(line)
                    log.flush()
                line = line.rstrip("\n")
                if line.startswith(METRICS_PREFIX):
                    try:
                        record = json.loads(line[len(METRICS_PREFIX):])
                    except ValueError:  # cut by library noise on the same pipe: only a lost point
                        record = None
                    if record is not None and metrics_fn is not None:
                        metrics_fn(record)
                    continue
                tail.append(line)
                if line.startswith(_ENGINE_PREFIXES):
                    log_fn(line)
            proc.wait()
    finally:
        if watchdog:
            watchdog.done.set()
        if log:
            log.close()
    if proc.returncode != 0:
        from training.worker import DIVERGED_EXIT

        if proc.returncode == DIVERGED_EXIT and not (watchdog and watchdog.fired):
            raise TrainingDivergedError([l for l in tail if l.startswith("training diverged")][-1])
        raise EngineFailed(failure_paragraph(
            proc.returncode, tail, log_path, stall_timeout_s if watchdog and watchdog.fired else None,
            forward.received))


SLOW_EXIT_S = 5.0


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
               log_fn: Callable[[str], None] = print, batches: Optional[Iterable] = None,
               stall_timeout_s: Optional[float] = None,
               metrics_fn: Optional[Callable[[dict], None]] = None) -> dict:
    """Runs the engine to completion; returns its result.json. metrics_fn
    gets each of the engine's metrics records as it reports it. With
    `batches` (an iterable of [B, S] int arrays, for a spec with
    `"tokens": "stdin"`) a background thread streams them to the child.
    `stall_timeout_s`: kill the child as hung after that long without output."""
    if batches is None:
        proc = start_worker(spec, spec_path, env or worker_env())
        try:
            wait_worker(proc, log_fn, stall_timeout_s, metrics_fn)
        finally:
            if proc.poll() is None:  # interrupted while the child runs
                kill_group(proc)
                proc.wait()
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
            wait_worker(proc, log_fn, stall_timeout_s, metrics_fn)
        except EngineFailed as failed:
            feeder.stop.set()
            feeder.join(timeout=60)
            if feeder.error is not None:  # the data ran out or broke: that is the cause
                raise feeder.error from failed
            raise
        finally:
            if proc.poll() is None:  # interrupted while the child runs
                kill_group(proc)
                proc.wait()
            feeder.stop.set()
        # The child succeeded, so it read every batch: whatever the feeder
        # still does (ending its source) is not waited for.
    result_path = os.path.join(spec["output_dir"], "result.json")
    # Two make runs took ~54 s from the result to here: the feeder waiting on
    # tf.data for the end of its batches (fixed in trainer_input.stream_batches
    # and above: only the child is waited for now). Said if anything like it
    # happens again.
    lag = time.time() - os.path.getmtime(result_path)
    if lag > SLOW_EXIT_S:
        log_fn(f"engine: its process and output ended {lag:.0f} s after it wrote its result")
    with open(result_path) as f:
        return json.load(f)
