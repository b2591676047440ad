"""Grouped matmul for the routed experts: rows sorted by expert, each
expert's rows times that expert's weight matrix.

    grouped_matmul(x [N, d], w [E, d, o], group_sizes [E], block) -> [N, o]

Rows 0..g_0-1 belong to expert 0, the next g_1 to expert 1, and so on; rows
past sum(group_sizes) get zeros (dropped / pad assignments sort last). Work is
done in tiles of `block` rows, each inside one expert's group, so it costs
about N + E * block rows, never E * N.

With `group_expert` [G], group g (g_0, g_1, ... rows in turn, G groups in any
order) uses weight group_expert[g], and a negative index marks rows that get
zeros and cost nothing: the expert-parallel dispatch multiplies the received
chunks as they lie (each sorted by expert, padded to the capacity) instead of
permuting them into one expert-major buffer and back.

Backends (the switch lives here only):
- JAX on one CPU device (`_use_jax_loop`): a `lax.while_loop` over the tiles actually used (the trip count is
  dynamic, the shapes static), each tile a dynamic slice of x, one expert's
  [d, o] indexed in place and one matmul. Reverse-mode cannot go through a
  dynamic while_loop, so a `custom_vjp` runs the same loop backward
  (dx = dy w_e^T per tile, dw_e += x^T dy accumulated in place).
- Otherwise (several devices, accelerators; TensorFlow, used for export/
  serving/tests): keras.ops over the
  static tile bound, each tile with its gathered expert weights; autodiff.

Where the JAX loop runs, the experts' whole SwiGLU is one loop too
(`fused_grouped_swiglu`: per tile gate, up, activation and down; one loop
backward), not three grouped matmuls: a third of the loop trips, and the
engine step took 0.96x the time (train_vs_reference and mini, same-process
A/B) with 7-10% fewer temporaries. Each loop is a jitted function cached by
its static sizes, so eager callers compile it once, not on every call.
"""

from __future__ import annotations

import contextlib
import functools

import keras
from keras import ops

# Tile height cap per backend (4096 rows x 256 x 128, 8-256 experts, XLA:CPU).
# The JAX loop indexes the weights in place; its dots ran fastest at 32 rows
# (fwd 3.5 ms at 8 experts vs 3.9 at 16 and ~2x at 64; dense 3.0), and short
# tiles keep the padding low (under E * tile rows). The keras.ops path gathers
# every tile's weights, so it wants fewer, taller tiles.
_MAX_TILE_ROWS = {"jax": 32}
_MAX_TILE_ROWS_OTHER = 64


_PER_DEVICE = []  # non-empty while tracing per-device code (shard_map bodies)


@contextlib.contextmanager
def per_device_code():
    """Marks code traced for one device's shard (a shard_map body): there the
    tile loop is local work again, not an SPMD-partitioned loop."""
    _PER_DEVICE.append(True)
    try:
        yield
    finally:
        _PER_DEVICE.pop()


def _use_jax_loop() -> bool:
    """The tile loop runs one small dot at a time: it pays on a single CPU
    device (64 experts, inference: 20 vs 60 ms) and per device inside a
    shard_map, but under SPMD over 8 virtual CPU devices the mini training
    step took 9.5x its 1-device time (the gathered tiles: 1.0x), and on an
    accelerator it would launch one kernel per tile. Elsewhere the gathered
    tiles run."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu" and (jax.device_count() == 1 or bool(_PER_DEVICE))


def tile_rows(rows, experts: int) -> int:
    """Static tile height: a power of two up to the backend's cap, no larger
    than the mean group (decode-sized inputs get short tiles)."""
    cap = _MAX_TILE_ROWS["jax"] if _use_jax_loop() else _MAX_TILE_ROWS_OTHER
    if not isinstance(rows, int):
        return cap
    mean_group = max(1, rows // experts)
    return min(cap, 1 << (mean_group.bit_length() - 1))


def max_tiles(rows, experts: int, block: int):
    """Bound on sum_e ceil(g_e / block) over groups summing to <= rows."""
    if isinstance(rows, int):
        return max(1, min(rows, (rows + min(experts, rows) * (block - 1)) // block))
    return ops.maximum(1, ops.minimum(rows, (rows + ops.minimum(experts, rows) * (block - 1)) // block))


def _schedule(group_sizes, block, tiles, group_expert=None):
    """Per tile j: its weight index, first and end row (end - first <=
    block), and the number of tiles used. Tiles past the used count have
    empty ranges; groups with a negative group_expert get no tiles."""
    g = ops.cast(group_sizes, "int32")
    per_group = (g + block - 1) // block
    if group_expert is not None:
        per_group = ops.where(group_expert >= 0, per_group, 0)
    tile_end = ops.cumsum(per_group)
    group_end = ops.cumsum(g)
    j = ops.arange(tiles, dtype="int32")
    group = ops.cast(ops.clip(ops.searchsorted(tile_end, j, side="right"), 0, ops.shape(g)[0] - 1),
                     "int32")
    lo = ops.take(group_end - g, group) + (j - ops.take(tile_end - per_group, group)) * block
    hi = ops.minimum(lo + block, ops.take(group_end, group))
    hi = ops.where(j < tile_end[-1], hi, lo)  # unused tiles cover nothing
    e = group if group_expert is None else ops.maximum(ops.take(group_expert, group), 0)
    return e, lo, hi, tile_end[-1]


def grouped_matmul(x, w, group_sizes, block=None, group_expert=None):
    """x [N, d] rows sorted by group; w [E, d, o]; group_sizes [E] int (or
    [G] with group_expert [G], see the module doc); block: static tile
    height (default tile_rows; clipped to N when N is static)."""
    rows = x.shape[0]
    groups = w.shape[0] if group_expert is None else group_sizes.shape[0]
    if block is None:
        block = tile_rows(rows, groups)
    if isinstance(rows, int):
        block = max(1, min(block, rows))
    if _use_jax_loop():  # shapes are always static under JAX
        return _jax_grouped_matmul(x, w, group_sizes, block, max_tiles(rows, groups, block),
                                   group_expert)
    if rows is None:
        rows = ops.shape(x)[0]
    return _ops_grouped_matmul(x, w, group_sizes, block, max_tiles(rows, groups, block), rows,
                               group_expert)


# ------------------------------------------------------------------ keras.ops
def _ops_tiles(group_sizes, block, tiles, rows, group_expert=None):
    """(weight index per tile [tiles], row index [tiles, block], which of
    those rows are the tile's own [tiles, block]) for the keras.ops forms.
    A tile near the end is shifted back to stay inside [0, rows); the mask
    keeps only its own rows (and none past `rows` when rows < block)."""
    e, lo, hi, _ = _schedule(group_sizes, block, tiles, group_expert)
    start = ops.maximum(ops.minimum(lo, rows - block), 0)
    index = start[:, None] + ops.arange(block, dtype="int32")[None, :]
    mine = ops.logical_and(index >= lo[:, None], index < hi[:, None])
    return e, ops.minimum(index, rows - 1), mine


def _ops_untile(y, index, mine, rows):
    """Each tile's own rows of y [tiles, block, o] back to their places in [rows, o]."""
    y = ops.where(mine[..., None], y, ops.zeros((), y.dtype))
    target = ops.reshape(ops.where(mine, index, rows), (-1,))  # row `rows`: discarded
    out = ops.segment_sum(ops.reshape(y, (-1, ops.shape(y)[-1])), target, num_segments=rows + 1)
    return out[:rows]


def _ops_grouped_matmul(x, w, group_sizes, block, tiles, rows, group_expert=None):
    e, index, mine = _ops_tiles(group_sizes, block, tiles, rows, group_expert)
    y = ops.einsum("tbd,tdo->tbo", ops.take(x, index, axis=0), ops.take(w, e, axis=0))
    return _ops_untile(y, index, mine, rows)


# ------------------------------------------------------------------------ JAX
def optimization_barrier(values):
    """lax.optimization_barrier (current JAX); JAX 0.4.30 keeps it private."""
    from jax import lax

    barrier = getattr(lax, "optimization_barrier", None)
    if barrier is None:
        from jax._src.ad_checkpoint import _optimization_barrier as barrier
    return barrier(values)


def _zeros_after(operand, *specs):
    """Zero buffers for a tile loop to fill, one per (shape, dtype) in
    `specs`, each a broadcast of its own scalar taken through a barrier with
    `operand`. A broadcast of a bare constant would be merged with every
    other zeros of its shape in the step (XLA's CSE): one buffer kept live
    from the first MoE layer's forward to the last one's backward, and a
    copy for each loop that fills it (mini, expert parallel 4: three such
    [768, 128] buffers at the step's peak)."""
    import jax.numpy as jnp

    scalars = optimization_barrier((tuple(jnp.zeros((), d) for _, d in specs), operand))[0]
    return tuple(jnp.broadcast_to(z, shape) for z, (shape, _) in zip(scalars, specs))


def no_gradients(*ints):
    """The custom VJPs' cotangents for integer inputs (float0 zeros)."""
    import jax
    import numpy as np

    return tuple(np.zeros(np.shape(i), jax.dtypes.float0) for i in ints)


def _tile_window(rows, block, lo, hi):
    """(first row of the block-row slice holding rows [lo, hi), which of its
    rows those are [block, 1]): the slice is shifted back to stay in range."""
    import jax.numpy as jnp

    start = jnp.minimum(lo, rows - block)
    r = start + jnp.arange(block, dtype=jnp.int32)
    return start, ((r >= lo) & (r < hi))[:, None]


def _put_tile(buffer, start, mine, value):
    """buffer with the tile's own rows (`mine` of the block-row slice at
    `start`) replaced by value; the slice's other rows keep their contents."""
    import jax.numpy as jnp
    from jax import lax

    kept = lax.dynamic_slice_in_dim(buffer, start, value.shape[0])
    return lax.dynamic_update_slice_in_dim(
        buffer, jnp.where(mine, value.astype(buffer.dtype), kept), start, 0)


def _expert(w, e):
    """Expert e's [d, o] of w [E, d, o], indexed in place."""
    from jax import lax

    return lax.dynamic_index_in_dim(w, e, keepdims=False)


def _add_to_expert(dw, e, update):
    """dw [E, d, o] with update added to expert e's slice."""
    from jax import lax

    return lax.dynamic_update_index_in_dim(dw, _expert(dw, e) + update, e, 0)


def _group_arrays(group_sizes, group_expert):
    import jax.numpy as jnp

    g = jnp.asarray(group_sizes, jnp.int32)
    ge = jnp.arange(g.shape[0], dtype=jnp.int32) if group_expert is None else jnp.asarray(
        group_expert, jnp.int32)
    return g, ge


def _jax_grouped_matmul(x, w, group_sizes, block, tiles, group_expert=None):
    return _gmm_function(x.shape[0], block, tiles)(x, w, *_group_arrays(group_sizes, group_expert))


@functools.lru_cache(maxsize=None)
def _gmm_function(rows, block, tiles):
    """The tile loop with its custom VJP as one jitted function per static
    (rows, block, tiles): eager callers (tests, eager decoding) reuse its
    compilation instead of retracing a fresh loop each call; inside an outer
    jit it is inlined."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    window = functools.partial(_tile_window, rows, block)

    def forward(x, w, g, ge):
        e, lo, hi, used = _schedule(g, block, tiles, ge)

        def body(j, out):
            start, mine = window(lo[j], hi[j])
            return _put_tile(out, start, mine, lax.dynamic_slice_in_dim(x, start, block) @ _expert(w, e[j]))

        return lax.fori_loop(0, used, body, _zeros_after(x, ((rows, w.shape[2]), x.dtype))[0])

    @jax.custom_vjp
    def gmm(x, w, g, ge):
        return forward(x, w, g, ge)

    def gmm_fwd(x, w, g, ge):
        return forward(x, w, g, ge), (x, w, g, ge)

    def gmm_bwd(res, dy):
        x, w, g, ge = res
        e, lo, hi, used = _schedule(g, block, tiles, ge)

        def body(j, carry):
            dx, dw = carry
            start, mine = window(lo[j], hi[j])
            dys = jnp.where(mine, lax.dynamic_slice_in_dim(dy, start, block), 0).astype(w.dtype)
            dx = _put_tile(dx, start, mine, dys @ _expert(w, e[j]).T)
            xs = lax.dynamic_slice_in_dim(x, start, block).astype(w.dtype)
            dw = _add_to_expert(dw, e[j], jnp.matmul(xs.T, dys, preferred_element_type=jnp.float32))
            return dx, dw

        # dw sums over many tiles: accumulate in float32 (bf16 weights too).
        init = _zeros_after(dy, (x.shape, x.dtype), (w.shape, jnp.float32))
        dx, dw = lax.fori_loop(0, used, body, init)
        return (dx, dw.astype(w.dtype), *no_gradients(g, ge))

    gmm.defvjp(gmm_fwd, gmm_bwd)
    return jax.jit(gmm)


# --------------------------------------------------- unsort rows (JAX loop)
def unsort_rows(out, order, position):
    """out[position] for the routed block on the JAX loop path, `position`
    being the inverse permutation of `order` (out's rows are the assignments
    sorted by expert): a gather whose gradient is a gather too (d out =
    d y[order]), where autodiff would scatter-add into a zeroed buffer
    (same-process A/B, engine step: temporaries -7.7% train_vs_reference,
    -3.5% mini; time 0.98x / 0.93x median, noise). The sort's own gather
    keeps its scatter-add gradient: as a gather + sum over top_k it measured
    slower and saved nothing."""
    return _unsort_rows_function()(out, order, position)


@functools.lru_cache(maxsize=None)
def _unsort_rows_function():
    import jax

    @jax.custom_vjp
    def unsort(out, order, position):
        return out[position]

    def unsort_fwd(out, order, position):
        return out[position], (order, position)

    def unsort_bwd(res, d_y):
        order, position = res
        return (d_y[order], *no_gradients(order, position))

    unsort.defvjp(unsort_fwd, unsort_bwd)
    return unsort


# ------------------------------------------------- fused SwiGLU (JAX loop)
def use_fused_swiglu() -> bool:
    """Whether grouped_swiglu runs as one fused tile loop (below): where the
    JAX tile loop runs at all (the buckets and the unsort's gather go with it)."""
    return _use_jax_loop() and FUSED_SWIGLU[0]


# On by default: grouped_swiglu is one fused tile loop (JAX on one CPU device)
# or one gathered-tiles SwiGLU (elsewhere). Tests (fused == three grouped
# matmuls) and same-process A/B timings switch it off.
FUSED_SWIGLU = [True]


def fused_grouped_swiglu(x, w_gate, w_up, w_down, group_sizes, block=None, group_expert=None):
    """silu(x W_gate[e]) * (x W_up[e]) W_down[e] per row of group e, as one
    tile loop forward and one backward (custom VJP), each tile's three (six)
    dots back to back: a third of the loop trips of three grouped matmuls,
    and the [N, intermediate] activations never go round through three
    separate loops. Same tiling and group rules as grouped_matmul. Where the
    JAX loop does not run, the same SwiGLU over gathered tiles (keras.ops,
    autodiff)."""
    rows = x.shape[0]
    groups = w_gate.shape[0] if group_expert is None else group_sizes.shape[0]
    if block is None:
        block = tile_rows(rows, groups)
    if not _use_jax_loop():
        if isinstance(rows, int):
            block = max(1, min(block, rows))
        else:
            rows = ops.shape(x)[0]
        return _ops_grouped_swiglu(x, w_gate, w_up, w_down, group_sizes, block,
                                   max_tiles(rows, groups, block), rows, group_expert)
    block = max(1, min(block, rows))
    fn = _fused_swiglu_function(rows, block, max_tiles(rows, groups, block))
    return fn(x, w_gate, w_up, w_down, *_group_arrays(group_sizes, group_expert))


def _ops_grouped_swiglu(x, wg, wu, wd, group_sizes, block, tiles, rows, group_expert=None):
    """The keras.ops form (TensorFlow, several JAX devices, accelerators):
    one schedule, one gather of the tiles' rows and one scatter back for the
    whole SwiGLU, where three grouped matmuls have three of each (a third of
    the graph: the SavedModel export traces it several times)."""
    e, index, mine = _ops_tiles(group_sizes, block, tiles, rows, group_expert)
    xs = ops.take(x, index, axis=0)
    gate = ops.einsum("tbd,tdo->tbo", xs, ops.take(wg, e, axis=0))
    up = ops.einsum("tbd,tdo->tbo", xs, ops.take(wu, e, axis=0))
    y = ops.einsum("tbo,toh->tbh", ops.silu(gate) * up, ops.take(wd, e, axis=0))
    return _ops_untile(y, index, mine, rows)


@functools.lru_cache(maxsize=None)
def _fused_swiglu_function(rows, block, tiles):
    """One jitted custom-VJP function per static (rows, block, tiles), as
    _gmm_function."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    window = functools.partial(_tile_window, rows, block)

    def forward(x, wg, wu, wd, g, ge, save):
        hidden, inter = x.shape[1], wg.shape[2]
        e, lo, hi, used = _schedule(g, block, tiles, ge)

        def body(j, carry):
            out, gate, up = carry
            start, mine = window(lo[j], hi[j])
            xs = lax.dynamic_slice_in_dim(x, start, block)
            a = xs @ _expert(wg, e[j])
            b = xs @ _expert(wu, e[j])
            out = _put_tile(out, start, mine, (jax.nn.silu(a) * b) @ _expert(wd, e[j]))
            if save:
                gate, up = _put_tile(gate, start, mine, a), _put_tile(up, start, mine, b)
            return out, gate, up

        saved = (rows, inter) if save else (1, 1)
        init = _zeros_after(x, ((rows, hidden), x.dtype), (saved, x.dtype), (saved, x.dtype))
        return lax.fori_loop(0, used, body, init)

    @jax.custom_vjp
    def swiglu(x, wg, wu, wd, g, ge):
        return forward(x, wg, wu, wd, g, ge, save=False)[0]

    def swiglu_fwd(x, wg, wu, wd, g, ge):
        out, gate, up = forward(x, wg, wu, wd, g, ge, save=True)
        return out, (x, wg, wu, wd, g, ge, gate, up)

    def swiglu_bwd(res, dy):
        x, wg, wu, wd, g, ge, gate, up = res
        e, lo, hi, used = _schedule(g, block, tiles, ge)
        f32 = jnp.float32

        def body(j, carry):
            dx, dwg, dwu, dwd = carry
            start, mine = window(lo[j], hi[j])
            ej = e[j]
            xs = lax.dynamic_slice_in_dim(x, start, block)
            a = lax.dynamic_slice_in_dim(gate, start, block)
            b = lax.dynamic_slice_in_dim(up, start, block)
            dys = jnp.where(mine, lax.dynamic_slice_in_dim(dy, start, block), 0).astype(wd.dtype)
            sig = jax.nn.sigmoid(a)
            act = a * sig
            dh = dys @ _expert(wd, ej).T
            db = (dh * act).astype(wu.dtype)
            da = (dh * b * sig * (1 + a * (1 - sig))).astype(wg.dtype)
            dx = _put_tile(dx, start, mine, da @ _expert(wg, ej).T + db @ _expert(wu, ej).T)
            dwd = _add_to_expert(dwd, ej, jnp.matmul((act * b).T, dys, preferred_element_type=f32))
            dwg = _add_to_expert(dwg, ej, jnp.matmul(xs.T, da, preferred_element_type=f32))
            dwu = _add_to_expert(dwu, ej, jnp.matmul(xs.T, db, preferred_element_type=f32))
            return dx, dwg, dwu, dwd

        init = _zeros_after(dy, (x.shape, x.dtype), (wg.shape, f32), (wu.shape, f32),
                            (wd.shape, f32))
        dx, dwg, dwu, dwd = lax.fori_loop(0, used, body, init)
        return (dx, dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype),
                *no_gradients(g, ge))

    swiglu.defvjp(swiglu_fwd, swiglu_bwd)
    return jax.jit(swiglu)
