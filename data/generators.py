"""Seeded, shard-independent generation of synthetic token sequences (pure NumPy).

Determinism / sharding rule
---------------------------
Sequences are produced in fixed blocks of ``BLOCK_SIZE`` sequences. Sequence
``i`` of a spec is row ``i % BLOCK_SIZE`` of block ``b = i // BLOCK_SIZE``, and
block ``b`` is generated, vectorised over its rows, from its own generator

    np.random.Generator(np.random.PCG64(
        np.random.SeedSequence(spec.seed, spawn_key=(SEQUENCE_STREAM, b))))

(model parameters use the separate stream ``(TABLE_STREAM, 0)``). Hence
``generate(spec, n, start)`` is a pure function of ``(spec, i)`` for every row:
``generate(spec, 100)`` equals ``concat(generate(spec, 50), generate(spec, 50, 50))``
and Beam workers can produce any disjoint ranges independently. Ranges aligned
to ``BLOCK_SIZE`` (see `shard_ranges`) avoid generating rows that are thrown
away. ``BLOCK_SIZE``, the stream ids and the sampling order are part of the
data format: changing any of them changes the data, so bump
``GENERATOR_VERSION`` if you do.

Per-kind sampling (row-vectorised within a block)
-------------------------------------------------
* uniform: ``rng.integers(0, V, (BLOCK_SIZE, L))``.
* zipf: inverse CDF on the quantised distribution with 40-bit uniform integers.
* markov(order k): first k tokens ``rng.integers(0, V, (BLOCK_SIZE, k))``; then
  for t = k..L-1 (40-bit uniforms drawn time-major in chunks of ``_U_CHUNK``
  steps) ``x_t = searchsorted(flat_cdf, ctx * 2**40 + u, 'right') - ctx * V``.
* copy(P): prefix ``rng.integers(0, V, (BLOCK_SIZE, P))``; ``x_t = x_{t mod P}``.
* mixture: component of every row by inverse CDF on the quantised weights;
  then for each component c in order, its rows are sampled (with the same block
  generator) by the component's sampler.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Tuple

import numpy as np

from model.checks import check_int

from . import losses
from .models import (
    PROB_BITS,
    PROB_SCALE,
    SEQUENCE_STREAM,
    CopyModel,
    IidModel,
    MarkovModel,
    MixtureModel,
    Model,
    UniformModel,
    build_model,
    rng_for,
)
from .spec import DataSpec

BLOCK_SIZE = 1024
GENERATOR_VERSION = 1
_U_CHUNK = 64  # markov: time steps of uniforms drawn per rng call


def _sample_uniform(m: UniformModel, rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, m.vocab_size, size=(n, m.seq_len), dtype=np.int32)


def _sample_iid(m: IidModel, rng: np.random.Generator, n: int) -> np.ndarray:
    u = rng.integers(0, PROB_SCALE, size=(n, m.seq_len), dtype=np.int64)
    return np.searchsorted(m.cdf, u, side="right").astype(np.int32)


def _sample_markov(m: MarkovModel, rng: np.random.Generator, n: int) -> np.ndarray:
    V, k, L = m.vocab_size, m.order, m.seq_len
    out = np.empty((L, n), dtype=np.int64)  # time-major: each step writes a contiguous row
    out[:k] = rng.integers(0, V, size=(n, k), dtype=np.int64).T
    ctx = np.zeros(n, dtype=np.int64)
    for i in range(k):
        ctx = ctx * V + out[i]
    suffix_mod = V ** (k - 1)
    flat_cdf = m.flat_cdf
    for t0 in range(k, L, _U_CHUNK):
        t1 = min(L, t0 + _U_CHUNK)
        u = rng.integers(0, PROB_SCALE, size=(t1 - t0, n), dtype=np.int64)
        for t in range(t0, t1):
            u_t = u[t - t0]
            u_t += ctx << PROB_BITS
            tok = np.searchsorted(flat_cdf, u_t, side="right")
            tok -= ctx * V
            out[t] = tok
            if k == 1:
                ctx = tok
            else:
                ctx %= suffix_mod
                ctx *= V
                ctx += tok
    return np.ascontiguousarray(out.T, dtype=np.int32)


def _sample_copy(m: CopyModel, rng: np.random.Generator, n: int) -> np.ndarray:
    prefix = rng.integers(0, m.vocab_size, size=(n, m.prefix_length), dtype=np.int32)
    return prefix[:, np.arange(m.seq_len) % m.prefix_length]


def _sample_mixture(m: MixtureModel, rng: np.random.Generator, n: int) -> np.ndarray:
    u = rng.integers(0, PROB_SCALE, size=n, dtype=np.int64)
    which = np.searchsorted(m.weight_cdf, u, side="right")
    out = np.empty((n, m.seq_len), dtype=np.int32)
    for c, comp in enumerate(m.components):
        rows = np.flatnonzero(which == c)
        if rows.size:
            out[rows] = _sample(comp, rng, rows.size)
    return out


def _sample(m: Model, rng: np.random.Generator, n: int) -> np.ndarray:
    if isinstance(m, UniformModel):
        return _sample_uniform(m, rng, n)
    if isinstance(m, IidModel):
        return _sample_iid(m, rng, n)
    if isinstance(m, MarkovModel):
        return _sample_markov(m, rng, n)
    if isinstance(m, CopyModel):
        return _sample_copy(m, rng, n)
    if isinstance(m, MixtureModel):
        return _sample_mixture(m, rng, n)
    raise TypeError(type(m))


def generate_block(spec: DataSpec, block_index: int) -> np.ndarray:
    """Sequences ``[block_index * BLOCK_SIZE, (block_index + 1) * BLOCK_SIZE)`` as int32."""
    block_index = check_int("block_index", block_index, 0)
    return _sample(build_model(spec), rng_for(spec.seed, SEQUENCE_STREAM, block_index), BLOCK_SIZE)


def generate(spec: DataSpec, num_sequences: int, start_index: int = 0) -> np.ndarray:
    """Sequences ``start_index .. start_index + num_sequences - 1`` of `spec`.

    Returns int32 ``[num_sequences, spec.seq_len]`` with values in
    ``[0, spec.vocab_size)``. Row ``j`` depends only on ``(spec, start_index + j)``
    (see the module docstring for the block rule), so any sharding of an index
    range yields the same union.
    """
    if not isinstance(spec, DataSpec):
        raise TypeError(f"spec must be a DataSpec, got {type(spec).__name__}")
    n = check_int("num_sequences", num_sequences, 0)
    start = check_int("start_index", start_index, 0)
    out = np.empty((n, spec.seq_len), dtype=np.int32)
    if n == 0:
        return out
    stop = start + n
    model = build_model(spec)
    for b in range(start // BLOCK_SIZE, (stop - 1) // BLOCK_SIZE + 1):
        lo, hi = max(start, b * BLOCK_SIZE), min(stop, (b + 1) * BLOCK_SIZE)
        block = _sample(model, rng_for(spec.seed, SEQUENCE_STREAM, b), BLOCK_SIZE)
        out[lo - start : hi - start] = block[lo - b * BLOCK_SIZE : hi - b * BLOCK_SIZE]
    return out


def iter_generate(spec: DataSpec, num_sequences: int, start_index: int = 0) -> Iterator[np.ndarray]:
    """Like `generate` but yields the range in block-aligned int32 chunks (bounded memory)."""
    n = check_int("num_sequences", num_sequences, 0)
    start = check_int("start_index", start_index, 0)
    stop = start + n
    pos = start
    while pos < stop:
        nxt = min(stop, (pos // BLOCK_SIZE + 1) * BLOCK_SIZE)
        yield generate(spec, nxt - pos, pos)
        pos = nxt


def shard_ranges(num_sequences: int, num_shards: int, start_index: int = 0) -> List[Tuple[int, int]]:
    """Split ``[start_index, start_index + num_sequences)`` into <= num_shards
    contiguous ``(start, count)`` ranges whose interior boundaries are multiples
    of ``BLOCK_SIZE`` (so no block is generated twice). Empty ranges are dropped."""
    n = check_int("num_sequences", num_sequences, 0)
    shards = check_int("num_shards", num_shards, 1)
    start = check_int("start_index", start_index, 0)
    stop = start + n
    first_block, last_block = start // BLOCK_SIZE, (stop + BLOCK_SIZE - 1) // BLOCK_SIZE
    nblocks = last_block - first_block
    per = math.ceil(nblocks / shards) if nblocks else 0
    out = []
    for s in range(shards):
        lo = max(start, (first_block + s * per) * BLOCK_SIZE)
        hi = min(stop, (first_block + (s + 1) * per) * BLOCK_SIZE)
        if hi > lo:
            out.append((lo, hi - lo))
    return out


def describe(spec: DataSpec) -> dict:
    """JSON-serialisable settings plus derived facts, for artifact properties.

    Keys: everything in ``spec.to_dict()`` (mixture components as a list of
    dicts) plus ``optimal_loss`` (nats/token over target positions 1..L-1),
    ``optimal_loss_is_exact``, ``optimal_loss_upper_bound`` (== optimal_loss
    when exact), ``optimal_loss_unit`` ("nats"), ``block_size`` and
    ``generator_version``. ``DataSpec.from_dict(describe(spec)) == spec``.
    """
    lower, upper = losses.optimal_loss_bounds(spec)
    d = spec.to_dict()
    d.update(
        optimal_loss=float(lower),
        optimal_loss_is_exact=bool(losses.optimal_loss_is_exact(spec)),
        optimal_loss_upper_bound=float(upper),
        optimal_loss_unit="nats",
        block_size=BLOCK_SIZE,
        generator_version=GENERATOR_VERSION,
    )
    return d
