"""Quiet one-answer commands (`generate`, `inspect`): third-party noise on
stderr (TensorFlow's C++ and XLA start-up lines, absl's pre-init notice,
library FutureWarnings and TFMA's deprecation notices) is dropped at the
file descriptor, where C++ writes it; our own lines go to the real stderr.
`run` keeps its own console (app/console.py), which logs the same
output to a file instead."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings


@contextlib.contextmanager
def quiet_stderr():
    """Yields a text stream on the terminal's stderr while fd 2 goes to
    /dev/null; restores fd 2 on the way out (also on an exception, so a
    traceback is still seen)."""
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = open(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield terminal
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()
