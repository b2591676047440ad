"""training.host_devices: how many CPU devices the Trainer gives the engine,
and that the engine's child sees exactly that many."""

import json
import subprocess

import pytest

from training import launch
from training.host_devices import MAX_AUTO, cpu_devices, flag_count
from training.settings import TrainingSettings, TrainingSettingsError


def _settings(**values):
    return TrainingSettings(**{"batch_size": 8, **values})


@pytest.mark.parametrize("cores, batch, expert_parallel, expected", [
    (2, 8, 1, 2),        # one per core
    (2, 3, 1, 1),        # 2 does not divide 3
    (4, 6, 1, 3),        # the largest count up to the cores that divides the batch
    (1, 8, 1, 1),
    (64, 64, 1, MAX_AUTO),
    (8, 8, 2, 8),        # multiples of expert_parallel
    (6, 12, 4, 4),
    (2, 8, 4, 4),        # expert parallel beyond the cores: virtual devices
    (2, 6, 4, 1),        # nothing fits: one device (the mesh plan names the problem)
])
def test_one_device_per_core_that_divides_the_batch(cores, batch, expert_parallel, expected):
    chosen = cpu_devices(_settings(batch_size=batch, expert_parallel=expert_parallel), env={},
                         cores=cores)
    assert chosen.count == expected, chosen.why


def test_the_setting_then_xla_flags_then_the_rule():
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x"}
    assert cpu_devices(_settings(cpu_devices=4), env=flags, cores=2).count == 4
    named = cpu_devices(_settings(), env=flags, cores=2)
    assert named.count is None and "XLA_FLAGS" in named.why  # left as it is
    assert flag_count(flags["XLA_FLAGS"]) == 8 and flag_count("--xla_dump_to=/x") is None
    multi = cpu_devices(_settings(), env={"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}, cores=2)
    assert multi.count == 1


@pytest.mark.parametrize("values, problem", [
    ({"cpu_devices": 0}, "cpu_devices: must be >= 1"),
    ({"cpu_devices": True}, "cpu_devices: must be an integer"),
    ({"cpu_devices": 3}, "cpu_devices: 3 must divide batch_size 8"),
    ({"cpu_devices": 2, "expert_parallel": 4}, "be a multiple of expert_parallel 4"),
])
def test_a_bad_cpu_devices_setting_is_refused_by_name(values, problem):
    with pytest.raises(TrainingSettingsError, match=problem):
        _settings(**values)


def test_the_engine_child_sees_the_chosen_devices_after_other_xla_flags(monkeypatch):
    """The count goes first in XLA_FLAGS: XLA stops reading at a token that
    is not a flag, so one such token before it used to cost the devices."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true not_a_flag=1")
    env = launch.worker_env(cpu_devices(_settings(cpu_devices=2)).count)
    probe = "import jax, json; print(json.dumps([jax.device_count(), jax.default_backend()]))"
    out = subprocess.run([launch.engine_python(env), "-c", probe], env={**env, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2, "cpu"]


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000\n"}, 2),                       # cgroup v2, a pod limited to 2 CPUs
    ({"cpu.max": "150000 100000\n"}, 2),                       # 1.5 CPUs: rounded up
    ({"cpu.max": "max 100000\n"}, None),                       # no limit
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path, files, expected):
    from training.host_devices import cgroup_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpus(str(tmp_path)) == expected
