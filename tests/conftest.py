"""Shared test helpers. Backend-specific code lives here so model tests stay
backend-agnostic (they run under TensorFlow and JAX)."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def gradients(model, loss_fn, *args):
    """Gradients of loss_fn(model, *args) + the auxiliary losses the call adds
    (model.losses) w.r.t. model.trainable_variables, as NumPy."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(model, *args)
            loss = loss + sum(model.losses) if model.losses else loss
        grads = tape.gradient(loss, model.trainable_variables)
        return [None if g is None else np.asarray(tf.convert_to_tensor(g)) for g in grads]
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def f(train_values):
            mapping = (list(zip(model.trainable_variables, train_values))
                       + list(zip(model.non_trainable_variables, non_trainable)))
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
                loss = loss_fn(model, *args)
            return loss + sum(scope.losses) if scope.losses else loss

        # One compiled program: op-by-op eager autodiff of a whole model took
        # ~80 s on 2 cores (every op dispatched and compiled alone).
        return [np.asarray(g) for g in jax.jit(jax.grad(f))(trainable)]
    raise NotImplementedError(backend)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
