"""Shared benchmark plumbing: backend/thread setup, machine facts, timing,
and jit-compiled step builders for JAX and TensorFlow.

`configure(backend, threads)` must run before Keras (or JAX/TF) is imported:
it sets KERAS_BACKEND and the thread-count knobs of the chosen library, so
every benchmark in one run uses the same number of threads (the reference
PyTorch run is told the same number).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from training.host_devices import available_cores

_CONFIGURED: Dict[str, Any] = {}


# ----------------------------------------------------------------- set-up


def configure(backend: str, threads: Optional[int] = None) -> Dict[str, Any]:
    """Selects the Keras backend and pins the math libraries to `threads`
    intra-op threads. Call before anything imports keras/jax/tensorflow."""
    if backend not in ("jax", "tensorflow"):
        raise ValueError(f"backend must be 'jax' or 'tensorflow', got {backend!r}")
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != backend:
        raise RuntimeError("benchmarks.common.configure() must run before keras is imported")
    threads = threads or available_cores()
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # XLA:CPU (JAX, TF's jit_compile) sizes its thread pool by the CPUs the
    # process may run on and has no thread-count flag: fewer threads means
    # fewer CPUs (inherited by the children, the reference included). OMP/MKL
    # knobs cover TF's non-XLA kernels.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if 0 < threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    _CONFIGURED.update(backend=backend, threads=threads)
    return dict(_CONFIGURED)


def backend() -> str:
    import keras

    return keras.backend.backend()


def machine_info() -> Dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cores": available_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "threads_used": _CONFIGURED.get("threads"),
        "accelerators": accelerator_info(),
    }


def accelerator_info() -> List[str]:
    name = backend()
    try:
        if name == "jax":
            import jax

            return [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
        import tensorflow as tf

        return [f"{d.device_type}:{d.name}" for d in tf.config.list_logical_devices()]
    except Exception as exc:  # pragma: no cover - informational only
        return [f"unknown ({exc})"]


def versions() -> Dict[str, Any]:
    import keras
    import numpy as np

    out = {"python": platform.python_version(), "keras": keras.__version__,
           "numpy": np.__version__, "backend": backend()}
    if backend() == "jax":
        import jax
        import jaxlib

        out.update(jax=jax.__version__, jaxlib=jaxlib.__version__)
        out["backend_lib"] = f"jax {jax.__version__}"
    else:
        import tensorflow as tf

        out.update(tensorflow=tf.__version__)
        out["backend_lib"] = f"tensorflow {tf.__version__}"
    return out


# ----------------------------------------------------------------- timing
def block(value):
    """Waits until `value` (any nest of arrays) is computed."""
    if backend() == "jax":
        import jax

        return jax.block_until_ready(value)
    import tensorflow as tf

    for leaf in tf.nest.flatten(value):
        if hasattr(leaf, "numpy"):
            leaf.numpy()
    return value


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1,
               inner: int = 1) -> Dict[str, Any]:
    """Calls `fn` warmup times (the first one compiles), then `repeats` timed
    rounds of `inner` calls each. Returns per-call milliseconds: median, min,
    max over rounds, plus the first (compiling) call's time."""
    start = time.perf_counter()
    block(fn())
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(max(0, warmup - 1)):
        block(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn()
        block(out)
        samples.append((time.perf_counter() - start) * 1e3 / inner)
    return summarize(samples, first_call_ms=first_ms, inner=inner)


def summarize(samples_ms: Sequence[float], **extra) -> Dict[str, Any]:
    return {"median_ms": statistics.median(samples_ms), "min_ms": min(samples_ms),
            "max_ms": max(samples_ms), "repeats": len(samples_ms), **extra}


# --------------------------------------------------------- jitted helpers
class _JaxState:
    """Variable values of a Keras layer/model, threaded through jitted calls."""

    def __init__(self, module):
        self.module = module
        self.trainable = list(module.trainable_variables)
        self.non_trainable = list(module.non_trainable_variables)

    def values(self):
        """Copies of the current values: the jitted calls donate their state, which
        must not delete the buffers the Keras variables still hold."""
        import jax.numpy as jnp

        copy = lambda vs: [jnp.array(v.value, copy=True) for v in vs]  # noqa: E731
        return copy(self.trainable), copy(self.non_trainable)

    def run(self, fn, train_vals, nt_vals, *args, **kwargs):
        """Runs fn(*args) with the variables bound to the given values; returns
        (fn's output, the non-trainable values after it, the losses it added)."""
        import keras
        from keras import ops

        mapping = list(zip(self.trainable, train_vals)) + list(zip(self.non_trainable, nt_vals))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            out = fn(*args, **kwargs)
            losses = list(scope.losses)
        # Cast back to each variable's own dtype: a variable assigned under a
        # mixed-precision autocast scope comes back in the compute dtype, which
        # would change the jit signature (a retrace) on the next call.
        new_nt = [ops.cast(scope.get_current_value(v), v._dtype) for v in self.non_trainable]
        return out, new_nt, losses


def compilation_count(backend: str, fn) -> Optional[int]:
    """Traces/compilations of a jitted JAX or tf.function callable, or None
    when the backend does not say (e.g. an un-jitted function)."""
    try:
        if backend == "jax":
            return int(fn._cache_size())
        return int(fn.experimental_get_tracing_count())
    except Exception:
        return None


class TrainStep:
    """One jit-compiled training step (forward + backward + optimizer update)
    of `module`. loss_fn(module, *batch) -> scalar; the auxiliary losses the
    call adds (add_loss) are included. Calling the step returns the loss.

    JAX: a pure function of (trainable, non-trainable, optimizer) values under
    jax.jit with the state donated; the module is called through `__call__`
    inside a StatelessScope, so the `training` flag reaches every sublayer by
    Keras' call context. TensorFlow: tf.function(jit_compile=True) around a
    GradientTape and optimizer.apply."""

    def __init__(self, module, optimizer, loss_fn: Callable, jit: bool = True):
        self.module, self.optimizer, self.loss_fn = module, optimizer, loss_fn
        self.backend = backend()
        self.optimizer.build(module.trainable_variables)
        if self.backend == "jax":
            self._build_jax(jit)
        else:
            self._build_tf(jit)

    def _build_jax(self, jit):
        import jax

        holder = _JaxState(self.module)
        self._holder = holder
        optimizer = self.optimizer

        def loss_and_state(train_vals, nt_vals, batch):
            loss, new_nt, losses = holder.run(self.loss_fn, train_vals, nt_vals, self.module, *batch)
            if losses:
                loss = loss + sum(losses)
            return loss, new_nt

        def step(state, batch):
            train_vals, nt_vals, opt_vals = state
            (loss, nt_vals), grads = jax.value_and_grad(loss_and_state, has_aux=True)(
                train_vals, nt_vals, batch)
            train_vals, opt_vals = optimizer.stateless_apply(opt_vals, grads, train_vals)
            return (train_vals, nt_vals, opt_vals), loss

        self._fn = jax.jit(step, donate_argnums=(0,)) if jit else step
        train_vals, nt_vals = holder.values()
        import jax.numpy as jnp

        opt_vals = [jnp.array(v.value, copy=True) for v in optimizer.variables]
        self._state = (train_vals, nt_vals, opt_vals)

    def _build_tf(self, jit):
        import tensorflow as tf

        module, optimizer = self.module, self.optimizer
        variables = module.trainable_variables

        def step(*batch):
            with tf.GradientTape() as tape:
                loss = self.loss_fn(module, *batch)
                if module.losses:
                    loss = loss + tf.add_n(module.losses)
            grads = tape.gradient(loss, variables)
            optimizer.apply(grads, variables)
            return loss

        self._fn = tf.function(step, jit_compile=jit, reduce_retracing=False)

    def __call__(self, *batch):
        if self.backend == "jax":
            self._state, loss = self._fn(self._state, batch)
            return loss
        return self._fn(*batch)

    def compilations(self) -> Optional[int]:
        """How many times the function was traced/compiled (1 = no retracing)."""
        return compilation_count(self.backend, self._fn)

    def sync_to_module(self):
        """Writes the JAX state back into the Keras variables."""
        if self.backend != "jax":
            return
        train_vals, nt_vals, opt_vals = self._state
        for v, value in zip(self._holder.trainable, train_vals):
            v.assign(value)
        for v, value in zip(self._holder.non_trainable, nt_vals):
            v.assign(value)
        for v, value in zip(self.optimizer.variables, opt_vals):
            v.assign(value)


class InferenceFn:
    """A jit-compiled inference function fn(module, *args) -> outputs.

    JAX: pure in the variable values (non-trainable updates, e.g. MoE load
    counters, are threaded through); `donate` names positional args whose
    buffers may be reused (KV caches). TensorFlow: tf.function(jit_compile=True)."""

    def __init__(self, module, fn: Callable, donate: Sequence[int] = (), jit: bool = True):
        self.module, self.fn = module, fn
        self.backend = backend()
        if self.backend == "jax":
            import jax

            holder = _JaxState(module)
            self._holder = holder

            def pure(train_vals, nt_vals, *args):
                out, new_nt, _ = holder.run(fn, train_vals, nt_vals, module, *args)
                return out, new_nt

            donate_argnums = (1,) + tuple(2 + i for i in donate)
            self._fn = jax.jit(pure, donate_argnums=donate_argnums) if jit else pure
            self._train_vals, self._nt_vals = holder.values()
        else:
            import tensorflow as tf

            self._fn = tf.function(lambda *args: fn(module, *args), jit_compile=jit)

    def __call__(self, *args):
        if self.backend == "jax":
            out, self._nt_vals = self._fn(self._train_vals, self._nt_vals, *args)
            return out
        return self._fn(*args)

    def compilations(self) -> Optional[int]:
        """How many times the function was traced/compiled (1 = no retracing)."""
        return compilation_count(self.backend, self._fn)


def nbytes(tensor) -> int:
    """Bytes held by one backend tensor (size x itemsize of its dtype)."""
    import numpy as np
    from keras import ops

    shape = tuple(int(d) for d in ops.shape(tensor))
    return int(np.prod(shape, dtype=np.int64)) * itemsize(tensor.dtype)


def itemsize(dtype) -> int:
    """Bytes per element of a backend or string dtype (bfloat16/float8 included)."""
    import keras
    import ml_dtypes
    import numpy as np

    name = keras.backend.standardize_dtype(dtype)
    if hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name)).itemsize
    return np.dtype(name).itemsize
