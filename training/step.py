"""The training step: one jitted SPMD function from (state, micro-batches) to
(state, metrics).

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
"""

from __future__ import annotations


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


def training_mla_mode(config, float8: bool):
    """The MLA form the step trains with: None, the model's own no-cache form
    ("naive": per-head keys and values, every projection a Dense call, so
    float8 quantizes W_kvb too). Measured (benchmarks/README.md, "Where the
    step's time goes"): the absorbed form's attention forward + backward
    took 1.23x (mini) and 1.18x (train_vs_reference) the naive one's."""
    del config, float8
    return None


def build_train_step(model, optimizer, bias_update_speed: float, accumulation: int,
                     record_history: bool, mesh, dispatch=None, mla_mode=None):
    """-> jit(step)(tv, ntv, ov, ids, mask) -> (tv, ntv, ov, metrics), the
    state donated and its output shardings those of the variables now
    (model.trainable / non_trainable variables, optimizer.variables), the
    metrics replicated: loss, ce, the gradients' global norm, and per MoE
    layer load, dropped, bias (and micro_load with record_history),
    dispatch_overflow (the extra all-to-all rounds of `dispatch`,
    training.expert_parallel.ExpertDispatch, installed on the MoE layers
    while the step is traced). `mla_mode`: the MLA form of the forward pass
    (`training_mla_mode`; None: the model's default)."""
    import jax
    from keras import ops

    from model.moe import router_bias_update

    ntv_index = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    moes = model.moe_layers()
    bias_idx = [ntv_index[id(m.gate.e_score_correction_bias)] for m in moes]
    load_idx = [ntv_index[id(m.expert_load)] for m in moes]
    dropped_idx = [ntv_index[id(m.dropped_tokens)] for m in moes]
    gamma = float(bias_update_speed)
    overwrite = [bool(getattr(v, "overwrite_with_gradient", False))
                 for v in model.trainable_variables]

    def loss_fn(tv, ntv, ids, mask):
        inputs = ids if mask is None else {"token_ids": ids, "padding_mask": mask}
        if dispatch is not None:
            dispatch.start()
        logits, ntv, losses = model.stateless_call(tv, ntv, inputs, training=True,
                                                   return_losses=True, mode=mla_mode)
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
        # The global norm of this step's gradients (float8 scale bookkeeping
        # excluded), before clipping: a finite loss can come with non-finite
        # gradients, which the update would write into every weight.
        grad_norm = ops.sqrt(sum(ops.sum(ops.square(ops.cast(g, "float32")))
                                 for g, ow in zip(grads, overwrite) if not ow))
        tv, ov = optimizer.stateless_apply(ov, grads, tv)
        metrics = {"loss": loss_sum / accumulation, "ce": ce_sum / accumulation,
                   "dispatch_overflow": overflow_sum,
                   "grad_norm": grad_norm,
                   "load": ops.stack(loads) if loads else ops.zeros((0,)),
                   "dropped": ops.stack([ntv[i] for i in dropped_idx]) if loads
                   else ops.zeros((0,)),
                   "bias": ops.stack([ntv[i] for i in bias_idx]) if loads
                   else ops.zeros((0,))}
        if record_history and loads:  # cumulative load after each micro-batch
            metrics["micro_load"] = (ops.stack(micro_loads[0])[None] if accumulation == 1
                                     else ops.stack(micro_loads, axis=1))
        return tv, ntv, ov, metrics

    shardings = lambda variables: [v.value.sharding for v in variables]  # noqa: E731
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = (shardings(model.trainable_variables),
                       shardings(model.non_trainable_variables),
                       shardings(optimizer.variables))
    return jax.jit(step, donate_argnums=(0, 1, 2), out_shardings=(*state_shardings, replicated))
