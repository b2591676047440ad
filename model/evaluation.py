"""The one evaluation loss (used by the Trainer, the gate and the benchmarks):
mean next-token cross-entropy in nats over every target position of a
[N, L] token array, batched. Backend-agnostic: the model runs under whatever
Keras backend is loaded; the cross-entropy is computed in float64 NumPy."""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np


def next_token_loss_sum(model, tokens: np.ndarray, batch_size: int,
                        padding_mask: Optional[np.ndarray] = None):
    """-> (sum of per-target cross-entropies, number of targets). With a
    padding mask only targets whose token and predecessor are real count."""
    import keras

    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or len(tokens) == 0:
        raise ValueError(f"eval tokens: need a non-empty [N, L >= 2] array, got {tokens.shape}")
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        ids = tokens[start:start + batch_size].astype(np.int32)
        inputs = ids
        weights = np.ones((len(ids), ids.shape[1] - 1))
        if padding_mask is not None:
            mask = np.asarray(padding_mask[start:start + batch_size], np.int32)
            inputs = {"token_ids": ids, "padding_mask": mask}
            weights = (mask[:, 1:] * mask[:, :-1]).astype(np.float64)
        logits = np.asarray(keras.ops.convert_to_numpy(model(inputs, training=False)),
                            np.float64)[:, :-1]
        logits = logits - logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ce = -np.take_along_axis(log_probs, ids[:, 1:, None].astype(np.int64), -1)[..., 0]
        total += float((ce * weights).sum())
        count += int(weights.sum())
    return total, count


def eval_loss(model, tokens: np.ndarray, batch_size: int,
              padding_mask: Optional[np.ndarray] = None) -> float:
    """Mean next-token cross-entropy (nats) over all target positions."""
    total, count = next_token_loss_sum(model, tokens, batch_size, padding_mask)
    if not count:
        raise ValueError("eval tokens: no target positions")
    return total / count


def eval_metrics(model, tokens: np.ndarray, batch_size: int) -> Dict[str, float]:
    """eval_loss, eval_perplexity, eval_batches, eval_target_tokens."""
    total, count = next_token_loss_sum(model, tokens, batch_size)
    loss = total / count
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_batches": -(-len(tokens) // batch_size), "eval_target_tokens": count}
