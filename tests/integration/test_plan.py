"""`deepseek-tfx plan`: the step compiled on virtual CPU devices, without
training, read back as the mesh, the bytes per device and the collectives;
bad input is one line naming the problem, before any compile."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "app.cli", "plan", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=900)


def test_plan_of_a_2x4_mesh_shows_sharded_experts_and_all_to_all():
    out = _plan("--preset", "tiny", "--model-overrides", '{"n_routed_experts": 8}',
                "--batch-size", "8", "--seq-len", "16", "--devices", "8", "--expert-parallel", "4",
                "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout)
    assert plan["mesh"] == {"batch": 2, "expert": 4} and plan["devices"] == 8
    b = plan["per_device_bytes"]
    assert b["parameters"] > 0 and b["temporaries"] > 0
    assert b["optimizer_state"] >= 2 * b["parameters"] - 4096  # AdamW: two moments each
    totals = plan["collectives_per_step"]["totals"]
    # Forward: counts + rows out + back; backward: rows and back again (the
    # recomputed round; the integer counts are shared) and their transposes.
    assert totals["all-to-all"]["count"] == 7
    assert totals["all-reduce"]["bytes"] > 0
    # Overflowing micro-batches run extra rounds of the same all-to-alls.
    assert {op["kind"] for op in plan["overflow_round_collectives"]} == {"all-to-all"}
    kept = _plan("--preset", "tiny", "--model-overrides", '{"n_routed_experts": 8}',
                 "--batch-size", "8", "--seq-len", "16", "--devices", "8", "--expert-parallel", "4",
                 "--no-dispatch-recompute", "--json")
    assert kept.returncode == 0, kept.stderr[-3000:]
    kept = json.loads(kept.stdout)
    assert kept["dispatch_recompute"] is False and plan["dispatch_recompute"] is True
    # Keeping the first round's activations: no recomputed round, 2 fewer.
    assert kept["collectives_per_step"]["totals"]["all-to-all"]["count"] == 5


def test_plan_rejects_a_mesh_that_cannot_hold_the_experts_in_one_line():
    out = _plan("--preset", "tiny", "--batch-size", "8", "--devices", "8",
                "--expert-parallel", "8")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "expert_parallel" in out.stderr and "does not divide" in out.stderr
