r"""Exact optimal next-token losses and Bayes scoring of token arrays (nats).

A next-token LM on a sequence ``x_0 .. x_{L-1}`` is scored on the targets
``t = 1 .. L-1`` (predicting ``x_t`` from ``x_{<t}``), so the optimal loss is

    optimal_loss = 1/(L-1) * sum_{t=1}^{L-1} H(X_t | X_{<t})

where ``H(X_t | X_{<t})`` is the expected cross-entropy of the Bayes predictor
(which knows the spec and the model it implies). All probabilities are the
quantised ones actually sampled from (see `data.models`). Per kind:

* uniform:  ``H_t = ln V``, so ``optimal_loss = ln V``.
* zipf:     ``H_t = H(p) = -sum_v p_v ln p_v`` for every t.
* markov (order k, transition table ``P[c, v]``, row entropies
  ``h(c) = -sum_v P[c, v] ln P[c, v]``):
    - ``t < k``: the first k tokens are iid uniform, so ``x_t`` is independent
      of ``x_{<t}`` and ``H_t = ln V``;
    - ``t >= k``: ``H_t = sum_c pi_t(c) h(c)`` where ``pi_t`` is the exact
      distribution of the context ``(x_{t-k}..x_{t-1})``: ``pi_k`` is uniform
      over the ``V^k`` contexts and ``pi_{t+1}(s, v) = sum_a pi_t(a, s) P[(a, s), v]``
      (``a`` = oldest token, ``s`` = the other k-1). The propagation is exact;
      it stops early only once ``||pi_{t+1} - pi_t||_1 < delta = 1e-14`` (a
      numerical fixed point; since the transition operator is an L1
      contraction, every later ``H_t`` then moves by at most
      ``(L - t) * delta * ln V``).
  So ``optimal_loss = [(k-1) ln V + sum_{t=k}^{L-1} pi_t . h] / (L-1)``
  (with ``min(k, L) - 1`` uniform terms when ``k >= L``).
* copy (prefix P): ``x_t`` is uniform and independent of the past for
  ``t < P`` and equals ``x_{t-P}`` (loss 0) for ``t >= P``:
  ``optimal_loss = (P - 1) ln V / (L - 1)``.
* mixture (weights w, component z): not computed exactly (the Bayes predictor
  must infer z from ``x_{<t}``). Bounds, both exact:
    lower = sum_c w_c optimal_loss_c         (``H(X_t|X_<t) >= H(X_t|X_<t, Z)``)
    upper = sum_c w_c upper_c + H(w)/(L-1)   (``H(X_{1:}|X_0) <= H(X_{1:}|X_0,Z) + H(Z)``)
  `optimal_loss` returns the *lower* bound and `optimal_loss_is_exact` is
  False. `bayes_token_losses` scores mixtures with the exact Bayes predictive
  ``p(x_t|x_<t) = sum_c p(c|x_<t) p_c(x_t|x_<t)``, so its mean over many
  sequences lies between the bounds.
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import numpy as np

from .models import (
    CopyModel,
    IidModel,
    MarkovModel,
    MixtureModel,
    Model,
    UniformModel,
    build_model,
)
from .spec import DataSpec

_CONVERGENCE_L1 = 1e-14


def _markov_position_losses(m: MarkovModel) -> np.ndarray:
    V, k, L = m.vocab_size, m.order, m.seq_len
    out = np.empty(L - 1, dtype=np.float64)
    out[: min(k, L) - 1] = math.log(V)  # targets t = 1 .. k-1
    if k >= L:
        return out
    rows, S = V**k, V ** (k - 1)
    h = m.row_entropy
    pi = np.full(rows, 1.0 / rows)
    # P3[s, a, v] = P[(a, s), v], so pi_next[s, :] = pi[a, s] @ P3[s]
    use_einsum = k > 1 and V < 16  # tiny batched matmuls are slow; einsum wins there
    P3 = None if k == 1 or use_einsum else np.ascontiguousarray(m.probs.reshape(V, S, V).transpose(1, 0, 2))
    t = k
    while t < L:
        out[t - 1] = pi @ h
        if t == L - 1:
            break
        if k == 1:
            nxt = pi @ m.probs
        elif use_einsum:
            nxt = np.einsum("as,asv->sv", pi.reshape(V, S), m.probs.reshape(V, S, V)).reshape(rows)
        else:
            nxt = np.matmul(pi.reshape(V, S).T[:, None, :], P3).reshape(rows)
        converged = np.abs(nxt - pi).sum() < _CONVERGENCE_L1
        pi = nxt
        t += 1
        if converged:
            out[t - 1 :] = pi @ h
            break
    return out


def _position_bounds(m: Model) -> Tuple[np.ndarray, np.ndarray]:
    """(lower, upper) per target position t=1..L-1 of sum_t H_t's bound.

    For exact kinds lower == upper. For mixtures, the upper bound's H(w) term
    is spread evenly over positions (only the sum/mean is meaningful)."""
    V, L = m.vocab_size, m.seq_len
    if isinstance(m, UniformModel):
        x = np.full(L - 1, math.log(V))
        return x, x
    if isinstance(m, IidModel):
        x = np.full(L - 1, m.entropy)
        return x, x
    if isinstance(m, MarkovModel):
        x = _markov_position_losses(m)
        return x, x
    if isinstance(m, CopyModel):
        x = np.zeros(L - 1)
        x[: m.prefix_length - 1] = math.log(V)  # t = 1 .. P-1
        return x, x
    if isinstance(m, MixtureModel):
        w = m.weight_counts / m.weight_counts.sum()
        lo = np.zeros(L - 1)
        hi = np.full(L - 1, m.weight_entropy / (L - 1))
        for wc, comp in zip(w, m.components):
            if wc > 0:
                clo, chi = _position_bounds(comp)
                lo += wc * clo
                hi += wc * chi
        return lo, hi
    raise TypeError(type(m))


@functools.lru_cache(maxsize=64)
def _cached_position_bounds(spec: DataSpec) -> Tuple[np.ndarray, np.ndarray]:
    lo, hi = _position_bounds(build_model(spec))
    lo, hi = lo.copy(), hi.copy()
    lo.setflags(write=False)
    hi.setflags(write=False)
    return lo, hi


def optimal_loss_is_exact(spec: DataSpec) -> bool:
    """True unless the spec is (or contains) a mixture with >1 component of positive weight."""
    if spec.kind != "mixture":
        return True
    active = [c for c, w in zip(spec.components, spec.weights) if w > 0]
    return len(active) == 1 and optimal_loss_is_exact(active[0])


def per_position_optimal_loss(spec: DataSpec) -> np.ndarray:
    """float64 ``[seq_len - 1]``: ``H(X_t | X_{<t})`` for targets t = 1..L-1
    (for mixtures, the per-position *lower* bound)."""
    return _cached_position_bounds(spec)[0].copy()


def optimal_loss(spec: DataSpec) -> float:
    """Optimal mean next-token cross-entropy (nats) over targets 1..L-1.

    Exact for all kinds except mixtures, where it is the documented lower bound
    (weighted mean of component optima); see `optimal_loss_is_exact`."""
    return float(_cached_position_bounds(spec)[0].mean())


def optimal_loss_bounds(spec: DataSpec) -> Tuple[float, float]:
    """``(lower, upper)`` on the optimal loss; equal when exact."""
    lo, hi = _cached_position_bounds(spec)
    if optimal_loss_is_exact(spec):
        return float(lo.mean()), float(lo.mean())
    return float(lo.mean()), float(hi.mean())


# ---------------------------------------------------------------- scoring
def _check_tokens(spec: DataSpec, tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != spec.seq_len:
        raise ValueError(f"tokens must have shape [N, seq_len={spec.seq_len}], got {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= spec.vocab_size):
        raise ValueError(f"tokens must be in [0, vocab_size={spec.vocab_size})")
    return tokens.astype(np.int64, copy=False)


def _log_probs(m: Model, x: np.ndarray) -> np.ndarray:
    """log p(x_t | x_{<t}) for t = 0..L-1 (t = 0: log p(x_0)), float64 [N, L]."""
    N, L = x.shape
    V = m.vocab_size
    if isinstance(m, UniformModel):
        return np.full((N, L), -math.log(V))
    if isinstance(m, IidModel):
        return m.log_probs[x]
    if isinstance(m, MarkovModel):
        k = m.order
        out = np.full((N, L), -math.log(V))
        if k < L:
            ctx = np.zeros((N, L - k), dtype=np.int64)
            for i in range(k):
                ctx = ctx * V + x[:, i : L - k + i]
            p = m.probs.reshape(-1)[ctx * V + x[:, k:]]
            with np.errstate(divide="ignore"):
                out[:, k:] = np.log(p)
        return out
    if isinstance(m, CopyModel):
        P = m.prefix_length
        out = np.full((N, L), -math.log(V))
        out[:, P:] = np.where(x[:, P:] == x[:, :-P], 0.0, -np.inf)
        return out
    if isinstance(m, MixtureModel):
        # joint[c, n, t] = log w_c + log p_c(x_0..x_t)
        joint = np.stack(
            [lw + np.cumsum(_log_probs(c, x), axis=1) for lw, c in zip(m.log_weights, m.components)]
        )
        mx = joint.max(axis=0)
        safe = np.where(np.isfinite(mx), mx, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lse = safe + np.log(np.exp(joint - safe).sum(axis=0))  # log p(x_0..x_t)
            out = np.empty((N, L))
            out[:, 0] = lse[:, 0]
            out[:, 1:] = np.diff(lse, axis=1)
        out[np.isnan(out)] = -np.inf  # only after an impossible prefix
        return out
    raise TypeError(type(m))


def token_log_probs(spec: DataSpec, tokens) -> np.ndarray:
    """float64 ``[N, seq_len]``: ``log p(x_t | x_{<t})`` under the true model
    (column 0 is ``log p(x_0)``); ``-inf`` for impossible tokens."""
    return _log_probs(build_model(spec), _check_tokens(spec, tokens))


def bayes_token_losses(spec: DataSpec, tokens) -> np.ndarray:
    """float64 ``[N, seq_len - 1]``: cross-entropy (nats) of the Bayes predictor
    on targets 1..L-1 (``inf`` for tokens impossible under the model)."""
    return -token_log_probs(spec, tokens)[:, 1:]


def empirical_bayes_loss(spec: DataSpec, tokens) -> float:
    """Mean Bayes-predictor loss over all targets 1..L-1 of all rows of `tokens`.

    For sequences drawn from `spec` its expectation is the exact optimal loss
    (between `optimal_loss_bounds` for mixtures)."""
    return float(bayes_token_losses(spec, tokens).mean())
