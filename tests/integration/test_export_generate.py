"""The SavedModel's `generate` signature, called from a fresh process that
imports nothing but TensorFlow, against `model.generation.generate`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [[1, 2, 3, 4, 5, 6], [7], [10, 11, 12]]
NEW = 7

# Runs in a plain Python + TensorFlow: reads requests as JSON on stdin, prints
# the outputs (or the error message) of each.
_CLIENT = r"""
import json, sys
import tensorflow as tf

gen = tf.saved_model.load(sys.argv[1]).signatures["generate"]
results = []
for req in json.load(sys.stdin):
    width = max(len(p) for p in req["prompts"]) if req["prompts"] else 0
    ids = [[0] * (width - len(p)) + p for p in req["prompts"]]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in req["prompts"]]
    try:
        out = gen(token_ids=tf.constant(ids, tf.int32, shape=[len(ids), width]),
                  padding_mask=tf.constant(mask, tf.int32, shape=[len(ids), width]),
                  max_new_tokens=tf.constant(req["max_new_tokens"], tf.int32),
                  temperature=tf.constant(req.get("temperature", 0.0), tf.float32),
                  top_k=tf.constant(req.get("top_k", 0), tf.int32),
                  top_p=tf.constant(req.get("top_p", 1.0), tf.float32),
                  eos_id=tf.constant(req.get("eos_id", -1), tf.int32),
                  seed=tf.constant(req.get("seed", 0), tf.int32))
        results.append({"tokens": out["tokens"].numpy().tolist(),
                        "lengths": out["lengths"].numpy().tolist(),
                        "dtypes": [out["tokens"].dtype.name, out["lengths"].dtype.name]})
    except tf.errors.InvalidArgumentError as e:
        results.append({"error": e.message})
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the SavedModel export runs under the TensorFlow backend")
    from components.export import export_saved_model
    from model import DeepSeekV3ForCausalLM, get_preset

    keras.utils.set_random_seed(0)
    model = DeepSeekV3ForCausalLM(get_preset("tiny"))
    path = str(tmp_path_factory.mktemp("export") / "saved")
    export_saved_model(model, 8, path)
    return model, path


def _call_fresh_process(path, requests):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_BACKEND")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run([sys.executable, "-c", _CLIENT, path], input=json.dumps(requests),
                          capture_output=True, text=True, timeout=600, cwd="/", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


def test_signature_matches_generate_and_refuses_bad_requests(exported):
    from model.generation import generate, generate_tokens

    model, path = exported
    greedy = generate(model, PROMPTS, NEW)
    eos = greedy[0][2]
    vocab, limit = model.config.vocab_size, model.config.max_position_embeddings
    requests = [
        {"prompts": PROMPTS, "max_new_tokens": NEW},
        {"prompts": PROMPTS, "max_new_tokens": NEW, "temperature": 1.0, "top_p": 1e-6, "seed": 4},
        {"prompts": PROMPTS, "max_new_tokens": NEW, "eos_id": eos},
        {"prompts": PROMPTS, "max_new_tokens": NEW, "temperature": 1.0, "seed": 3},
        {"prompts": PROMPTS, "max_new_tokens": 0},
        {"prompts": [[1, vocab]], "max_new_tokens": 2},
        {"prompts": [[1, 2]], "max_new_tokens": limit},
        {"prompts": [[1, 2]], "max_new_tokens": 2, "temperature": -0.5},
        {"prompts": [[1, 2]], "max_new_tokens": 2, "top_p": 0.0},
        {"prompts": [[1, 2]], "max_new_tokens": 2, "top_p": 1.5},
        {"prompts": [[1, 2]], "max_new_tokens": 2, "top_k": -1},
        {"prompts": [[]], "max_new_tokens": 2},
    ]
    out = _call_fresh_process(path, requests)
    plain, top_p0, with_eos, sampled, empty_new = out[:5]

    # Greedy: token for token what generate returns, all lengths max_new_tokens.
    assert plain["dtypes"] == ["int32", "int32"]
    assert plain["tokens"] == greedy and plain["lengths"] == [NEW] * 3
    # top_p -> 0 keeps only the most likely token: greedy.
    assert top_p0["tokens"] == greedy
    # EOS stops each sequence at its own length; the rest is padding (0).
    expected = generate(model, PROMPTS, NEW, eos_id=eos)
    assert [row[:n] for row, n in zip(with_eos["tokens"], with_eos["lengths"])] == expected
    assert with_eos["lengths"] == [len(e) for e in expected]
    assert with_eos["lengths"][0] == 3 and with_eos["tokens"][0][3:] == [0] * (NEW - 3)
    # The compiled Python path draws the same samples under TF (same RNG).
    tokens, lengths = generate_tokens(model, PROMPTS, NEW, temperature=1.0, seed=3)
    assert sampled["tokens"] == tokens.tolist() and sampled["tokens"] != greedy
    assert np.shape(empty_new["tokens"]) == (3, 0) and empty_new["lengths"] == [0, 0, 0]

    messages = [r.get("error", "") for r in out[5:]]
    assert "outside the vocabulary" in messages[0]
    assert "max_position_embeddings" in messages[1]
    assert "temperature" in messages[2]
    assert "top_p" in messages[3] and "top_p" in messages[4]
    assert "top_k" in messages[5]
    assert "empty" in messages[6]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "1,2", "--max-new-tokens", "3"], None),
    (["--prompt", "1,x"], "'x', which is not an integer token id"),
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "1,100000"], "outside the vocabulary"),
    (["--prompt", "1,2", "--max-new-tokens", "100000"], "max_position_embeddings"),
    (["--prompt", "1,2", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "1,2", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", "1,2", "--top-k", "-2"], "top_k must be >= 0"),
])
def test_cli_generate_refuses_bad_requests_in_one_line(exported, tmp_path, argv, message):
    import shutil

    model, path = exported
    serving = tmp_path / "serving"
    shutil.copytree(path, serving / "1")
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "generate", "--serving-dir",
                           str(serving)] + argv, capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    if message is None:
        from model.generation import generate

        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"[1, 2] -> {generate(model, [[1, 2]], 3)[0]}" in proc.stdout
        return
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("deepseek-tfx generate: ") and message in lines[0], lines[0]


def test_gate_savedmodel_parity_checks_the_generate_signature(exported):
    from components.validation_checks import GateThresholds, IntegrationChecks

    model, path = exported
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 8)).astype("int32")
    validator = IntegrationChecks(model, tokens, GateThresholds())
    result = validator.savedmodel_parity(path)
    assert result["passed"], result
    assert result["generate_equal"] is True
    assert validator.decode_parity()["passed"]
