"""Reads the pushed models (TF Serving layout: <serving_dir>/<version>/)."""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple


def latest_version(serving_dir: str) -> str:
    if not os.path.isdir(serving_dir):
        raise FileNotFoundError(f"no pushed models at {serving_dir} (was a model blessed?)")
    versions = sorted((d for d in os.listdir(serving_dir) if d.isdigit()), key=int)
    if not versions:
        raise FileNotFoundError(f"no pushed model versions in {serving_dir}")
    return os.path.join(serving_dir, versions[-1])


def generate_from_pushed(serving_dir: str, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         temperature: float = 0.0, top_k: int = 0,
                         seed: int = 0) -> Tuple[List[List[int]], str]:
    import numpy as np
    import tensorflow as tf

    from model.generation import left_pad

    path = latest_version(serving_dir)
    loaded = tf.saved_model.load(path)
    ids, mask = left_pad(prompts)
    out = loaded.signatures["generate"](
        token_ids=tf.constant(ids), padding_mask=tf.constant(mask),
        max_new_tokens=tf.constant(max_new_tokens, tf.int32),
        temperature=tf.constant(temperature, tf.float32), top_k=tf.constant(top_k, tf.int32),
        seed=tf.constant(seed, tf.int32))
    return np.asarray(out["tokens"]).tolist(), os.path.basename(path)
