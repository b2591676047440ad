"""The true generative models behind each `DataSpec` kind (pure NumPy).

Every categorical distribution used for sampling is stored *quantised*: the
probabilities are integers counts out of ``PROB_SCALE = 2**40`` (rows sum to
exactly ``PROB_SCALE``). The quantised distribution **is** the model: sampling
is exact inverse-CDF sampling on integers and all losses/entropies are computed
from the same quantised probabilities, so "optimal loss" and "empirical Bayes
loss" refer to exactly the distribution the data was drawn from. (Quantisation
moves each probability by < 2**-40 relative to the float softmax/Zipf values.)

Model parameters are derived from ``spec.seed`` through
``SeedSequence(seed, spawn_key=(TABLE_STREAM, 0))``; they are independent of
the per-block sequence streams used by `data.generators`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Tuple, Union

import numpy as np

from .spec import DataSpec

PROB_BITS = 40
PROB_SCALE = 1 << PROB_BITS

TABLE_STREAM = 1  # spawn_key stream id for model parameters
SEQUENCE_STREAM = 2  # spawn_key stream id for per-block sequence randomness

# Rows of the markov table built per chunk (bounds temporary memory).
_TABLE_CHUNK_ENTRIES = 1 << 20


def rng_for(seed: int, stream: int, index: int) -> np.random.Generator:
    """Independent PCG64 stream for ``(seed, stream, index)``.

    Uses ``spawn_key`` (not an entropy list) because entropy lists that differ
    only by trailing zeros collide in ``SeedSequence``.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(stream, index))))


def quantize_probs(p: np.ndarray) -> np.ndarray:
    """Float probabilities ``[..., V]`` -> int64 counts summing to PROB_SCALE per row.

    Floors ``p * PROB_SCALE`` and gives the (tiny) remainder to each row's
    argmax, so no positive count becomes zero and no zero becomes positive
    except at the argmax.
    """
    p = np.asarray(p, dtype=np.float64)
    counts = np.floor(p * PROB_SCALE).astype(np.int64)
    deficit = PROB_SCALE - counts.sum(axis=-1)
    idx = np.argmax(counts, axis=-1)
    flat = counts.reshape(-1, p.shape[-1])  # a view: counts is freshly allocated
    flat[np.arange(flat.shape[0]), idx.reshape(-1)] += deficit.reshape(-1)
    return counts


def entropy_of_counts(counts: np.ndarray) -> np.ndarray:
    """Entropy in nats of quantised distributions (last axis), with 0 log 0 = 0."""
    p = counts.astype(np.float64) / PROB_SCALE
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(counts > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class UniformModel:
    vocab_size: int
    seq_len: int


@dataclasses.dataclass(frozen=True, eq=False)
class IidModel:
    """iid tokens from a fixed quantised distribution (zipf)."""

    vocab_size: int
    seq_len: int
    counts: np.ndarray  # int64 [V]
    cdf: np.ndarray  # int64 [V], cumulative counts, cdf[-1] == PROB_SCALE
    log_probs: np.ndarray  # float64 [V] (-inf for zero counts)
    entropy: float


@dataclasses.dataclass(frozen=True, eq=False)
class MarkovModel:
    """Order-k chain. Context index of tokens (c_1..c_k) is sum c_i V^(k-i)."""

    vocab_size: int
    seq_len: int
    order: int
    probs: np.ndarray  # float64 [V**k, V] quantised transition probabilities
    flat_cdf: np.ndarray  # int64 [V**k * V]: row r holds r*PROB_SCALE + cumulative counts
    row_entropy: np.ndarray  # float64 [V**k]


@dataclasses.dataclass(frozen=True, eq=False)
class CopyModel:
    vocab_size: int
    seq_len: int
    prefix_length: int


@dataclasses.dataclass(frozen=True, eq=False)
class MixtureModel:
    vocab_size: int
    seq_len: int
    components: Tuple["Model", ...]
    component_specs: Tuple[DataSpec, ...]
    weight_counts: np.ndarray  # int64 [C]
    weight_cdf: np.ndarray  # int64 [C]
    log_weights: np.ndarray  # float64 [C]
    weight_entropy: float


Model = Union[UniformModel, IidModel, MarkovModel, CopyModel, MixtureModel]


def zipf_float_probs(vocab_size: int, exponent: float, seed: int) -> np.ndarray:
    """Unquantised Zipf probabilities, permuted by the seed's table stream."""
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    w = ranks ** (-exponent)
    p_by_rank = w / w.sum()
    perm = rng_for(seed, TABLE_STREAM, 0).permutation(vocab_size)
    p = np.empty(vocab_size, dtype=np.float64)
    p[perm] = p_by_rank  # token perm[r] has rank r
    return p


def _build_markov(spec: DataSpec) -> MarkovModel:
    V, k = spec.vocab_size, spec.order
    rows = V**k
    rng = rng_for(spec.seed, TABLE_STREAM, 0)
    probs = np.empty((rows, V), dtype=np.float64)
    flat_cdf = np.empty(rows * V, dtype=np.int64)
    row_entropy = np.empty(rows, dtype=np.float64)
    chunk = max(1, _TABLE_CHUNK_ENTRIES // V)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        logits = rng.standard_normal((r1 - r0, V)) / spec.temperature
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        e /= e.sum(axis=1, keepdims=True)
        counts = quantize_probs(e)
        probs[r0:r1] = counts / PROB_SCALE
        row_entropy[r0:r1] = entropy_of_counts(counts)
        cum = np.cumsum(counts, axis=1)
        cum += (np.arange(r0, r1, dtype=np.int64) << PROB_BITS)[:, None]
        flat_cdf[r0 * V : r1 * V] = cum.reshape(-1)
    for a in (probs, flat_cdf, row_entropy):
        a.setflags(write=False)
    return MarkovModel(V, spec.seq_len, k, probs, flat_cdf, row_entropy)


@functools.lru_cache(maxsize=16)
def build_model(spec: DataSpec) -> Model:
    """The (cached, read-only) true model of `spec`."""
    if not isinstance(spec, DataSpec):
        raise TypeError(f"expected a DataSpec, got {type(spec).__name__}")
    V, L = spec.vocab_size, spec.seq_len
    if spec.kind == "uniform":
        return UniformModel(V, L)
    if spec.kind == "zipf":
        counts = quantize_probs(zipf_float_probs(V, spec.exponent, spec.seed))
        with np.errstate(divide="ignore"):
            log_probs = np.log(counts / PROB_SCALE)
        arrays = (counts, np.cumsum(counts), log_probs)
        for a in arrays:
            a.setflags(write=False)
        return IidModel(V, L, *arrays, float(entropy_of_counts(counts)))
    if spec.kind == "markov":
        return _build_markov(spec)
    if spec.kind == "copy":
        return CopyModel(V, L, spec.prefix_length)
    if spec.kind == "mixture":
        total = math.fsum(spec.weights)
        wc = quantize_probs(np.array(spec.weights) / total)
        with np.errstate(divide="ignore"):
            logw = np.log(wc / PROB_SCALE)
        arrays = (wc, np.cumsum(wc), logw)
        for a in arrays:
            a.setflags(write=False)
        comps = tuple(build_model(c) for c in spec.components)
        return MixtureModel(V, L, comps, spec.components, *arrays, float(entropy_of_counts(wc)))
    raise AssertionError(spec.kind)  # unreachable: DataSpec validates kind


def markov_transition_matrix(spec: DataSpec) -> np.ndarray:
    """Read-only float64 ``[V**order, V]`` table of p(next | context) of a markov spec.

    Row index of context ``(x_{t-k}, ..., x_{t-1})`` is ``sum_i x_{t-k+i} * V**(k-1-i)``.
    """
    if spec.kind != "markov":
        raise ValueError(f"markov_transition_matrix needs kind 'markov', got {spec.kind!r}")
    return build_model(spec).probs


def unigram_probs(spec: DataSpec) -> np.ndarray:
    """float64 ``[V]`` token distribution of an iid spec (``uniform`` or ``zipf``)."""
    if spec.kind == "uniform":
        return np.full(spec.vocab_size, 1.0 / spec.vocab_size)
    if spec.kind == "zipf":
        return build_model(spec).counts / PROB_SCALE
    raise ValueError(f"unigram_probs needs kind 'uniform' or 'zipf', got {spec.kind!r}")


def mixture_weights(spec: DataSpec) -> np.ndarray:
    """float64 ``[C]`` normalised (quantised) component probabilities of a mixture spec."""
    if spec.kind != "mixture":
        raise ValueError(f"mixture_weights needs kind 'mixture', got {spec.kind!r}")
    return build_model(spec).weight_counts / PROB_SCALE
