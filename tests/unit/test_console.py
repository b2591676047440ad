"""app.console in a child process (it rewires file descriptors 1 and 2):
what reaches the terminal and what goes to the log."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from app.console import RunConsole

    with RunConsole(verbose=sys.argv[2] == "verbose") as console:
        os.write(2, b"c-level noise before attach\\n")
        console.attach(sys.argv[1])
        console.say("our line")
        warnings.warn("third-party future", FutureWarning)
        os.write(1, b"c-level stdout noise\\n")
        os.write(2, b"c-level stderr noise\\n")
        console.watch_components()
        from absl import logging as absl_logging
        absl_logging.info("Component %s is running.", "Trainer")
        print("step 1/2 | loss 4.1")
        absl_logging.warning("absl chatter")
        absl_logging.info("Component %s is finished.", "Trainer")
        console.log_exception(ValueError("boom"))
    print("after the run")
""")


def _run(tmp_path, mode):
    log = tmp_path / "logs" / "run.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log), mode], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out, log.read_text()


def test_our_lines_on_the_terminal_everything_else_in_the_log(tmp_path):
    out, log = _run(tmp_path, "quiet")
    terminal = out.stdout + out.stderr
    assert "our line" in out.stdout
    assert "Trainer ..." in out.stdout and "Trainer done (" in out.stdout
    assert "    step 1/2 | loss 4.1" in out.stdout  # a component's print, indented under it
    assert "after the run" in out.stdout  # stdout is back once the run is over
    for noise in ("noise", "FutureWarning", "absl chatter", "Traceback", "boom"):
        assert noise not in terminal, noise
    for line in ("c-level noise before attach", "c-level stdout noise", "c-level stderr noise",
                 "FutureWarning: third-party future", "absl chatter", "our line", "step 1/2",
                 "ValueError: boom"):
        assert line in log, line
    assert log.index("our line") < log.index("c-level stderr noise")  # kept in order


def test_verbose_leaves_third_party_output_on_the_terminal(tmp_path):
    out, log = _run(tmp_path, "verbose")
    assert "c-level stderr noise" in out.stderr and "FutureWarning" in out.stderr
    assert "our line" in out.stdout and "    step 1/2" in out.stdout
    assert "our line" in log and "ValueError: boom" in log
