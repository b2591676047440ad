"""The device mesh and sharding plan (keras.distribution on JAX).

Mesh axes ("batch", "expert"). Data parallel by default: every device on the
batch axis, expert axis of size 1. `expert_parallel = N` puts N devices on the
expert axis: the routed experts' weights [E, ...] (and, through Keras, their
optimizer moments, which take their variable's layout) are split into N
slices of E/N experts; everything else is replicated. Each global batch is
split over *all* devices (both axes), so the dense part stays data parallel
and XLA's SPMD partitioner moves tokens to the experts' devices.

Multi-host: `initialize_from_env()` calls `keras.distribution.initialize()`
when KERAS_DISTRIBUTION_NUM_PROCESSES > 1 (with KERAS_DISTRIBUTION_JOB_ADDRESSES
= the coordinator's host:port and KERAS_DISTRIBUTION_PROCESS_ID); the mesh then
spans the devices of every process.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from training.settings import experts_problem

# Routed-expert weights are expert-major [E, ...]; this matches their paths
# (".../mlp/experts_gate_proj") and their optimizer moments' names
# ("..._mlp_experts_gate_proj_momentum"), not the shared experts'. Whole-path
# form: Keras 3.15's LayoutMap matches with re.fullmatch (3.12: re.search).
EXPERT_WEIGHT_PATTERN = r".*mlp[/_]experts_(gate|up|down)_proj(_.*)?$"
MESH_AXES = ("batch", "expert")


class MeshError(ValueError):
    """A mesh that cannot hold this model or batch; raised before any compile."""


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    batch: int
    expert: int

    @property
    def devices(self) -> int:
        return self.batch * self.expert

    def to_dict(self) -> dict:
        return {"batch": self.batch, "expert": self.expert}


def plan_mesh(num_devices: int, expert_parallel: int, n_routed_experts: int,
              batch_size: int) -> MeshPlan:
    """The rules that need the device count (the settings' own are
    `training.settings.TrainingSettings`'): N must divide the devices (and,
    the one rule shared with the settings, the routed experts), and the
    batch must divide over all devices."""
    if num_devices % expert_parallel:
        raise MeshError(f"expert_parallel {expert_parallel} does not divide the {num_devices} "
                        f"devices")
    problem = experts_problem(expert_parallel, n_routed_experts)
    if problem:
        raise MeshError(f"expert_parallel {problem}")
    if batch_size % num_devices:
        raise MeshError(f"batch_size {batch_size} does not divide over the {num_devices} "
                        f"devices of the mesh (batch {num_devices // expert_parallel} x expert "
                        f"{expert_parallel}); use a multiple of {num_devices}")
    return MeshPlan(batch=num_devices // expert_parallel, expert=expert_parallel)


def initialize_from_env(seed: int) -> int:
    """Joins a multi-process job when the environment describes one; returns
    the number of processes. Must run before JAX touches a device. The seed
    is set first: every process initialises the same weights, and Keras
    skips its cross-process seed agreement (a pmap that gloo cannot start)."""
    processes = int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1") or 1)
    if processes > 1:
        import jax
        import keras

        if not os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES"):
            raise MeshError("KERAS_DISTRIBUTION_NUM_PROCESSES > 1 needs "
                            "KERAS_DISTRIBUTION_JOB_ADDRESSES (the coordinator's host:port)")
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator():
            # CPU processes talk through gloo (JAX's default has no CPU collectives).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from training.engine import set_seed

        set_seed(seed)
        keras.distribution.initialize()
    return processes


def _has_accelerator() -> bool:
    try:
        import jax_plugins  # noqa: F401  (the CUDA plugin wheel)

        return True
    except ImportError:
        return False


def make_distribution(plan: MeshPlan, devices: Optional[Sequence] = None):
    """keras.distribution.ModelParallel over the ("batch", "expert") mesh with
    the routed experts sharded on "expert"."""
    import jax
    import keras

    devices = list(devices if devices is not None else jax.devices())
    if len(devices) != plan.devices:
        raise MeshError(f"the mesh needs {plan.devices} devices, {len(devices)} given")
    mesh = keras.distribution.DeviceMesh(
        shape=(plan.batch, plan.expert), axis_names=MESH_AXES,
        devices=np.asarray(devices, dtype=object).reshape(plan.batch, plan.expert))
    layout_map = keras.distribution.LayoutMap(mesh)
    if plan.expert > 1:
        layout_map[EXPERT_WEIGHT_PATTERN] = ("expert", None, None)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def batch_sharding(distribution, rank: int):
    """Shards dimension 1 ([micro-batch, batch, ...] arrays) over every device."""
    import jax

    mesh = distribution.device_mesh.backend_mesh
    spec = [None] * rank
    spec[1] = MESH_AXES
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def global_array(host_value: np.ndarray, sharding):
    """A global jax.Array from a host array every process holds in full
    (each process materialises only its own shards)."""
    import jax

    host_value = np.asarray(host_value)
    return jax.make_array_from_callback(host_value.shape, sharding, lambda idx: host_value[idx])


def to_host(array) -> np.ndarray:
    """The full value of a (possibly sharded, possibly multi-process) array."""
    import jax

    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    if array.sharding.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
