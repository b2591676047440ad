"""Test support, not shipped: the fork server behind tests/support/kfp_local.py.

Every container task of a local KFP run is `python -m <entrypoint> ...`, and
each such process spends ~10 s importing TensorFlow, Beam, TFDV, TFMA and
TFX before any work. This process imports those modules once (the names on
its command line: the entrypoints and executor classes of the compiled spec),
then, for each request on stdin, forks a child that runs the requested module
as ``__main__`` the way ``python -m`` does: its own working directory,
environment, argv, and stdout/stderr appended to the task's log. The child is
a new process with a copy of the imports and nothing else shared; its exit
status is the task's. Nothing has run in this process before the fork but
imports, so no thread or TensorFlow runtime state is copied half-way.

Protocol (one JSON object per line): a request on stdin
``{"module", "args", "cwd", "env", "log", "timeout"}`` is answered on the
original stdout by ``{"rc": int, "timed_out": bool}`` once the child exits
(killed with SIGKILL past ``timeout`` seconds). ``{"ready": true}`` is written
first, once the imports are done. The server's own stdout and stderr
(import warnings) go to its stderr.
"""

import atexit
import importlib
import json
import logging
import os
import runpy
import signal
import sys
import time
import traceback


def _child(request) -> int:
    """Runs in the forked child; returns its exit status."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.path[0] = request["cwd"]  # what `python -m` puts first
    sys.argv = [request["module"], *request["args"]]
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what interpreter shutdown would run
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _wait(pid: int, timeout) -> dict:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"rc": os.waitstatus_to_exitcode(status), "timed_out": False}
        if deadline is not None and time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return {"rc": os.waitstatus_to_exitcode(status), "timed_out": True}
        time.sleep(0.05)


def main(modules) -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.path[0] = os.getcwd()  # as under `python -m`, not this file's directory
    for name in modules:
        importlib.import_module(name)
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                replies.close()
                code = _child(request)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        replies.write(json.dumps(_wait(pid, request.get("timeout"))) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
