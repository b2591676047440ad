"""The two environments compute one function: a tiny model trained by the
engine in its own venv (.venv-engine: Python 3.12, the JAX and Keras of
requirements/engine-lock.txt) gives the same logits there as its weights do
here, in the TFX venv, loaded as the Trainer loads them (Keras 3.12 on
TensorFlow) and served from the exported SavedModel."""

import os
import re
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from components import export, trainer  # noqa: E402
from data.tfrecord import serialize_sequences  # noqa: E402
from model import get_preset  # noqa: E402
from training import launch  # noqa: E402

pytestmark = pytest.mark.integration

TINY = get_preset("tiny")
STEPS, BATCH, SEQ = 5, 8, 16
REL_TOL = 1e-5  # max |difference| / max |logit|


def _engine_lock():
    with open(os.path.join(launch.ROOT, "requirements", "engine-lock.txt")) as f:
        pins = dict(re.match(r"([^=\s]+)==(\S+)", line).groups() for line in f
                    if line.strip() and not line.startswith("#"))
    return {k.lower().replace("_", "-"): v for k, v in pins.items()}


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the export runs under the TensorFlow backend")
    root = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", rng.integers(0, TINY.vocab_size, (STEPS, BATCH, SEQ)).astype(np.int32))
    probe = rng.integers(0, TINY.vocab_size, (4, SEQ)).astype(np.int32)
    np.save(root / "probe.npy", probe)
    spec = {"model_config": TINY.to_dict(),
            "engine": {"batch_size": BATCH, "seq_len": SEQ, "train_steps": STEPS,
                       "learning_rate": 3e-3, "warmup_steps": 2, "log_every": STEPS},
            "tokens": str(root / "tokens.npy"), "output_dir": str(root / "out"),
            "logits_for": str(root / "probe.npy")}
    result = launch.run_worker(spec, str(root / "spec.json"), launch.worker_env(1),
                               log_fn=lambda line: None)
    return root, probe, result, np.load(root / "out" / "logits.npy")


def _assert_same_logits(actual, expected, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape == (4, SEQ, TINY.vocab_size), what
    rel = np.abs(actual - expected).max() / np.abs(expected).max()
    assert rel <= REL_TOL, f"{what}: logits differ by {rel:.2e} relative"


def test_the_engine_ran_in_its_own_venv_from_the_engine_lock(engine_run):
    _, _, result, _ = engine_run
    assert os.path.exists(os.path.join(launch.ENGINE_VENV, "bin", "python")), \
        "no .venv-engine in this checkout: run scripts/bootstrap.sh"
    env, lock = result["engine_environment"], _engine_lock()
    assert env["executable"] == launch.engine_python({}) != sys.executable
    assert env["python"].startswith("3.12.")
    assert {k: env[k] for k in ("jax", "jaxlib", "keras", "numpy")} == {
        k: lock[k] for k in ("jax", "jaxlib", "keras", "numpy")}
    assert keras.__version__ != env["keras"]  # really another environment


def test_trained_weights_give_the_engines_logits_in_keras_and_the_savedmodel(engine_run):
    root, probe, _, engine_logits = engine_run
    model = trainer.load_trained_model(TINY, str(root / "out" / "weights.npz"))
    _assert_same_logits(model(probe, training=False), engine_logits, "Keras on TensorFlow")
    path = export.export_saved_model(model, SEQ, str(root / "saved"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    served = serve(examples=tf.constant(serialize_sequences(probe)))["logits"]
    _assert_same_logits(served.numpy(), engine_logits, "SavedModel serving_default")
