"""The routed experts per device (training/expert_parallel.py) on 8 virtual
CPU devices, one DeepSeekMoE layer in a child process
(tests/support/expert_parallel_child.py): on the 8 x 1, 2 x 4 and 1 x 8
meshes the output, the gradients (tokens, expert weights, router), the
expert load and the balance loss equal the single-device code and the dense
reference; an extra all-to-all round runs exactly when a device would
overflow the capacity, and a router that sends every token to one device's
experts loses nothing."""

import subprocess

import numpy as np
import pytest

from training import launch

pytestmark = pytest.mark.integration

ARRAYS = ("loss", "out", "grad_x", "grad_gate_proj", "grad_up_proj", "grad_down_proj",
          "grad_router")
MESHES = ("mesh_8x1", "mesh_2x4", "mesh_1x8", "mesh_2x4_kept")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep") / "cases.npz"
    env = launch.worker_env(8)
    subprocess.run([launch.engine_python(env), "-m", "tests.support.expert_parallel_child",
                    str(out)], check=True, cwd=launch.ROOT, env=env, timeout=1200)
    with np.load(out) as f:
        flat = {k: f[k] for k in f.files}
    result = {}
    for key, value in flat.items():
        case, name = key.split("/")
        result.setdefault(case, {})[name] = value
    return result


def _assert_same(a, b, what):
    for name in ARRAYS:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5,
                                   err_msg=f"{what}: {name}")
    np.testing.assert_array_equal(a["load"], b["load"], err_msg=f"{what}: load")
    assert float(a["tokens"]) == float(b["tokens"]), what


def test_single_device_code_equals_the_dense_reference(cases):
    for name in ARRAYS:
        np.testing.assert_allclose(cases["reference"][name], cases["dense"][name],
                                   rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("mesh", MESHES)
def test_per_device_dispatch_equals_one_device_and_dense(cases, mesh):
    _assert_same(cases[mesh], cases["reference"], mesh)
    for name in ARRAYS:
        np.testing.assert_allclose(cases[mesh][name], cases["dense"][name], rtol=1e-4,
                                   atol=1e-5, err_msg=f"{mesh} vs dense: {name}")
    ref = cases["reference"]
    assert ref["load"].sum() == ref["tokens"] * 2  # top-2 of every real token, pads none
    assert ref["tokens"] == 8 * 12 - 3 * 4


def test_extra_round_exactly_when_a_device_overflows_the_capacity(cases):
    at, over, kept = cases["at_capacity"], cases["over_capacity"], cases["over_capacity_kept"]
    assert int(at["overflow"]) == 0 and int(over["overflow"]) == 1, (
        int(at["capacity_rows"]), int(over["capacity_rows"]))
    assert int(kept["overflow"]) == 1
    _assert_same(at, cases["reference"], "at capacity")
    _assert_same(over, cases["reference"], "over capacity")
    _assert_same(kept, cases["reference"], "over capacity, first round's activations kept")


def test_router_forced_onto_one_device_loses_no_assignment(cases):
    forced, ref = cases["forced_ep4"], cases["forced_reference"]
    real = ref["tokens"]
    np.testing.assert_array_equal(ref["load"], [real, real] + [0] * 6)
    # A full sequence's 24 assignments to one destination in chunks of
    # ceil(1.5 * 12 * 2 / 4) = 9 rows: 3 rounds, 2 of them extra.
    assert int(forced["overflow"]) == 2
    _assert_same(forced, ref, "forced onto experts 0 and 1")
    assert int(cases["forced_ep4_kept"]["overflow"]) == 2
    _assert_same(cases["forced_ep4_kept"], ref, "forced, first round's activations kept")
