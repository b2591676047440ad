"""The device mesh and sharding plan (keras.distribution on JAX).

Mesh axes ("batch", "expert"). Data parallel by default: every device on the
batch axis, expert axis of size 1. `expert_parallel = N` puts N devices on the
expert axis. Each weight is laid out as the model declares it
(`model.sharding.weight_axes`: the routed experts' weights [E, ...] split
into N slices of E/N experts, everything else replicated), and each
optimizer moment like the weight it belongs to. Each global batch is split
over *all* devices (both axes), so the dense part stays data parallel and
XLA's SPMD partitioner moves tokens to the experts' devices.

Multi-host: `initialize_from_env()` calls `keras.distribution.initialize()`
when KERAS_DISTRIBUTION_NUM_PROCESSES > 1 (with KERAS_DISTRIBUTION_JOB_ADDRESSES
= the coordinator's host:port and KERAS_DISTRIBUTION_PROCESS_ID); the mesh then
spans the devices of every process.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from model.sharding import BATCH, EXPERT, REPLICATED
from training.settings import experts_problem

MESH_AXES = (BATCH, EXPERT)


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
        from training.seed import set_seed

        set_seed(seed)
        keras.distribution.initialize()
    return processes


def _has_accelerator() -> bool:
    try:
        import jax_plugins  # noqa: F401  (the CUDA plugin wheel)

        return True
    except ImportError:
        return False


def variable_axes(model, optimizer) -> Dict[str, Tuple[Optional[str], ...]]:
    """{variable path: mesh axes} for every model and optimizer variable: the
    model's declaration, and for an optimizer moment (Keras names it
    "<its variable's path, / as _>_<slot>") that of its variable."""
    from model.sharding import weight_axes

    axes = weight_axes(model)
    by_prefix = {v.path.replace("/", "_") + "_": v for v in model.trainable_variables}
    for v in optimizer.variables:
        owner = max((p for p in by_prefix if v.name.startswith(p)), key=len, default=None)
        same_shape = owner is not None and tuple(by_prefix[owner].shape) == tuple(v.shape)
        axes[v.path] = axes[by_prefix[owner].path] if same_shape else REPLICATED  # (step counters)
    return axes


def make_distribution(plan: MeshPlan, model, optimizer, devices: Optional[Sequence] = None):
    """keras.distribution.ModelParallel over the ("batch", "expert") mesh
    whose LayoutMap holds every sharded variable of `model` and `optimizer`
    by its exact path (`variable_axes`)."""
    import jax
    import keras

    devices = list(devices if devices is not None else jax.devices())
    if len(devices) != plan.devices:
        raise MeshError(f"the mesh needs {plan.devices} devices, {len(devices)} given")
    mesh = keras.distribution.DeviceMesh(
        shape=(plan.batch, plan.expert), axis_names=MESH_AXES,
        devices=np.asarray(devices, dtype=object).reshape(plan.batch, plan.expert))
    layout_map = keras.distribution.LayoutMap(mesh)
    axes = variable_axes(model, optimizer)  # also on one device: an undeclared weight fails here
    if plan.expert > 1:
        for path, spec in axes.items():
            if spec != REPLICATED:  # keys are regexes: anchor the exact path
                layout_map["^" + re.escape(path) + "$"] = spec
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=BATCH)


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
