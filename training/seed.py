"""Seeding Keras, Python and NumPy in the engine's process (used by the
engine and, before any device is touched, by `training.parallel`)."""

from __future__ import annotations

import random

import numpy as np


def set_seed(seed: int) -> None:
    """keras.utils.set_random_seed without its side effect of importing
    TensorFlow (to seed tf.random) when TF is installed."""
    from keras.src.backend.common import global_state
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    random.seed(seed)
    np.random.seed(seed)
