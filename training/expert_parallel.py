"""The routed experts run per device on the ("batch", "expert") mesh
(DeepSeek-V3 section 3.2.2: expert parallelism with all-to-all dispatch).

While the engine traces its step, `ExpertDispatch` is every MoE layer's
`expert_dispatch` (model/moe.py). The router, the load counters and the balance loss stay
outside, on the global (batch-sharded) arrays: XLA reduces the [E] loads
over every device, so the bias still moves on the global load. What the
dispatch takes over is the routed block itself, inside one `shard_map`:
each device holds T/D tokens (D = all devices) and their T/D * K
assignments, and

- expert axis 1 (data parallel): runs its own assignments through the
  replicated experts (the grouped matmul, model/grouped_matmul.py). The
  weight gradients are summed over the batch axis when shard_map transposes.
- expert axis N: each device holds E/N experts. With N = 4, device r of
  an expert group (the 4 devices of one batch row):

      tokens of r   sort assignments by expert, cut into N chunks of C rows
        [T/D, H]    (chunk d: assignments to experts d*E/N .. (d+1)*E/N - 1)
           |
           |        send [N, C, H] + counts [N, E/N]
           v
      all_to_all    chunk d goes to device d; r gets chunk r of every device
           |
           |        recv [N, C, H]: rows of r's E/N experts from all N devices
           v
      grouped matmul on r's expert slice [E/N, H, I], chunk by chunk as the
           |        rows lie (each chunk sorted by local expert, padding skipped)
           v
      all_to_all    the results go back the way they came
           |
           v
      combine       out[t] = sum_k weight[t, k] * result of assignment (t, k),
                    gathered straight from the returned chunks

  Weights never leave their shard; the gradient of a slice is summed over
  the batch axis only (shard_map's transpose of an input mapped on
  "expert"); the activations' gradients take the reverse all-to-alls.

Dropless: a chunk holds C = ceil(capacity_factor * T/D * K / N) rows. When
some device has more than C assignments for one destination, the whole
mesh (a pmax decides, so every device runs the same collectives) runs
ceil(most / C) rounds of capacity-sized all-to-alls instead of one; the
extra rounds are counted (`overflow`), nothing is dropped, and memory stays
capacity-sized: a custom VJP recomputes the rounds in the backward pass
(all of them by default, so no layer keeps dispatch activations between the
passes; with recompute=False the first round's residuals are kept and only
the extra rounds rerun). JAX 0.4.30 has no ragged all-to-all, hence the
static chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import List, Optional

MESH_AXES = ("batch", "expert")


def shard_map(fn, mesh, in_specs, out_specs):
    """jax.shard_map (current JAX) or jax.experimental.shard_map (0.4.30),
    without the replication check (the transpose sums the cotangents of
    replicated inputs over the axes they are not split on either way)."""
    import jax

    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(fn, mesh, in_specs, out_specs, check_rep=False)


@dataclasses.dataclass(frozen=True)
class DispatchShape:
    """Static sizes of one device's dispatch."""
    tokens: int       # tokens per device (T/D)
    top_k: int
    experts: int      # routed experts, all devices
    shards: int       # expert-axis size N
    capacity_factor: float
    recompute: bool = True  # the backward pass reruns the rounds (_dispatched_experts)

    @property
    def local_experts(self) -> int:
        return self.experts // self.shards

    @property
    def worst_case(self) -> int:
        """Most rows one device can send to one destination: every token
        with min(K, E/N) of its (distinct) experts there."""
        return self.tokens * min(self.top_k, self.local_experts)

    @property
    def capacity(self) -> int:
        even = self.tokens * self.top_k / self.shards
        return max(1, min(self.worst_case, math.ceil(self.capacity_factor * even)))


def _inverse(permutation):
    import jax.numpy as jnp

    n = permutation.shape[0]
    return jnp.zeros((n,), jnp.int32).at[permutation].set(jnp.arange(n, dtype=jnp.int32))


def _local_experts_block(x, experts, weights, gate, up, down, *, shape: DispatchShape):
    """Expert axis 1: this device's assignments through all (replicated) experts."""
    import jax.numpy as jnp

    from model.moe import routed_expert_sum

    k = experts.shape[1]
    flat = experts.reshape(-1)
    kept = flat < shape.experts
    out = routed_expert_sum(x, jnp.where(kept, flat, 0), kept, weights, k, gate, up, down)
    return out, jnp.zeros((), jnp.int32)


def _round(r, x, weights, gate, up, down, order, per_dest, dest_start, dest_count, a_dest,
           a_offset, *, shape: DispatchShape):
    """All-to-all round r: chunk d carries rows r*C .. (r+1)*C - 1 of this
    device's assignments to destination d (sorted by expert). Returns the
    weighted sum of this round's expert outputs per token [T, H].

    Nothing assignment-sized is permuted: the send chunks are gathered from
    the tokens, the received chunks are multiplied as they lie (each is
    sorted by local expert; the grouped matmul takes its groups chunk by
    chunk, padding skipped), and the returned rows are gathered straight
    into the per-token combine."""
    import jax.numpy as jnp
    from jax import lax

    from model.expert_buckets import chunk_gathers
    from model.moe import grouped_swiglu

    n, shards, local, rows = order.shape[0], shape.shards, shape.local_experts, shape.capacity
    k = shape.top_k
    to_chunks, to_tokens = chunk_gathers()
    first = r * rows
    slot = jnp.arange(rows, dtype=jnp.int32)
    # Chunk d, row c <- sorted assignment dest_start[d] + first + c.
    valid = (first + slot[None, :] < dest_count[:, None]).reshape(-1)
    row_assign = order[jnp.minimum(dest_start[:, None] + first + slot[None, :], n - 1)].reshape(-1)
    row_token = row_assign // k
    # Assignment a went to chunk a_dest[a] at row a_offset[a] - first
    # (a_dest = N: not kept, in no chunk).
    row = a_offset - first
    mine = (a_dest < shards) & (row >= 0) & (row < rows)
    a_row = jnp.minimum(a_dest, shards - 1) * rows + jnp.clip(row, 0, rows - 1)
    a_row, mine = a_row.reshape(-1, k), mine.reshape(-1, k)
    send = to_chunks(x, row_token, valid, a_row, mine).reshape(shards, rows, -1)  # [N, C, H]
    # Rows of each local expert in this round's window of the chunk.
    ends = jnp.cumsum(per_dest, axis=1)
    in_window = (jnp.clip(ends, first, first + rows)
                 - jnp.clip(ends - per_dest, first, first + rows))  # [N dest, E/N]
    recv = lax.all_to_all(send, "expert", 0, 0, tiled=True)
    recv_count = lax.all_to_all(in_window, "expert", 0, 0, tiled=True)  # [N src, E/N]
    # Groups chunk by chunk: its E/N experts, then its padding (no weight).
    pad = rows - jnp.sum(recv_count, axis=1, keepdims=True)
    group_sizes = jnp.concatenate([recv_count, pad], axis=1).reshape(-1).astype(jnp.int32)
    group_expert = jnp.tile(jnp.append(jnp.arange(local, dtype=jnp.int32), -1), shards)
    y = grouped_swiglu(recv.reshape(shards * rows, -1), group_sizes, gate, up, down,
                       group_expert)
    back = lax.all_to_all(y.reshape(shards, rows, -1), "expert", 0, 0, tiled=True)
    return to_tokens(back.reshape(shards * rows, -1), weights.astype(back.dtype), a_row, mine,
                     row_token, row_assign, valid)


def _dispatched_experts(shape: DispatchShape):
    """f(x, weights, gate, up, down, order, per_dest, dest_start, dest_count,
    a_dest, a_offset, rounds) -> combined routed output per token:
    `rounds` capacity-sized all-to-all rounds, under a custom VJP.

    shape.recompute: the backward pass runs every round again (its forward, then
    its vjp), so no dispatch activation of any layer is kept between the
    passes (per-device temporaries below data parallel's; one more routed
    forward and two all-to-alls per layer). Otherwise the first round's
    residuals are kept and only the extra rounds (overflow, rare) are
    recomputed. Either way memory stays capacity-sized."""
    import jax
    from jax import lax

    from model.grouped_matmul import no_gradients, optimization_barrier, per_device_code

    def one_round(r, ints):
        def run(*floats):
            # The backward traces its rounds after the shard_map body has
            # been traced: mark them per-device too (the tile loop).
            with per_device_code():
                return _round(r, *floats, *ints, shape=shape)
        return run

    @jax.custom_vjp
    def experts(x, weights, gate, up, down, *ints_and_rounds):
        return forward(x, weights, gate, up, down, *ints_and_rounds)[0]

    def forward(*args):
        floats, ints, rounds = args[:5], args[5:-1], args[-1]
        # Round 0 always runs: outside the loops, so the compiled step shows
        # its collectives once per step (training/plan.py).
        if shape.recompute:
            out, first_vjp = one_round(0, ints)(*floats), None
        else:
            out, first_vjp = jax.vjp(one_round(0, ints), *floats)
        out = lax.fori_loop(1, rounds, lambda r, acc: acc + one_round(r, ints)(*floats), out)
        return out, (first_vjp, floats, ints, rounds)

    def backward(res, ct):
        first_vjp, floats, ints, rounds = res

        def recomputed_grads(r, floats, ct):
            # The cotangent's work (the transposed combine and all-to-all)
            # waits for the recomputed round's residuals, instead of
            # keeping its buffers live through the forward tile loop.
            vjp = jax.vjp(one_round(r, ints), *floats)[1]
            residuals, tree = jax.tree_util.tree_flatten(vjp)
            residuals, ct = optimization_barrier((residuals, ct))
            return tuple(jax.tree_util.tree_unflatten(tree, residuals)(ct))

        def round_grads(r, acc):
            return tuple(a + g for a, g in zip(acc, recomputed_grads(r, floats, ct)))

        if first_vjp is None:
            # The barrier (on inputs and cotangent) keeps XLA from merging
            # the recomputed round with the forward one, which would keep
            # the forward's activations alive after all.
            floats, ct = optimization_barrier((floats, ct))
            first = recomputed_grads(0, floats, ct)
        else:
            first = tuple(first_vjp(ct))
        grads = lax.fori_loop(1, rounds, round_grads, first)
        return (*grads, *no_gradients(*ints, rounds))

    experts.defvjp(forward, backward)
    return experts


def _expert_parallel_block(x, experts, weights, gate, up, down, *, shape: DispatchShape):
    """Expert axis N > 1: all-to-all to the devices of the experts and back,
    in as many capacity-sized rounds as the fullest chunk of the mesh needs."""
    import jax.numpy as jnp
    from jax import lax

    flat = experts.reshape(-1)  # E = not kept: sorts last, belongs to no chunk
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    counts = jnp.zeros((shape.experts + 1,), jnp.int32).at[flat].add(1)[:shape.experts]
    per_dest = counts.reshape(shape.shards, shape.local_experts)
    dest_count = jnp.sum(per_dest, axis=1)
    dest_start = jnp.cumsum(dest_count) - dest_count
    # Per assignment (original order): its destination and its row in the
    # stream of rows sent there (sorted position - the destination's start).
    a_dest = flat // shape.local_experts  # N for the not kept
    position = _inverse(order)
    a_offset = position - dest_start[jnp.minimum(a_dest, shape.shards - 1)]
    # Every device runs the same number of rounds (a pmax over the mesh).
    need = lax.pmax(jnp.max(dest_count), MESH_AXES)
    rounds = jnp.maximum(1, (need + shape.capacity - 1) // shape.capacity).astype(jnp.int32)
    out = _dispatched_experts(shape)(x, weights, gate, up, down, order, per_dest, dest_start,
                                     dest_count, a_dest.astype(jnp.int32), a_offset, rounds)
    return out, rounds - 1


class ExpertDispatch:
    """The routed block of every MoE layer, per device under `shard_map`.

    Traced values of the overflow flags are kept on a tape between
    `start()` and `collect()` (the engine's loss function), one per MoE call.
    """

    def __init__(self, mesh, capacity_factor: float, recompute: bool = True):
        if not capacity_factor > 0:  # the engine asks for >= 1; tests probe the boundary
            raise ValueError(f"dispatch capacity_factor: must be > 0, got {capacity_factor!r}")
        self.mesh = mesh
        self.capacity_factor = float(capacity_factor)
        self.recompute = bool(recompute)
        self.devices = math.prod(mesh.shape[a] for a in MESH_AXES)
        self.shards = mesh.shape["expert"]
        self._tape: List = []

    def shape(self, tokens: int, top_k: int, experts: int) -> DispatchShape:
        if tokens % self.devices:
            raise ValueError(f"{tokens} tokens do not divide over the {self.devices} devices")
        return DispatchShape(tokens // self.devices, top_k, experts, self.shards,
                             self.capacity_factor, self.recompute)

    def start(self) -> None:
        self._tape = []

    def collect(self) -> list:
        tape, self._tape = self._tape, []
        return tape

    def __call__(self, layer, x, valid, training):
        """DeepSeekMoE's routed block on the whole batch x [B, S, H] (valid
        [B*S]), run per device; see model/moe.py `expert_dispatch`."""
        import jax.numpy as jnp
        from jax import lax
        from jax.sharding import PartitionSpec as P

        from model.grouped_matmul import per_device_code
        from model.moe import routed_assignments, sequence_aux_terms

        c = layer.config
        batch, seq_len, hidden = x.shape
        gate, up, down = layer.expert_weights(x.dtype)
        shape = self.shape(batch * seq_len, c.num_experts_per_tok, c.n_routed_experts)
        block = _expert_parallel_block if self.shards > 1 else _local_experts_block
        with_aux = bool(training) and c.seq_aux_loss_alpha > 0

        def per_device(x, valid, router, bias, gate, up, down):
            with per_device_code():
                b = x.shape[0]
                flat = x.reshape(b * seq_len, hidden)
                experts, weights, valid_choice, scores = routed_assignments(
                    c, flat, valid, router, bias)
                kept = experts.astype("int32")
                kept = jnp.where(valid_choice, kept, c.n_routed_experts)
                w = (weights * valid_choice).astype(flat.dtype)
                k = c.num_experts_per_tok
                out, overflow = block(flat, kept.reshape(-1, k), w.reshape(-1, k), gate, up,
                                      down, shape=shape)
                load = jnp.zeros((c.n_routed_experts + 1,), jnp.float32).at[kept].add(1.0)
                real = jnp.sum(valid.astype(jnp.float32))
                # Per sequence (mapped outputs, summed by the caller: a
                # differentiable replicated scalar out of shard_map breaks
                # JAX 0.4.30's transpose).
                if with_aux:
                    aux = sequence_aux_terms(c, scores, valid, b, seq_len)
                else:
                    aux = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.float32))
                load, real = lax.psum((load[:-1], real), MESH_AXES)
                return out.reshape(b, seq_len, hidden), load, real, *aux, overflow

        tokens = P(MESH_AXES)
        expert_weight = P("expert") if self.shards > 1 else P()
        fn = shard_map(per_device, self.mesh,
                       in_specs=(tokens, tokens, P(), P(), expert_weight, expert_weight,
                                 expert_weight),
                       out_specs=(tokens, P(), P(), tokens, tokens, P()))
        router = layer.gate
        out, load, real, aux_sum, aux_sequences, overflow = fn(
            x, valid, router.weight.value, router.e_score_correction_bias.value, gate, up, down)
        self._tape.append(overflow)
        return out, load, real, jnp.sum(aux_sum), jnp.sum(aux_sequences)


@contextlib.contextmanager
def installed(model, dispatch: Optional[ExpertDispatch]):
    """`dispatch` as every MoE layer's expert_dispatch for the duration (the
    trace of the step); None: nothing changes."""
    layers = model.moe_layers() if dispatch is not None else []
    for moe in layers:
        moe.expert_dispatch = dispatch
    try:
        yield
    finally:
        for moe in layers:
            moe.expert_dispatch = None
