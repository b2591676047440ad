"""The training engine: Keras 3 on JAX, one jitted SPMD step.

A step takes `gradient_accumulation` micro-batches of the *global* batch
(a [A, B, S] token array sharded over every device of the mesh) and does:
forward + backward per micro-batch (Keras' stateless API), the mean of the
gradients, AdamW with the warmup-cosine schedule and global-norm clipping,
and DeepSeek-V3's auxiliary-loss-free balancing: every router bias moves once,
by gamma * sign(mean(load) - load_i), where load is the expert load summed
over all micro-batches of the step. Because the batch is one global array
under jit, that sum is over every device and process: XLA inserts the
all-reduce. Every micro-batch is routed with the bias of the start of the
step, whatever the MoE layer does to its bias inside its forward pass.

The loop feeds numpy batches, checks the loss for NaN/inf every step, logs
console lines (loss, perplexity, lr, tokens/s, ETA, worst expert max/min
load ratio) and checkpoints atomically (`training.checkpoint`).
No TensorFlow is imported.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from training.checkpoint import Checkpointer, CheckpointMismatchError, relative_path
from training.expert_parallel import ExpertDispatch, installed
from training.optim import WarmupCosineSchedule, make_optimizer, warmup_cosine_lr
from training.parallel import MeshError, batch_sharding, global_array, make_distribution, plan_mesh, to_host
from training.settings import TrainingSettings


class TrainingDiverged(RuntimeError):
    pass


def resolve_precision(precision: str, platform: str):
    """-> (Keras dtype policy, float8?). "auto": mixed_bfloat16 on GPU/TPU,
    float32 on CPU; "float8": Keras float8 training on top of "auto"."""
    auto = "float32" if platform == "cpu" else "mixed_bfloat16"
    return {"auto": (auto, False), "float32": ("float32", False),
            "bf16": ("mixed_bfloat16", False), "float8": (auto, True)}[precision]


@contextlib.contextmanager
def dtype_policy(name: str):
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def next_token_ce(logits, token_ids, padding_mask=None):
    """Mean next-token cross-entropy; with a padding mask only targets whose
    token and predecessor are real count."""
    from keras import ops

    from model.deepseek_v3 import sparse_ce

    ce = sparse_ce(logits[:, :-1], token_ids[:, 1:])
    if padding_mask is None:
        return ops.mean(ce)
    m = ops.cast(padding_mask, "float32")
    w = m[:, 1:] * m[:, :-1]
    return ops.sum(ce * w) / ops.maximum(ops.sum(w), 1.0)


def expert_summary(load: np.ndarray, dropped: float, bias: np.ndarray) -> Dict[str, object]:
    load = np.asarray(load, np.float64)
    total, mean = load.sum(), load.mean()
    return {
        "load_max_min_ratio": float(load.max() / load.min()) if load.min() > 0 else float("inf"),
        "load_cv": float(load.std() / mean) if mean > 0 else 0.0,
        "dropped_fraction": float(dropped / total) if total else 0.0,
        "bias_mean": float(np.mean(bias)),
        "bias_spread": float(np.max(bias) - np.min(bias)),
        "load_fraction": (load / total).tolist() if total else [0.0] * len(load),
        "assignments": float(total),  # routed (token, expert) pairs
    }


def _format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
    """A barrier on the coordination service: processes that compile at
    different speeds meet here, not in the first collective (gloo gives up
    on a peer after 30 s)."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


def set_seed(seed: int) -> None:
    """keras.utils.set_random_seed without its side effect of importing
    TensorFlow (to seed tf.random) when TF is installed."""
    import random

    from keras.src.backend.common import global_state
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    random.seed(seed)
    np.random.seed(seed)


class Engine:
    """Builds the model, optimizer and mesh; `train(tokens)` runs the loop."""

    def __init__(self, config, settings: TrainingSettings, devices=None,
                 log_fn: Callable[[str], None] = print):
        import jax
        import keras

        from model.deepseek_v3 import DeepSeekV3ForCausalLM

        if keras.backend.backend() != "jax":
            raise RuntimeError(f"the training engine needs KERAS_BACKEND=jax, "
                               f"this process has {keras.backend.backend()!r}")
        self.config = config
        self.s = s = settings
        self.log_fn = log_fn
        self.devices = list(devices if devices is not None else jax.devices())
        self.platform = self.devices[0].platform
        self.plan = plan_mesh(len(self.devices), s.expert_parallel, config.n_routed_experts,
                              s.batch_size)
        self.policy, self.float8 = resolve_precision(s.precision, self.platform)
        self.distribution = make_distribution(self.plan, self.devices)
        # Variables are created on one device, then laid out on the mesh by
        # the distribution's LayoutMap (`_lay_out`): Keras' own placement uses
        # jax.device_put, which JAX 0.4.30 refuses for multi-process meshes.
        with dtype_policy(self.policy):
            set_seed(s.seed)
            self.model = DeepSeekV3ForCausalLM(config)
            if self.float8:
                self.model.quantize("float8")
            self.schedule = WarmupCosineSchedule(s.learning_rate, s.warmup_steps, s.train_steps)
            self.optimizer = make_optimizer(self.model, self.schedule, s.weight_decay,
                                            s.grad_clip_norm)
            self.optimizer.build(self.model.trainable_variables)
        self._lay_out()
        # Several devices: the routed experts run per device (all-to-all with
        # expert_parallel > 1); one device keeps the model's own code.
        # Installed on the MoE layers only while the step is traced
        # (`_compile`): eager calls of the model keep its own code.
        self.dispatch = (ExpertDispatch(self.distribution.device_mesh.backend_mesh,
                                        s.dispatch_capacity_factor)
                         if len(self.devices) > 1 else None)
        self.moe_names = [layer.name for layer in self.model.decoder_layers
                          if layer.mlp in self.model.moe_layers()]
        self.fingerprint = {"model_config": config.to_dict(), "seq_len": s.seq_len,
                            "batch_size": s.batch_size, "seed": s.seed, "float8": self.float8,
                            "train_steps": s.train_steps,
                            "gradient_accumulation": s.gradient_accumulation,
                            "learning_rate": s.learning_rate, "warmup_steps": s.warmup_steps}
        self._step_fn = self._build_step()
        self.last_compiled = None  # the step `train` compiled (its HLO: training/hlo.py)

    def _lay_out(self) -> None:
        """Every model and optimizer variable onto the layout the
        distribution gives its path (optimizer moments are named after
        their variable, so they match the same LayoutMap entries)."""
        for v in self.model.weights + self.optimizer.variables:
            sharding = self.distribution.get_variable_layout(v).backend_layout
            v.assign(global_array(np.asarray(v.value), sharding))
            if v.value.sharding != sharding:
                raise RuntimeError(f"{v.path}: could not lay out as {sharding}")

    # ------------------------------------------------------------- the step
    def _build_step(self):
        import jax
        from keras import ops

        from model.moe import router_bias_update

        model, optimizer, s = self.model, self.optimizer, self.s
        ntv_index = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        moes = model.moe_layers()
        bias_idx = [ntv_index[id(m.gate.e_score_correction_bias)] for m in moes]
        load_idx = [ntv_index[id(m.expert_load)] for m in moes]
        dropped_idx = [ntv_index[id(m.dropped_tokens)] for m in moes]
        gamma = float(self.config.bias_update_speed)
        overwrite = [bool(getattr(v, "overwrite_with_gradient", False))
                     for v in model.trainable_variables]
        accumulation = s.gradient_accumulation

        dispatch = self.dispatch

        def loss_fn(tv, ntv, ids, mask):
            inputs = ids if mask is None else {"token_ids": ids, "padding_mask": mask}
            if dispatch is not None:
                dispatch.start()
            logits, ntv, losses = model.stateless_call(tv, ntv, inputs, training=True,
                                                       return_losses=True)
            # Extra all-to-all rounds of this micro-batch (capacity overflows).
            overflow = sum(dispatch.collect()) if dispatch is not None else 0
            ce = next_token_ce(logits, ids, mask)
            loss = ce + (sum(losses) if losses else 0.0)
            return loss, (ce, ntv, jax.numpy.int32(overflow))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def step(tv, ntv, ov, ids, mask):
            ntv = list(ntv)
            bias0 = [ntv[i] for i in bias_idx]
            for i in load_idx + dropped_idx:  # counters cover this step only
                ntv[i] = ops.zeros_like(ntv[i])
            def micro_step(carry, batch):
                ntv, grads, loss_sum, ce_sum, overflow_sum = carry
                ids, mask = batch
                (loss, (ce, ntv, overflow)), g = grad_fn(tv, ntv, ids, mask)
                ntv = list(ntv)
                for i, b in zip(bias_idx, bias0):  # one bias for the whole step
                    ntv[i] = b
                # float8 scales are overwritten by their "gradient": keep the last.
                grads = [gn if ow else ga + gn for ga, gn, ow in zip(grads, g, overwrite)]
                return ((ntv, grads, loss_sum + loss, ce_sum + ce, overflow_sum + overflow),
                        [ntv[i] for i in load_idx])

            if accumulation == 1:  # no accumulator buffers
                (loss_sum, (ce_sum, ntv, overflow_sum)), grads = grad_fn(
                    tv, ntv, ids[0], None if mask is None else mask[0])
                ntv = list(ntv)
                for i, b in zip(bias_idx, bias0):
                    ntv[i] = b
                micro_loads = [[ntv[i] for i in load_idx]]
            else:  # a scan: the step compiles once whatever the accumulation
                zeros = [jax.numpy.zeros_like(x) for x in tv]
                carry = (ntv, zeros, jax.numpy.float32(0.0), jax.numpy.float32(0.0),
                         jax.numpy.int32(0))
                carry, micro_loads = jax.lax.scan(micro_step, carry, (ids, mask))
                ntv, grads, loss_sum, ce_sum, overflow_sum = carry
            ntv = list(ntv)
            if accumulation > 1:
                grads = [g if ow else g / accumulation for g, ow in zip(grads, overwrite)]
            loads = [ntv[i] for i in load_idx]
            if gamma > 0:
                for i, b, load in zip(bias_idx, bias0, loads):
                    ntv[i] = ops.cast(router_bias_update(b, load, gamma), b.dtype)
            tv, ov = optimizer.stateless_apply(ov, grads, tv)
            metrics = {"loss": loss_sum / accumulation, "ce": ce_sum / accumulation,
                       "dispatch_overflow": overflow_sum,
                       "load": ops.stack(loads) if loads else ops.zeros((0,)),
                       "dropped": ops.stack([ntv[i] for i in dropped_idx]) if loads
                       else ops.zeros((0,)),
                       "bias": ops.stack([ntv[i] for i in bias_idx]) if loads
                       else ops.zeros((0,))}
            if s.record_history and loads:  # cumulative load after each micro-batch
                metrics["micro_load"] = (ops.stack(micro_loads[0])[None] if accumulation == 1
                                         else ops.stack(micro_loads, axis=1))
            return tv, ntv, ov, metrics

        shardings = lambda variables: [v.value.sharding for v in variables]  # noqa: E731
        replicated = jax.sharding.NamedSharding(self.distribution.device_mesh.backend_mesh,
                                                jax.sharding.PartitionSpec())
        self._shardings = (shardings(model.trainable_variables),
                           shardings(model.non_trainable_variables),
                           shardings(optimizer.variables))
        return jax.jit(step, donate_argnums=(0, 1, 2),
                       out_shardings=(*self._shardings, replicated))

    # --------------------------------------------------------------- state
    def _state(self):
        return ([v.value for v in self.model.trainable_variables],
                [v.value for v in self.model.non_trainable_variables],
                [v.value for v in self.optimizer.variables])

    def _keys(self):
        model_keys = ["model/" + relative_path(v) for v in
                      self.model.trainable_variables + self.model.non_trainable_variables]
        opt_keys = [f"optimizer/{i:05d}" for i in range(len(self.optimizer.variables))]
        if len(set(model_keys)) != len(model_keys):
            raise ValueError("two model variables share a path")
        return model_keys, opt_keys

    def _host_state(self, tv, ntv, ov) -> Dict[str, np.ndarray]:
        model_keys, opt_keys = self._keys()
        return dict(zip(model_keys + opt_keys, [to_host(x) for x in list(tv) + list(ntv) + list(ov)]))

    def _restore(self, arrays: Dict[str, np.ndarray], where: str):
        model_keys, opt_keys = self._keys()
        keys = model_keys + opt_keys
        missing = sorted(set(keys) - set(arrays))
        extra = sorted(set(arrays) - set(keys))
        if missing or extra:
            raise CheckpointMismatchError(
                f"checkpoint {where} does not match this model/optimizer (missing {missing[:5]}, "
                f"unexpected {extra[:5]}); point training.checkpoint_dir at a fresh directory")
        shardings = self._shardings[0] + self._shardings[1] + self._shardings[2]
        values = []
        for key, sharding, ref in zip(keys, shardings, self._state()[0] + self._state()[1]
                                      + self._state()[2]):
            host = arrays[key]
            if tuple(host.shape) != tuple(ref.shape):
                raise CheckpointMismatchError(f"checkpoint {where}: {key} has shape {host.shape}, "
                                              f"the model needs {tuple(ref.shape)}")
            values.append(global_array(host.astype(ref.dtype), sharding))
        n_tv, n_ntv = len(self._shardings[0]), len(self._shardings[1])
        return values[:n_tv], values[n_tv:n_tv + n_ntv], values[n_tv + n_ntv:]

    def _write_back(self, tv, ntv, ov):
        for v, x in zip(self.model.trainable_variables, tv):
            v.assign(x)
        for v, x in zip(self.model.non_trainable_variables, ntv):
            v.assign(x)
        for v, x in zip(self.optimizer.variables, ov):
            v.assign(x)

    def weights(self) -> Dict[str, np.ndarray]:
        """Every model variable's full value, keyed by its path inside the model."""
        return {relative_path(v): to_host(v.value) for v in self.model.weights}

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

    def _compile(self, tv, ntv, ov, ids, mask):
        with installed(self.model, self.dispatch):
            return self._step_fn.lower(tv, ntv, ov, ids, mask).compile()

    def step_runner(self, micro_batches: np.ndarray):
        """-> (run, compile_seconds): `run()` takes one optimizer step on the
        same [A, B, S] batch and returns the loss array (benchmarks)."""
        sharding = batch_sharding(self.distribution, 3)
        ids = global_array(np.asarray(micro_batches, np.int32), sharding)
        state = list(self._state())
        start = time.perf_counter()
        compiled = self.compiled_step(micro_batches)
        compile_seconds = time.perf_counter() - start

        def run():
            tv, ntv, ov, metrics = compiled(*state, ids, None)
            state[:] = [tv, ntv, ov]
            return metrics["loss"]

        return run, compile_seconds

    # ---------------------------------------------------------------- loop
    def train(self, tokens: np.ndarray, padding_mask: Optional[np.ndarray] = None,
              stop_after: Optional[int] = None) -> dict:
        """tokens: [micro-batches, B, S] int (a memmap or a forward-only
        training.token_stream.TokenStream is fine); micro-batch
        step * A + a feeds accumulation slot a of optimizer step `step`, so
        a resumed run reads exactly the batches an uninterrupted run would."""
        import jax

        s = self.s
        A = s.gradient_accumulation
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (s.batch_size, s.seq_len):
            raise ValueError(f"tokens: expected [micro-batches, {s.batch_size}, {s.seq_len}], "
                             f"got {tuple(tokens.shape)}")
        if len(tokens) < s.train_steps * A:
            raise ValueError(f"tokens: {len(tokens)} micro-batches for {s.train_steps} steps x "
                             f"{A} accumulation")
        checkpointer = (Checkpointer(s.checkpoint_dir, self.fingerprint,
                                     is_writer=jax.process_index() == 0)
                        if s.checkpoint_dir else None)
        tv, ntv, ov = self._state()
        start_step = 0
        if checkpointer is not None and checkpointer.latest() is not None:
            checkpointer.check_fingerprint()
            start_step = checkpointer.latest()
            if start_step > s.train_steps:
                raise CheckpointMismatchError(
                    f"the checkpoint in {s.checkpoint_dir} is at step {start_step} > train_steps "
                    f"{s.train_steps}; use a fresh checkpoint directory")
            tv, ntv, ov = self._restore(checkpointer.load(start_step), checkpointer.path(start_step))
            self.log_fn(f"resuming from step {start_step} ({checkpointer.path(start_step)})")
        sharding = batch_sharding(self.distribution, 3)
        width = len(str(s.train_steps))
        history: List[dict] = []
        steps_log: List[dict] = []
        interval_load = interval_dropped = None
        last_experts: Dict[str, dict] = {}
        last_checkpoint = start_step if start_step else None
        run_start = interval_start = time.perf_counter()
        interval_start_step = start_step
        first_step_seconds = None
        interval_loss = interval_ce = 0.0
        overflow_steps = overflow_calls = 0
        end = s.train_steps if stop_after is None else min(s.train_steps, stop_after)
        compiled = None
        with dtype_policy(self.policy):
            for step in range(start_step, end):
                t0 = time.perf_counter()
                ids = global_array(np.asarray(tokens[step * A:(step + 1) * A], np.int32), sharding)
                mask = (None if padding_mask is None else global_array(
                    np.asarray(padding_mask[step * A:(step + 1) * A], np.int32), sharding))
                if compiled is None:
                    compiled = self.last_compiled = self._compile(tv, ntv, ov, ids, mask)
                    _wait_for_all_processes("deepseek_tfx_step_compiled")
                tv, ntv, ov, metrics = compiled(tv, ntv, ov, ids, mask)
                m = jax.device_get(metrics)
                if first_step_seconds is None:
                    first_step_seconds = time.perf_counter() - t0
                done = step + 1
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    where = (f"the last good checkpoint is step {last_checkpoint} in "
                             f"{s.checkpoint_dir}" if last_checkpoint else
                             "no checkpoint was written in this run")
                    raise TrainingDiverged(
                        f"training diverged: loss is {loss} at step {done} (learning rate "
                        f"{warmup_cosine_lr(step, s.learning_rate, s.warmup_steps, s.train_steps):.3g}"
                        f"); {where}. Lower training.learning_rate or raise warmup_steps.")
                interval_loss += loss
                overflow_calls += int(m["dispatch_overflow"])
                overflow_steps += int(m["dispatch_overflow"] > 0)
                interval_ce += float(m["ce"])
                load, dropped = np.asarray(m["load"], np.float64), np.asarray(m["dropped"], np.float64)
                interval_load = load if interval_load is None else interval_load + load
                interval_dropped = dropped if interval_dropped is None else interval_dropped + dropped
                if s.record_history:
                    steps_log.append({"step": done, "loss": loss, "ce": float(m["ce"]),
                                      "load": m["load"].tolist(), "bias": m["bias"].tolist(),
                                      "dispatch_overflow": int(m["dispatch_overflow"]),
                                      "micro_load": m["micro_load"].tolist()
                                      if "micro_load" in m else None})
                if done % s.log_every == 0 or done == s.train_steps:
                    now = time.perf_counter()
                    n = done - interval_start_step
                    loss_mean, ce_mean = interval_loss / n, interval_ce / n
                    ppl = math.exp(min(ce_mean, 50.0))
                    lr = warmup_cosine_lr(step, s.learning_rate, s.warmup_steps, s.train_steps)
                    elapsed = now - interval_start
                    tps = n * s.tokens_per_step / elapsed if elapsed > 0 else float("nan")
                    eta = (now - run_start) / max(done - start_step, 1) * (s.train_steps - done)
                    last_experts = {name: expert_summary(interval_load[i], interval_dropped[i],
                                                         m["bias"][i])
                                    for i, name in enumerate(self.moe_names)}
                    balance = ""
                    if last_experts:
                        worst = max(e["load_max_min_ratio"] for e in last_experts.values())
                        balance = f" | expert max/min {worst:.2f}"
                    history.append({"step": done, "loss": loss_mean, "next_token_loss": ce_mean,
                                    "perplexity": ppl, "learning_rate": lr,
                                    "tokens_per_second": tps, "experts": last_experts})
                    self.log_fn(f"step {done:>{width}}/{s.train_steps} | loss {loss_mean:.4f} | "
                                f"ppl {ppl:.2f} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                                f"ETA {_format_duration(eta)}{balance}")
                    interval_loss = interval_ce = 0.0
                    interval_load = interval_dropped = None
                    interval_start, interval_start_step = time.perf_counter(), done
                if checkpointer is not None and (done % s.checkpoint_every == 0
                                                 or done == s.train_steps):
                    checkpointer.save(done, self._host_state(tv, ntv, ov))
                    last_checkpoint = done
                    self.log_fn(f"checkpoint step {done}")
        train_seconds = time.perf_counter() - run_start
        self._write_back(tv, ntv, ov)
        trained = end - start_step
        steady = trained - 1
        steady_seconds = train_seconds - (first_step_seconds or 0.0)
        return {
            "backend": "jax",
            "platform": self.platform,
            "devices": [str(d) for d in self.devices],
            "num_devices": len(self.devices),
            "processes": jax.process_count(),
            "mesh": self.plan.to_dict(),
            "expert_parallel": s.expert_parallel,
            # Steps in which some MoE call overflowed the all-to-all capacity
            # and ran extra rounds (nothing is dropped); null on one device.
            "dispatch": None if self.dispatch is None else {
                "capacity_factor": s.dispatch_capacity_factor, "overflow_steps": overflow_steps,
                "extra_rounds": overflow_calls},
            "gradient_accumulation": s.gradient_accumulation,
            "precision": {"requested": s.precision, "policy": self.policy, "float8": self.float8},
            "start_step": start_step, "final_step": end, "resumed": start_step > 0,
            "tokens_trained": trained * s.tokens_per_step,
            "train_seconds": train_seconds,
            "first_step_seconds": first_step_seconds,
            "tokens_per_second": (trained * s.tokens_per_step / train_seconds
                                  if trained and train_seconds > 0 else None),
            "steady_tokens_per_second": (steady * s.tokens_per_step / steady_seconds
                                         if steady > 0 and steady_seconds > 0 else None),
            "steady_step_ms": (1000 * steady_seconds / steady if steady > 0 else None),
            "loss_history": history,
            "expert_utilization_last_interval": last_experts,
            "checkpoint_steps": checkpointer.steps() if checkpointer else [],
            "steps": steps_log,
        }


__all__ = ["Engine", "MeshError", "TrainingDiverged", "CheckpointMismatchError",
           "resolve_precision", "next_token_ce"]
