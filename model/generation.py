"""Autoregressive generation with the KV cache (absorbed MLA by default).

Prompts of different lengths are left-padded; every sequence's RoPE positions
start at 0 at its first real token, and padded cache slots are masked out, so
a prompt generates the same tokens alone or in a batch. Sampling runs on the
host in NumPy (greedy, temperature, top-k, top-p), seeded.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from keras import ops


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """-> (token_ids [B, P] int32, padding_mask [B, P] int32)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(prompts), width), dtype=np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
                top_k: Optional[int] = None, top_p: Optional[float] = None) -> np.ndarray:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return logits.argmax(-1).astype(np.int32)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, -1)
        # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
        keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    cumulative = probs.cumsum(-1)
    draws = rng.random((probs.shape[0], 1))
    return np.minimum((cumulative < draws).sum(-1), probs.shape[-1] - 1).astype(np.int32)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_id: Optional[int] = None,
             seed: int = 0, mode: Optional[str] = None, pad_id: int = 0,
             cache_dtype: str = "float32") -> List[List[int]]:
    """Returns the new tokens of each prompt (ending at EOS when it appears)."""
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    ids, mask = left_pad(prompts, pad_id)
    batch, width = ids.shape
    total = width + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"generate: prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    rng = np.random.default_rng(seed)
    caches = model.init_caches(batch, total, mode=mode, dtype=cache_dtype)
    key_mask = np.zeros((batch, total), dtype=np.int32)
    key_mask[:, :width] = mask
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    lengths = mask.sum(1).astype(np.int32)

    logits, caches = model.call_with_cache(ids, positions, caches, 0, key_mask)
    out = np.zeros((batch, max_new_tokens), dtype=np.int32)
    finished = np.zeros(batch, dtype=bool)
    for step in range(max_new_tokens):
        token = sample_next(ops.convert_to_numpy(logits[:, -1]), rng, temperature, top_k, top_p)
        token = np.where(finished, pad_id, token)
        out[:, step] = token
        if eos_id is not None:
            finished |= token == eos_id
        if finished.all() or step == max_new_tokens - 1:
            break
        index = width + step
        key_mask[:, index] = 1
        logits, caches = model.call_with_cache(
            token[:, None], (lengths + step)[:, None], caches, index, key_mask)
    results = []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        results.append(row)
    return results
