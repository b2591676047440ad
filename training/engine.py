"""The training engine: Keras 3 on JAX, one jitted SPMD step (`training.step`)
over a ("batch", "expert") mesh (`training.parallel`, laid out from the
model's own declaration, `model.sharding`).

`Engine` builds the model, optimizer and mesh; `Engine.train` is the loop:
it feeds numpy batches, checks the loss for NaN/inf every step, and hands
each step's metrics to `training.metrics` (console lines, history, and the
records for `metrics_fn`) and its
state to `training.checkpoint` (atomic, mesh-independent checkpoints).
The host keeps out of the device's way (`training.overlap`): the next batch
is read and put on the mesh by a thread while a step runs, step n's metrics
are fetched (and its loss checked) after step n + 1 is queued, and a
checkpoint is fetched in one transfer and written by a background thread
(a checkpoint step is checked before it is saved).
No TensorFlow is imported.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Optional

import numpy as np

from model.grouped_matmul import per_device_code
from training.checkpoint import CheckpointMismatchError, EngineCheckpoints, relative_path
from training.expert_parallel import ExpertDispatch, installed
from training.metrics import TrainingMetrics
from training.optim import WarmupCosineSchedule, make_optimizer, warmup_cosine_lr
from training.overlap import BatchPrefetcher
from training.parallel import MeshError, batch_sharding, global_array, make_distribution, plan_mesh, to_host
from training.precision import dtype_policy, resolve_precision
from training.seed import set_seed
from training.settings import TrainingSettings
from training.step import build_train_step, training_mla_mode


class TrainingDiverged(RuntimeError):
    pass


def _wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
    """A barrier on the coordination service: processes that compile at
    different speeds meet here, not in the first collective (gloo gives up
    on a peer after 30 s)."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


class Engine:
    """Builds the model, optimizer and mesh; `train(tokens)` runs the loop."""

    def __init__(self, config, settings: TrainingSettings, devices=None,
                 log_fn: Callable[[str], None] = print, data_identity: Optional[str] = None,
                 metrics_fn: Optional[Callable[[dict], None]] = None,
                 base_model: Optional[dict] = None):
        """`data_identity`: the caller's identity of the training data (the
        Trainer adapter hashes its files), part of the checkpoint fingerprint.
        `metrics_fn`: gets each interval's record (the Trainer's live TensorBoard).
        `base_model`: {"path", "identity"} of a Hugging Face checkpoint
        directory (model.base_model) whose weights training starts from;
        its identity is part of the fingerprint."""
        import jax
        import keras

        from model.deepseek_v3 import DeepSeekV3ForCausalLM

        if keras.backend.backend() != "jax":
            raise RuntimeError(f"the training engine needs KERAS_BACKEND=jax, "
                               f"this process has {keras.backend.backend()!r}")
        self.config = config
        self.s = s = settings
        self.log_fn = log_fn
        self.metrics_fn = metrics_fn  # each interval's record as a dict (training.metrics)
        self.devices = list(devices if devices is not None else jax.devices())
        self.platform = self.devices[0].platform
        self.plan = plan_mesh(len(self.devices), s.expert_parallel, config.n_routed_experts,
                              s.batch_size)
        self.policy, self.float8 = resolve_precision(s.precision, self.platform)
        with dtype_policy(self.policy):
            set_seed(s.seed)
            self.model = DeepSeekV3ForCausalLM(config)
            if base_model is not None:  # before float8: the scales start from these weights
                from model.hf_checkpoint import load_weights

                load_weights(self.model, base_model["path"])
                log_fn(f"engine: starting from the base model {base_model['path']} "
                       f"(identity {base_model.get('identity')})")
            if self.float8:
                self.model.quantize("float8")
            self.schedule = WarmupCosineSchedule(s.learning_rate, s.warmup_steps, s.train_steps)
            self.optimizer = make_optimizer(self.model, self.schedule, s.weight_decay,
                                            s.grad_clip_norm)
            self.optimizer.build(self.model.trainable_variables)
        # Variables are created on one device, then laid out on the mesh
        # (`_lay_out`): Keras' own placement uses jax.device_put, which JAX
        # 0.4.30 refuses for multi-process meshes.
        self.distribution = make_distribution(self.plan, self.model, self.optimizer, self.devices)
        self._lay_out()
        self.moe_names = [layer.name for layer in self.model.decoder_layers
                          if layer.mlp in self.model.moe_layers()]
        # Stored in every checkpoint; a resume under any other value is refused.
        self.fingerprint = {
            "base_model": config.to_dict(),
            "base_model_identity": base_model.get("identity") if base_model else None,
            "data": {"identity": data_identity, "seq_len": s.seq_len, "batch_size": s.batch_size,
                     "gradient_accumulation": s.gradient_accumulation, "seed": s.seed},
            "optimizer": {"name": "adamw", "learning_rate": s.learning_rate,
                          "warmup_steps": s.warmup_steps, "train_steps": s.train_steps,
                          "weight_decay": s.weight_decay, "grad_clip_norm": s.grad_clip_norm},
            "precision": {"requested": s.precision, "policy": self.policy, "float8": self.float8},
        }
        # Several devices: the routed experts run per device (all-to-all with
        # expert_parallel > 1), installed on the MoE layers only while the
        # step is traced (`_compile`); one device keeps the model's own code.
        mesh = self.distribution.device_mesh.backend_mesh
        self.dispatch = (ExpertDispatch(mesh, s.dispatch_capacity_factor,
                                        recompute=s.dispatch_recompute)
                         if len(self.devices) > 1 else None)
        self.mla_mode = training_mla_mode(config, self.float8)
        self._step_fn = build_train_step(self.model, self.optimizer, config.bias_update_speed,
                                         s.gradient_accumulation, s.record_history, mesh,
                                         self.dispatch, self.mla_mode)
        self.last_compiled = None  # the step `train` compiled (its HLO: training/hlo.py)

    def _lay_out(self) -> None:
        """Every model and optimizer variable onto the layout the
        distribution gives its path."""
        for v in self.model.weights + self.optimizer.variables:
            sharding = self.distribution.get_variable_layout(v).backend_layout
            v.assign(global_array(np.asarray(v.value), sharding))
            if v.value.sharding != sharding:
                raise RuntimeError(f"{v.path}: could not lay out as {sharding}")

    # --------------------------------------------------------------- state
    def _state(self):
        return ([v.value for v in self.model.trainable_variables],
                [v.value for v in self.model.non_trainable_variables],
                [v.value for v in self.optimizer.variables])

    def _write_back(self, tv, ntv, ov):
        for variables, values in zip((self.model.trainable_variables,
                                      self.model.non_trainable_variables,
                                      self.optimizer.variables), (tv, ntv, ov)):
            for v, x in zip(variables, values):
                v.assign(x)

    def weights(self) -> Dict[str, np.ndarray]:
        """Every model variable's full value, keyed by its path inside the model."""
        return {relative_path(v): to_host(v.value) for v in self.model.weights}

    def _batch(self, array, step: int, sharding):
        A = self.s.gradient_accumulation
        return global_array(np.asarray(array[step * A:(step + 1) * A], np.int32), sharding)

    def _compile(self, tv, ntv, ov, ids, mask):
        # One device of several in this process (the 1-device step of a
        # benchmark): the model's single-device code, tile loop included.
        alone = per_device_code() if self.dispatch is None else contextlib.nullcontext()
        with installed(self.model, self.dispatch), alone:
            return self._step_fn.lower(tv, ntv, ov, ids, mask).compile()

    def compiled_step(self, micro_batches: np.ndarray, padding_mask: Optional[np.ndarray] = None):
        """The compiled JAX step for [A, B, S] batches of this shape (its
        `as_text()` HLO and `memory_analysis()` are what the plan command,
        the benchmarks and the tests read). Training does not run."""
        sharding = batch_sharding(self.distribution, 3)
        ids = global_array(np.asarray(micro_batches, np.int32), sharding)
        mask = None if padding_mask is None else global_array(
            np.asarray(padding_mask, np.int32), sharding)
        with dtype_policy(self.policy):
            return self._compile(*self._state(), ids, mask)

    def step_runner(self, micro_batches: np.ndarray):
        """-> (run, compile_seconds): `run()` takes one optimizer step of the
        engine's own step on the same [A, B, S] batch (`run(other)` on
        another one of that shape) and returns the loss array; `run.sync()`
        writes the state back into the model (benchmarks)."""
        sharding = batch_sharding(self.distribution, 3)
        ids = global_array(np.asarray(micro_batches, np.int32), sharding)
        state = list(self._state())
        start = time.perf_counter()
        compiled = self.last_compiled = self.compiled_step(micro_batches)
        compile_seconds = time.perf_counter() - start

        def run(other=None):
            batch = ids if other is None else global_array(np.asarray(other, np.int32), sharding)
            with dtype_policy(self.policy):
                tv, ntv, ov, metrics = compiled(*state, batch, None)
            state[:] = [tv, ntv, ov]
            return metrics["loss"]

        run.sync = lambda: self._write_back(*state)
        return run, compile_seconds

    def describe(self) -> dict:
        """Where and how this engine trains (result.json keys)."""
        import jax

        s = self.s
        return {"backend": "jax", "platform": self.platform,
                "devices": [str(d) for d in self.devices], "num_devices": len(self.devices),
                "processes": jax.process_count(), "mesh": self.plan.to_dict(),
                "expert_parallel": s.expert_parallel, "gradient_accumulation": s.gradient_accumulation,
                "precision": {"requested": s.precision, "policy": self.policy, "float8": self.float8},
                "mla_training_mode": self.mla_mode or "naive"}

    def _check_tokens(self, tokens) -> None:
        s, A = self.s, self.s.gradient_accumulation
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (s.batch_size, s.seq_len):
            raise ValueError(f"tokens: expected [micro-batches, {s.batch_size}, {s.seq_len}], "
                             f"got {tuple(tokens.shape)}")
        if len(tokens) < s.train_steps * A:
            raise ValueError(f"tokens: {len(tokens)} micro-batches for {s.train_steps} steps x "
                             f"{A} accumulation")

    def _diverged(self, loss: float, grad_norm: float, step: int, checkpoints) -> TrainingDiverged:
        s = self.s
        what = (f"loss is {loss}" if not math.isfinite(loss) else
                f"the gradient norm is {grad_norm} (loss {loss:.4f})")
        last = checkpoints.last if checkpoints else None
        where = (f"the last good checkpoint is step {last} in {s.checkpoint_dir}" if last
                 else "no checkpoint was written in this run")
        lr = warmup_cosine_lr(step, s.learning_rate, s.warmup_steps, s.train_steps)
        return TrainingDiverged(f"training diverged: {what} at step {step + 1} (learning rate "
                                f"{lr:.3g}); {where}. Lower training.learning_rate or raise warmup_steps.")

    # ---------------------------------------------------------------- loop
    def train(self, tokens: np.ndarray, padding_mask: Optional[np.ndarray] = None,
              stop_after: Optional[int] = None) -> dict:
        """tokens: [micro-batches, B, S] int (a memmap or a forward-only
        training.token_stream.TokenStream is fine); micro-batch
        step * A + a feeds accumulation slot a of optimizer step `step`, so
        a resumed run reads exactly the batches an uninterrupted run would."""
        import jax

        s = self.s
        self._check_tokens(tokens)
        checkpoints = (EngineCheckpoints(s, self.fingerprint, self.model, self.optimizer, self.log_fn,
                                         is_writer=jax.process_index() == 0,
                                         barrier=_wait_for_all_processes)
                       if s.checkpoint_dir else None)
        state = self._state()
        start_step, state = checkpoints.resume(state) if checkpoints else (0, state)
        sharding = batch_sharding(self.distribution, 3)
        metrics = TrainingMetrics(s, self.moe_names, start_step, self.log_fn, self.metrics_fn)
        end = s.train_steps if stop_after is None else min(s.train_steps, stop_after)
        compiled = None

        def batch(step):  # in the prefetch thread, while the device runs a step
            return (self._batch(tokens, step, sharding),
                    None if padding_mask is None else self._batch(padding_mask, step, sharding))

        def check(pending):  # the loss check, one step late: the next step is queued already
            step, m, t0 = pending
            m = jax.device_get(m)
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                # Raised before this step's state can reach a checkpoint.
                if checkpoints:
                    checkpoints.finish()
                raise self._diverged(loss, grad_norm, step, checkpoints)
            metrics.record(step, m, time.perf_counter() - t0)

        prefetch = BatchPrefetcher(batch, start_step, end)
        pending = None  # (step, its metrics on the device, its start time)
        try:
            with dtype_policy(self.policy):
                for step in range(start_step, end):
                    t0 = time.perf_counter()
                    ids, mask = prefetch.next(step)
                    if compiled is None:
                        compiled = self.last_compiled = self._compile(*state, ids, mask)
                        _wait_for_all_processes("deepseek_tfx_step_compiled")
                    *state, m = compiled(*state, ids, mask)
                    if pending is not None:
                        check(pending)
                    pending = (step, m, t0)
                    if checkpoints and checkpoints.due(step + 1):
                        check(pending)  # a checkpoint holds checked steps only
                        pending = None
                        checkpoints.after_step(step + 1, state)
                if pending is not None:
                    check(pending)
        finally:
            prefetch.close()
        if checkpoints:
            checkpoints.finish()
        summary = metrics.summary(end)
        self._write_back(*state)
        # Steps in which some MoE call overflowed the all-to-all capacity and
        # ran extra rounds (nothing is dropped); null on one device.
        dispatch = None if self.dispatch is None else {
            "capacity_factor": s.dispatch_capacity_factor, "recompute": s.dispatch_recompute,
            "overflow_steps": metrics.overflow_steps, "extra_rounds": metrics.extra_rounds}
        return {**self.describe(), "start_step": start_step, "final_step": end,
                "resumed": start_step > 0, "dispatch": dispatch, **summary,
                "checkpoint_steps": checkpoints.steps() if checkpoints else []}


__all__ = ["Engine", "MeshError", "TrainingDiverged", "CheckpointMismatchError"]
