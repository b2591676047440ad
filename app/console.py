"""Where the output of `deepseek-tfx run` goes.

The terminal gets our lines only: what the CLI prints (components starting
and finishing, the verdict) and what our components print through Python's
`sys.stdout` (the Trainer's progress, the gate's report), indented under
their component. Everything else -- warnings issued while TFX, Beam and the
Google clients import, absl/TFX logging, TensorFlow's C++ lines, which C++
writes straight to file descriptor 2 -- goes to a log file, together with a
copy of our lines and the traceback of a failed run. That is why the
redirection is done on the file descriptors (os.dup2) and before anything
heavy is imported. With `verbose` nothing is redirected: the third-party
output stays on the terminal and the log holds our lines and the traceback.

A component whose output should reach the terminal prints it (or forwards a
child process's lines with print); a child that inherits file descriptor 1
writes into the log.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import time
import traceback
from typing import IO, List, Optional

# TFX's LocalDagRunner (tfx/orchestration/local/local_dag_runner.py) logs
# these through absl for every node; the launcher logs the cache hit between them.
_STARTED = "Component %s is running."
_FINISHED = "Component %s is finished."
_CACHED = "A cached execution %d is used."
INDENT = "    "


class _OurStdout(io.TextIOBase):
    """sys.stdout while a run is redirected: each line to the log and,
    indented, to the terminal."""

    def __init__(self, console: "RunConsole"):
        self._console = console
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._console.component_line(line)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._console.component_line(self._partial)
            self._partial = ""
        self._console.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # A child given sys.stdout writes to the terminal, as our output.
        return self._console.terminal_fd


class _ComponentEvents(logging.Handler):
    """Turns LocalDagRunner's per-node log records into our start/finish
    lines and remembers which component is running (the one a failure names)."""

    def __init__(self, console: "RunConsole"):
        super().__init__(level=logging.INFO)
        self._console = console
        self.running: Optional[str] = None
        self.finished: List[str] = []
        self._started_at = 0.0
        self._cached = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.msg == _STARTED and record.args:
                self.running, self._started_at, self._cached = str(record.args[0]), time.monotonic(), False
                self._console.say(f"{self.running} ...")
            elif record.msg == _CACHED and self.running:
                self._cached = True
            elif record.msg == _FINISHED and record.args:
                name = str(record.args[0])
                how = "cached" if self._cached else f"{time.monotonic() - self._started_at:.1f} s"
                self._console.say(f"{name} done ({how})")
                self.finished.append(name)
                self.running = None
        except Exception:  # a progress line must never break the run
            self.handleError(record)


class RunConsole:
    """Context manager around one `run`. Output is held in a temporary log
    until `attach(path)` names the real one (the run directory must not be
    created before the settings are known to be valid)."""

    def __init__(self, verbose: bool = False, terminal: Optional[IO[str]] = None):
        self.verbose = verbose
        self._terminal_arg = terminal
        self.log_path: Optional[str] = None
        self.events: Optional[_ComponentEvents] = None

    # ------------------------------------------------------------ set-up
    def __enter__(self) -> "RunConsole":
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved_out, self._saved_err = os.dup(1), os.dup(2)
        self.terminal_fd = self._saved_out
        self.terminal = self._terminal_arg or open(os.dup(self._saved_out), "w", buffering=1,
                                                   encoding="utf-8", errors="replace")
        self.terminal_err = open(os.dup(self._saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
        self._log = tempfile.TemporaryFile(mode="w+", buffering=1, encoding="utf-8", errors="replace")
        if not self.verbose:
            os.dup2(self._log.fileno(), 1)
            os.dup2(self._log.fileno(), 2)
        self._saved_stdout = sys.stdout
        sys.stdout = _OurStdout(self)
        return self

    def attach(self, path: str) -> str:
        """Moves what was logged so far into `path` and logs there from now on."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._sync()
        final = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
        self._log.seek(0)
        final.write(self._log.read())
        final.flush()
        if not self.verbose:
            os.dup2(final.fileno(), 1)
            os.dup2(final.fileno(), 2)
        self._log.close()
        self._log, self.log_path = final, path
        return path

    def watch_components(self) -> None:
        """Shows components as LocalDagRunner starts and finishes them.
        absl's logger must pass INFO for those records to exist; they also
        make the log file the full account of the run."""
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO)
        self.events = _ComponentEvents(self)
        logging.getLogger("absl").addHandler(self.events)

    def __exit__(self, *exc) -> None:
        if isinstance(sys.stdout, _OurStdout):
            sys.stdout.flush()
        sys.stdout = self._saved_stdout
        if self.events is not None:
            logging.getLogger("absl").removeHandler(self.events)
        self._sync()
        os.dup2(self._saved_out, 1)
        os.dup2(self._saved_err, 2)
        os.close(self._saved_out)
        os.close(self._saved_err)
        self._log.close()
        if self._terminal_arg is None:
            self.terminal.close()
        self.terminal_err.close()

    # ------------------------------------------------------------ output
    def _sync(self) -> None:
        # Python-level buffers that write into fds 1/2 (sys.stderr, warnings).
        sys.stderr.flush()
        self._log.flush()

    def flush(self) -> None:
        self.terminal.flush()
        self.terminal_err.flush()
        self._log.flush()

    def _write_log(self, line: str) -> None:
        sys.stderr.flush()  # keep the order of our lines and third-party ones
        self._log.write(line + "\n")

    def say(self, line: str = "", error: bool = False) -> None:
        """One of our lines: terminal (stderr when `error`) and log."""
        stream = self.terminal_err if error else self.terminal
        stream.write(line + "\n")
        stream.flush()
        self._write_log(line)

    def component_line(self, line: str) -> None:
        """A line a component printed."""
        self.terminal.write((INDENT + line if line else line) + "\n")
        self.terminal.flush()
        self._write_log(line)

    def log_exception(self, error: BaseException) -> None:
        """The traceback, to the log only."""
        self._write_log("".join(traceback.format_exception(type(error), error, error.__traceback__)))
