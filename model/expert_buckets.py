"""Routed experts as fixed-size buckets: one batched SwiGLU over [E, C, hidden].

Where the JAX tile loop runs (`grouped_matmul.use_fused_swiglu`), a layer
with enough rows per expert puts each expert's first C assignments into that
expert's bucket of C rows and multiplies all buckets at once (three batched
dots each way instead of ~N / 32 loop trips of small ones); empty slots are
zero rows. Nothing is dropped: the assignments past an expert's C go to
rows after all buckets, grouped by expert (their row follows from their
position among the expert's assignments, no sort), and the fused tile loop
runs just the tiles they fill, none in the common case.

The moves in and out are gathers both ways (`chunk_gathers`: each row knows
its assignment, each assignment its row), over buckets and overflow rows at
once. (Until session 27 the overflow took the whole sorted tile-loop path
inside a `lax.cond`: a sort, a gather and a combine of all T*K assignments
and a rematerialized loop; same-process A/B of the engine step: equal time
within the noise, 1.5-2.5% less CPU, compile 8.9 vs 10.2 s on the mini.)
On the train_vs_reference step (T 1024 x top-4 of 16, hidden 256, expert
128, one CPU device) see benchmarks/README.md for the measured ratio.
"""

from __future__ import annotations

import functools
import math

# Bucket rows per expert = this x the mean assignments per expert (rounded
# up to a multiple of 8): room for an uneven router at the cost of zero rows.
BUCKET_FACTOR = 1.25
# Below this mean the buckets would be mostly padding (decode-sized inputs):
# the tile loop runs instead.
MIN_MEAN_ROWS = 32
# On by default; same-process A/B timings and tests switch it off.
EXPERT_BUCKETS = [True]


def bucket_rows(assignments: int, experts: int):
    """Static bucket height C for `assignments` rows over `experts`, or None
    when the layer should not use buckets."""
    if not EXPERT_BUCKETS[0] or not isinstance(assignments, int):
        return None
    mean = assignments / experts
    if mean < MIN_MEAN_ROWS:
        return None
    return min(assignments, 8 * math.ceil(BUCKET_FACTOR * mean / 8))


@functools.lru_cache(maxsize=None)
def chunk_gathers():
    """(to_chunks, to_tokens): the moves between tokens [T, H] and chunk (or
    bucket) rows [R, H], each the other's transpose. Both directions are
    gathers, because both maps are known: row r holds assignment
    row_assign[r] of token row_token[r] (row_valid), and assignment (t, j)
    sits at row a_row[t, j] (a_mine[t, j]; one to one with the valid rows).
    Autodiff of a gather would scatter-add into a zeroed [R, H] buffer."""
    import jax
    import jax.numpy as jnp

    from model.grouped_matmul import no_gradients

    def gather_assignments(rows, a_row, a_mine):  # [R, H] -> [T, K, H]
        return jnp.where(a_mine[..., None], rows[a_row], 0)

    @jax.custom_vjp
    def to_chunks(x, row_token, row_valid, a_row, a_mine):
        """Row r <- x[row_token[r]] (zero where not valid)."""
        return jnp.where(row_valid[:, None], x[row_token], 0)

    def to_chunks_fwd(x, row_token, row_valid, a_row, a_mine):
        return to_chunks(x, row_token, row_valid, a_row, a_mine), (row_token, row_valid,
                                                                  a_row, a_mine)

    def to_chunks_bwd(res, d_rows):
        row_token, row_valid, a_row, a_mine = res
        d_x = jnp.sum(gather_assignments(d_rows, a_row, a_mine), axis=1)
        return (d_x, *no_gradients(row_token, row_valid, a_row, a_mine))

    to_chunks.defvjp(to_chunks_fwd, to_chunks_bwd)

    @jax.custom_vjp
    def to_tokens(rows, w, a_row, a_mine, row_token, row_assign, row_valid):
        """out[t] = sum_j w[t, j] * rows[a_row[t, j]] over t's assignments here."""
        return jnp.sum(gather_assignments(rows, a_row, a_mine) * w[..., None], axis=1)

    def to_tokens_fwd(rows, w, *ints):
        return to_tokens(rows, w, *ints), (rows, w, *ints)

    def to_tokens_bwd(res, ct):
        rows, w, a_row, a_mine, row_token, row_assign, row_valid = res
        w_row = w.reshape(-1)[row_assign][:, None]
        d_rows = jnp.where(row_valid[:, None], ct[row_token] * w_row, 0)
        d_w = jnp.sum(gather_assignments(rows, a_row, a_mine) * ct[:, None, :], axis=-1)
        return (d_rows, d_w.astype(w.dtype),
                *no_gradients(a_row, a_mine, row_token, row_assign, row_valid))

    to_tokens.defvjp(to_tokens_fwd, to_tokens_bwd)
    return to_chunks, to_tokens


def bucketed_experts(x, flat_experts, kept, weights, k, gate_proj, up_proj, down_proj, capacity):
    """sum_j weights[t, j] * SwiGLU_{e(t, j)}(x[t]) over t's kept assignments
    -> [T, hidden]. x [T, hidden]; flat_experts, kept, weights [T*K]
    (assignment a is token a // k); `capacity` the static C of bucket_rows.
    One jitted function per static (k, capacity), so an eager caller
    (tests, eager decoding) compiles it once, not on every call."""
    return _bucketed_function(k, capacity)(x, flat_experts, kept, weights, gate_proj, up_proj,
                                           down_proj)


def overflow_rows(assignments: int, k: int, capacity: int) -> int:
    """Static bound on the assignments past full buckets. Top-k routing picks
    k distinct experts per token, so an expert holds at most T = N / k rows,
    and sum_e max(load_e - C, 0) peaks with k experts at T each."""
    return max(0, min(assignments, k * (assignments // k - capacity)))


@functools.lru_cache(maxsize=None)
def _bucketed_function(k, capacity):
    import jax
    import jax.numpy as jnp

    from model.grouped_matmul import fused_grouped_swiglu, tile_rows

    def bucketed(x, flat_experts, kept, weights, gate_proj, up_proj, down_proj):
        experts = gate_proj.shape[0]
        n = flat_experts.shape[0]
        slots, spill = experts * capacity, overflow_rows(n, k, capacity)
        flat_experts = flat_experts.astype(jnp.int32)
        # Position of each assignment among its expert's kept ones, in order.
        mine_of = (flat_experts[:, None] == jnp.arange(experts, dtype=jnp.int32)) & kept[:, None]
        count = jnp.cumsum(mine_of, axis=0, dtype=jnp.int32)
        position = jnp.take_along_axis(count, flat_experts[:, None], axis=1)[:, 0] - 1
        # Rows past an expert's bucket go after all buckets, grouped by expert
        # in expert order (the tile loop's layout), no sort needed.
        past = jnp.maximum(count[-1] - capacity, 0)  # [E]
        past_start = jnp.cumsum(past) - past
        a_row = jnp.where(position < capacity, flat_experts * capacity + position,
                          slots + past_start[flat_experts] + position - capacity)
        rows = slots + spill
        target = jnp.where(kept, a_row, rows)  # out of range: dropped by the scatter
        row_assign = jnp.zeros((rows,), jnp.int32).at[target].set(
            jnp.arange(n, dtype=jnp.int32), mode="drop")
        row_valid = jnp.zeros((rows,), bool).at[target].set(True, mode="drop")
        row_token = row_assign // k
        a_row, a_mine = a_row.reshape(-1, k), kept.reshape(-1, k)

        to_chunks, to_tokens = chunk_gathers()
        chunks = to_chunks(x, row_token, row_valid, a_row, a_mine).astype(gate_proj.dtype)
        buckets = chunks[:slots].reshape(experts, capacity, -1)
        gate = jnp.einsum("ech,ehi->eci", buckets, gate_proj)
        up = jnp.einsum("ech,ehi->eci", buckets, up_proj)
        out = [jnp.einsum("eci,eih->ech", jax.nn.silu(gate) * up, down_proj).reshape(slots, -1)]
        if spill:  # the tile loop runs only the tiles these rows fill (often none)
            out.append(fused_grouped_swiglu(chunks[slots:], gate_proj, up_proj, down_proj, past,
                                            tile_rows(spill, experts)))
        return to_tokens(jnp.concatenate(out).astype(x.dtype),
                         weights.reshape(-1, k).astype(x.dtype), a_row, a_mine, row_token,
                         row_assign, row_valid)

    return jax.jit(bucketed)
