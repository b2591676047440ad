"""How many CPU devices the engine's JAX is given (XLA's host platform
devices, `--xla_force_host_platform_device_count`), decided before the
engine's process starts because the flag must precede the JAX import.

Why more than one on a CPU: the step is a graph of ~13,000 small ops, and one
device keeps 2 cores busy only about half the time (each op waits for the
previous ones). Data parallel over one device per core runs the same global
batch as independent halves side by side: the train_vs_reference step took
0.81x the time and the mini step 0.88x (same-process A/B, 2 cores;
benchmarks/README.md). The math is the same step: gradients and router loads
are summed over the devices.

The rule (`cpu_devices`):
- `TrainingSettings.cpu_devices` when given;
- else the count XLA_FLAGS already names (left as it is);
- else one per core this process may use (its affinity mask, capped by its
  cgroup's CPU quota: a pod's limit), at most `MAX_AUTO`, the largest
  such count that divides the batch and is a multiple of expert_parallel
  (expert_parallel itself where no count up to the cores fits); 1 in a
  multi-process job (each process brings its own devices there).
With an accelerator JAX trains on it and the CPU devices go unused.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, NamedTuple, Optional

FLAG = "--xla_force_host_platform_device_count"
# Measured up to 8 virtual devices (benchmarks/engine_scaling.py); a larger
# machine gets 8 until someone measures more.
MAX_AUTO = 8


class CpuDevices(NamedTuple):
    count: Optional[int]  # None: leave XLA_FLAGS as it is
    why: str


def cgroup_cpus(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The CPU quota of this process's cgroup in whole CPUs (rounded up), or
    None without one: a Kubeflow pod limited to 2 CPUs still sees every core
    of its node in its affinity mask."""
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 is none
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """The cores this process may use: its affinity mask, capped by its
    cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpus()
    return min(cores, quota) if quota else cores


def flag_count(xla_flags: str) -> Optional[int]:
    """The device count an XLA_FLAGS string names, or None."""
    for flag in xla_flags.split():
        if flag.startswith(FLAG + "="):
            return int(flag.split("=", 1)[1])
    return None


def cpu_devices(settings, env: Optional[Mapping[str, str]] = None,
                cores: Optional[int] = None) -> CpuDevices:
    """The engine's CPU device count for `settings` (a TrainingSettings)."""
    env = os.environ if env is None else env
    if settings.cpu_devices is not None:
        return CpuDevices(settings.cpu_devices, "cpu_devices setting")
    named = flag_count(env.get("XLA_FLAGS", ""))
    if named is not None:
        return CpuDevices(None, f"{named} named by XLA_FLAGS")
    if int(env.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1") or 1) > 1:
        return CpuDevices(1, "one per process of a multi-process job")
    cores = available_cores() if cores is None else cores
    step = settings.expert_parallel
    fits = [n for n in range(step, min(cores, MAX_AUTO) + 1, step) if settings.batch_size % n == 0]
    if not fits and step > 1 and settings.batch_size % step == 0:
        # Expert parallelism asked for more devices than cores: virtual ones.
        return CpuDevices(step, f"expert_parallel {step} on {cores} cores")
    if not fits:
        return CpuDevices(1, f"no count up to {min(cores, MAX_AUTO)} cores divides batch "
                             f"{settings.batch_size} in groups of expert_parallel {step}")
    return CpuDevices(max(fits), f"one per core of {cores}, dividing batch {settings.batch_size}")
