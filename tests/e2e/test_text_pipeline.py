"""`deepseek-tfx run --text-dir` on real English (the KJV fixture) with the
default gate: tokenizer and text ExampleGen in ML Metadata, blessed and
pushed; the pushed model answers text with text (`generate --text`, and the
`generate_text` signature from plain TensorFlow + tensorflow-text equals the
token path); and bad text input stops before training, naming the file."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e.test_cli import NOISE, ROOT, _assert_quiet

pytestmark = pytest.mark.e2e

KJV = os.path.join(ROOT, "tests", "fixtures", "text", "kjv")
TINY_TEXT = ["--preset", "tiny", "--vocab-size", "512", "--seq-len", "32", "--steps", "20",
             "--batch-size", "16"]


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=1800)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("text") / "run"
    out = _cli("run", "--run-dir", str(run_dir), "--text-dir", KJV, *TINY_TEXT)  # the default gate
    return run_dir, out


def test_text_run_is_blessed_and_pushed_with_the_default_gate(text_run):
    run_dir, out = text_run
    assert out.returncode == 0, out.stdout + out.stderr
    _assert_quiet(out)
    for component in ("TokenizerGen", "TextExampleGen", "CuratedSchemaGen", "Trainer", "Evaluator",
                      "IntegrationValidator", "Pusher"):
        assert f"{component} done (" in out.stdout, component
    assert "vocab 512" in out.stdout
    info = json.loads(_cli("inspect", "--run-dir", str(run_dir), "--json").stdout)
    by_type = {a["type"]: a for a in info["artifacts"]}
    tokenizer = by_type["components.Tokenizer"]["properties"]
    assert tokenizer["vocab_size"] == 512 and tokenizer["source"] == "trained"
    assert tokenizer["train_documents"] == 25 and tokenizer["eval_documents"] == 3
    examples = by_type["Examples"]["properties"]
    assert examples["train_documents"] == 25 and examples["eval_documents"] == 3
    assert examples["train_bytes"] + examples["eval_bytes"] == sum(
        len(_read(os.path.join(KJV, f)).encode()) for f in os.listdir(KJV))
    for split in ("train", "eval"):  # every token is in a row, but the partial last one
        assert examples[f"{split}_rows"] * 32 + examples[f"{split}_dropped_tokens"] == examples[f"{split}_tokens"]
    schema = open(os.path.join(by_type["Schema"]["uri"], "schema.pbtxt")).read()
    assert "max: 511" in schema


def _read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read().lstrip("\ufeff")


def test_generate_text_answers_with_text(text_run):
    run_dir, _ = text_run
    out = _cli("generate", "--run-dir", str(run_dir), "--text", "And the Lord said", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("model version ") and lines[1].startswith("And the Lord said")
    assert len(lines[1]) > len("And the Lord said")
    terminal = out.stdout + out.stderr
    for noise in NOISE + ("DeprecationWarning", "WARNING"):
        assert noise not in terminal, (noise, terminal)
    bad = _cli("generate", "--run-dir", str(run_dir), "--text", "x", "--prompt", "1,2")
    assert bad.returncode == 2 and "not both" in bad.stderr


_PLAIN_TF = """
import json, sys
import numpy as np, sentencepiece as spm, tensorflow as tf, tensorflow_text  # noqa: F401
path = sys.argv[1]
model = tf.saved_model.load(path)
prompts = ["In the beginning", "", "Grace be unto you \\u00e9"]
args = dict(max_new_tokens=tf.constant(6), temperature=tf.constant(0.0), top_k=tf.constant(0),
            top_p=tf.constant(1.0), eos_id=tf.constant(-1), seed=tf.constant(0))
text = model.signatures["generate_text"](prompts=tf.constant(prompts), **args)
sp = spm.SentencePieceProcessor(model_file=path + "/assets.extra/tokenizer.model")
ids = [[sp.eos_id()] + sp.encode(p) for p in prompts]
width = max(map(len, ids))
token_ids = np.array([[0] * (width - len(r)) + r for r in ids], np.int32)
mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in ids], np.int32)
tokens = model.signatures["generate"](token_ids=tf.constant(token_ids), padding_mask=tf.constant(mask), **args)
print(json.dumps({"equal": text["tokens"].numpy().tolist() == tokens["tokens"].numpy().tolist(),
                  "texts": [t.decode() for t in text["texts"].numpy()],
                  "decoded": [sp.decode(r) for r in tokens["tokens"].numpy().tolist()]}))
"""


def test_generate_text_signature_is_the_token_path_in_plain_tensorflow(text_run):
    run_dir, _ = text_run
    serving = run_dir / "serving"
    version = max(os.listdir(serving), key=int)
    out = subprocess.run([sys.executable, "-c", _PLAIN_TF, str(serving / version)], capture_output=True,
                         text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["equal"], result
    assert result["texts"] == result["decoded"]


def test_bad_text_stops_before_training_naming_the_file(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(KJV, corpus)
    bad = corpus / "62-1john.txt.gz"
    bad.write_bytes(gzip.compress("caf\u00e9 latin-1\n".encode("latin-1")))
    run_dir = tmp_path / "run"
    out = _cli("run", "--run-dir", str(run_dir), "--text-dir", str(corpus), *TINY_TEXT)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the run FAILED in TokenizerGen" in out.stderr
    assert f"{bad}: not UTF-8 text (invalid byte 0xe9 at offset 3)" in out.stderr
    assert "Trainer ..." not in out.stdout and not (run_dir / "serving").exists()


def test_a_corpus_too_small_for_one_eval_batch_stops_before_training(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("63-2john.txt", "65-jude.txt", "61-2peter.txt", "59-james.txt"):
        shutil.copy(os.path.join(KJV, name), corpus / name)
    run_dir = tmp_path / "run"
    out = _cli("run", "--run-dir", str(run_dir), "--text-dir", str(corpus), *TINY_TEXT[:-1], "64")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the run FAILED in TextExampleGen" in out.stderr
    assert "the corpus is too small: its eval split (1 documents" in out.stderr
    assert "fewer than one eval batch (64)" in out.stderr
    assert "Trainer ..." not in out.stdout and not (run_dir / "serving").exists()


def test_bad_text_settings_exit_2_and_write_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _cli("run", "--run-dir", str(tmp_path / "r1"), "--text-dir", str(empty))
    assert out.returncode == 2 and f"text_dir {str(empty)!r} holds no text files" in out.stderr
    junk = tmp_path / "tok.model"
    junk.write_bytes(b"\x00\x01 not a model")
    out = _cli("run", "--run-dir", str(tmp_path / "r2"), "--text-dir", KJV, "--tokenizer", str(junk))
    assert out.returncode == 2 and f"tokenizer {junk}: not a SentencePiece model" in out.stderr
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_kubeflow_compiles_the_text_front(tmp_path):
    out = _cli("compile", "--output", str(tmp_path / "p.json"), "--image", "reg/deepseek-tfx:1",
               "--pipeline-root", "gs://bucket/root", "--text-dir", "gs://bucket/corpus", "--vocab-size", "512")
    assert out.returncode == 0, out.stderr
    spec = json.loads((tmp_path / "p.json").read_text())["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    assert {"TokenizerGen", "TextExampleGen"} <= set(tasks)
    gen = tasks["TextExampleGen"]
    assert gen["inputs"]["artifacts"]["tokenizer"]["taskOutputArtifact"]["producerTask"] == "TokenizerGen"
    params = gen["inputs"]["parameters"]
    assert params["text_dir"]["runtimeValue"]["constant"] == "gs://bucket/corpus"
    assert "components.Tokenizer" in json.dumps(spec["components"])
