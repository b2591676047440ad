"""Reads the pushed models (TF Serving layout: <serving_dir>/<version>/)."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple


def latest_version(serving_dir: str) -> str:
    """The newest complete version directory (a push still copying, or one
    that died half-way, is passed over)."""
    from components.serving_versions import latest_complete, missing_parts, versions

    found = versions(serving_dir)
    if not found:
        raise FileNotFoundError(f"no pushed model versions in {serving_dir} (was a model blessed?)")
    latest = latest_complete(serving_dir)
    if latest is None:
        newest = found[-1][1]
        raise FileNotFoundError(f"no complete pushed model in {serving_dir}: {newest} lacks "
                                f"{', '.join(missing_parts(newest))}")
    return latest[1]


def check_version(path: str) -> str:
    """`path` when it holds a complete SavedModel, else FileNotFoundError."""
    from components.serving_versions import missing_parts

    missing = missing_parts(path)
    if missing:
        raise FileNotFoundError(f"the pushed model {path} is incomplete: it lacks {', '.join(missing)}")
    return path


def _request_error(error) -> str:
    """The `generate: ...` sentence of a failed tf.debugging assert."""
    import re

    found = re.search(r"generate: [^\]\n]*", str(getattr(error, "message", error)))
    return found.group(0).strip() if found else " ".join(str(error).split())[:300]


def pushed_from_metadata(metadata) -> str:
    """The version directory of the newest model the Pusher recorded as
    pushed in ML Metadata (`metadata`: a pipeline.metadata_store target or
    SQLite path), checked complete."""
    from app.inspect_metadata import open_store, properties
    from pipeline.metadata_store import as_target

    store = open_store(metadata)
    pushed = [a for a in store.get_artifacts_by_type("PushedModel")
              if properties(a).get("pushed") == 1 and properties(a).get("pushed_destination")]
    if not pushed:
        raise FileNotFoundError(f"no pushed model recorded in {as_target(metadata).describe()}")
    newest = max(pushed, key=lambda a: (a.create_time_since_epoch, a.id))
    return check_version(properties(newest)["pushed_destination"])


def generate_from_pushed(serving_dir: str, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                         top_p: float = 1.0, eos_id: int = -1, version_dir: Optional[str] = None
                         ) -> Tuple[List[List[int]], str]:
    """Calls the latest pushed model's `generate` signature; returns each
    prompt's new tokens (cut after EOS) and the model version. A bad request
    raises GenerationRequestError (a ValueError) naming the problem: the
    checks that need no model here, the rest from the signature's asserts.
    `version_dir` (e.g. from pushed_from_metadata) replaces the newest
    complete version of `serving_dir`."""
    from model.generation import GenerationRequestError, left_pad

    checks = [(max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {max_new_tokens}"),
              (temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
              (top_k >= 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
              (0 < top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {top_p}")]
    for ok, message in checks:
        if not ok:
            raise GenerationRequestError(f"generate: {message}")
    import numpy as np
    import tensorflow as tf

    path = version_dir or latest_version(serving_dir)
    loaded = tf.saved_model.load(path)
    ids, mask = left_pad(prompts)
    try:
        out = loaded.signatures["generate"](
            token_ids=tf.constant(ids), padding_mask=tf.constant(mask),
            max_new_tokens=tf.constant(max_new_tokens, tf.int32),
            temperature=tf.constant(temperature, tf.float32), top_k=tf.constant(top_k, tf.int32),
            top_p=tf.constant(top_p, tf.float32), eos_id=tf.constant(eos_id, tf.int32),
            seed=tf.constant(seed, tf.int32))
    except tf.errors.InvalidArgumentError as e:
        raise GenerationRequestError(_request_error(e)) from None
    tokens, lengths = np.asarray(out["tokens"]).tolist(), np.asarray(out["lengths"]).tolist()
    return [row[:n] for row, n in zip(tokens, lengths)], os.path.basename(path)
