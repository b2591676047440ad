"""Training precision: the Keras dtype policy a precision setting means on a
platform, and float8 (model.checks.PRECISIONS lists the settings)."""

from __future__ import annotations

import contextlib


def resolve_precision(precision: str, platform: str):
    """-> (Keras dtype policy, float8?). "auto": mixed_bfloat16 on GPU/TPU,
    float32 on CPU; "float8": Keras float8 training on top of "auto"."""
    auto = "float32" if platform == "cpu" else "mixed_bfloat16"
    return {"auto": (auto, False), "float32": ("float32", False),
            "bf16": ("mixed_bfloat16", False), "float8": (auto, True)}[precision]


@contextlib.contextmanager
def dtype_policy(name: str):
    """Keras' global dtype policy set to `name` inside the block."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
