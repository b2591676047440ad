"""The training engine started from a Hugging Face checkpoint (the
Trainer's `base_model`): its first step's loss, before any update, is
transformers' loss on the same batch (the fixture's training_loss.json,
written by tests/fixtures/hf/make_hf_fixtures.py --training-loss), and a
resume under another base model is refused naming it. Engine child
processes only: no TFX, no torch."""

import json
import os
import shutil

import numpy as np
import pytest

from model.base_model import BaseModel
from model.safetensors_io import load_file, save_file
from training import launch

HF = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
ORIGINAL = os.path.join(HF, "deepseek_original")  # YaRN, deepseek-ai spelling, one MTP layer


def _spec(tmp_path, base: BaseModel, tokens, **engine):
    config = base.model_config()
    settings = {"batch_size": tokens.shape[1], "seq_len": tokens.shape[2], "train_steps": 1,
                "learning_rate": 1e-3, "warmup_steps": 0, "log_every": 1, "record_history": True,
                "precision": "float32", **engine}
    np.save(tmp_path / "tokens.npy", tokens)
    return {"model_config": config.to_dict(), "engine": settings, "tokens": str(tmp_path / "tokens.npy"),
            "output_dir": str(tmp_path / "out"), "save_weights": False,
            "base_model": {"path": base.path, "identity": base.identity}}


def _run(tmp_path, spec):
    lines = []
    result = launch.run_worker(spec, str(tmp_path / "spec.json"), launch.worker_env(1), log_fn=lines.append)
    return result, lines


@pytest.fixture(scope="module")
def first_step(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fine_tune")
    reference = json.load(open(os.path.join(ORIGINAL, "training_loss.json")))
    tokens = np.asarray(reference["input_ids"], np.int32)[None]  # one micro-batch [1, B, S]
    base = BaseModel.read(ORIGINAL)
    spec = _spec(tmp, base, tokens, checkpoint_dir=str(tmp / "checkpoints"), checkpoint_every=1)
    result, lines = _run(tmp, spec)
    return {"reference": reference, "result": result, "lines": lines, "spec": spec, "tmp": tmp}


def test_first_step_loss_is_transformers_loss_on_the_same_batch(first_step):
    (step,) = first_step["result"]["steps"]
    # "ce": the main next-token cross-entropy of step 1, computed before its update.
    assert step["ce"] == pytest.approx(first_step["reference"]["loss"], rel=1e-4)
    # The MTP layer was kept and loaded: its loss term is in the total.
    assert first_step["spec"]["model_config"]["num_nextn_predict_layers"] == 1
    assert step["loss"] > step["ce"] + 0.1
    assert any(line.startswith("engine: starting from the base model") for line in first_step["lines"])


def test_resuming_under_another_base_model_is_refused_naming_it(first_step, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(ORIGINAL, other)
    tensors = load_file(str(other / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01  # same shapes, other weights
    save_file(tensors, str(other / "model.safetensors"))
    spec = dict(first_step["spec"], base_model={"path": str(other),
                                                "identity": BaseModel.read(str(other)).identity},
                output_dir=str(tmp_path / "out"))
    with pytest.raises(launch.EngineFailed, match=r"the checkpoint does not fit this training: .*changed: "
                                                  r"base model \(the checkpoint training started from\)"):
        _run(tmp_path, spec)
