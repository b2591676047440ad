"""`--base-model`: one pipeline run (LocalDagRunner, tiny) fine-tuning the
transformers-written `baseline` fixture: the Importer puts the directory
into ML Metadata, the Trainer gets it as `base_model`, and the run trains,
exports and is blessed and pushed; the pushed version is a base model again."""

import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

BASELINE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf", "baseline"))
# The fixture's MLA latent (kv_lora_rank 16 + rope 16) is 2/3 of its 4-head
# MHA cache, above the gate's 0.5 for our presets: an architecture fact the
# fine-tune cannot change.
LOOSE_GATE = {"max_loss_gap_nats": 5.0, "max_expert_load_violation": 6.0, "min_gain_over_uniform_nats": 0.05,
              "max_cache_ratio_vs_mha": 0.7}


def _settings(run_dir, **changes):
    from pipeline.settings import PipelineSettings

    values = dict(run_dir=str(run_dir), base_model=BASELINE, seq_len=16, train_examples=512,
                  eval_examples=64, train_steps=30, batch_size=16, eval_steps=2, learning_rate=1e-2,
                  checkpoint_every=30, log_every=10, thresholds=LOOSE_GATE,
                  # The fixture's router biases are random (U[-0.4, 0.4]): a faster
                  # bias step (a free, non-shape setting) balances them in 30 steps.
                  model_overrides={"bias_update_speed": 0.01})
    values.update(changes)
    return PipelineSettings(**values)


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory):
    from app.inspect_metadata import collect
    from pipeline.local_runner import run_local

    settings = _settings(tmp_path_factory.mktemp("fine_tune"))
    run_local(settings)
    return settings, collect(settings.path("metadata"))


def _trainer_summary(info):
    (model,) = [a for a in info["artifacts"] if a["type"] == "Model" and "Trainer" in a["uri"]]
    with open(os.path.join(model["uri"], "training_summary.json")) as f:
        return json.load(f)


def test_the_base_model_is_imported_and_is_the_trainers_base_model_input(fine_tune):
    from model.base_model import BaseModel

    settings, info = fine_tune
    states = {e["component"]: e["state"] for e in info["executions"]}
    assert states["Importer"] == "COMPLETE" and states["Trainer"] == "COMPLETE", states
    (imported,) = [a for a in info["artifacts"] if a["type"] == "Model" and a["uri"] == BASELINE]
    identity = BaseModel.read(BASELINE).identity
    assert imported["properties"]["base_model_identity"] == identity
    (trainer,) = [e for e in info["executions"] if e["component"] == "Trainer"]
    inputs = {ev["artifact_id"] for ev in info["events"]
              if ev["execution_id"] == trainer["id"] and ev["kind"] == "input"}
    assert imported["id"] in inputs
    summary = _trainer_summary(info)
    assert summary["base_model"] == {"path": BASELINE, "identity": identity, "mtp_layers": 0}
    assert summary["model_config"]["hidden_size"] == 32 and summary["model_config"]["vocab_size"] == 64
    # The checkpoint directory is keyed by a fingerprint that holds the base's identity.
    assert summary["checkpoint_dir"].endswith(settings.training_fingerprint())


def test_the_fine_tune_trains_exports_and_is_blessed_and_pushed(fine_tune):
    settings, info = fine_tune
    for blessing in info["blessings"]:
        assert blessing["properties"]["blessed"] == 1, blessing
    assert sorted(b["type"] for b in info["blessings"]) == ["InfraBlessing", "ModelBlessing"]
    summary = _trainer_summary(info)
    history = summary["loss_history"]
    assert history[-1]["next_token_loss"] < history[0]["next_token_loss"]
    (version,) = os.listdir(settings.path("serving"))
    pushed = os.path.join(settings.path("serving"), version)
    assert {"saved_model.pb", "config.json", "model.safetensors"} <= set(os.listdir(pushed))


def test_the_pushed_version_is_a_base_model_computing_the_served_function(fine_tune, tmp_path):
    import tensorflow as tf

    from data.tfrecord import serialize_sequences
    from model.base_model import BaseModel
    from model.hf_checkpoint import load_hf_checkpoint

    settings, info = fine_tune
    (version,) = os.listdir(settings.path("serving"))
    pushed = os.path.join(settings.path("serving"), version)
    again = _settings(tmp_path, base_model=pushed)  # valid settings for the next fine-tune
    assert again.model_config.to_dict() == _trainer_summary(info)["model_config"]
    assert again.training_fingerprint() != settings.training_fingerprint()
    assert BaseModel.read(pushed).identity != BaseModel.read(BASELINE).identity

    ids = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)
    served = tf.saved_model.load(pushed).signatures["serving_default"](
        examples=tf.constant(serialize_sequences(ids)))["logits"].numpy()
    model = load_hf_checkpoint(pushed)
    np.testing.assert_allclose(np.asarray(model(ids)), served, atol=1e-4)


def test_kubeflow_compiles_the_importer_into_the_trainers_base_model(tmp_path):
    from kubeflow.compile import compile_pipeline

    path = compile_pipeline(_settings(tmp_path / "run"), str(tmp_path / "p.json"), image="reg/deepseek-tfx:1",
                            pipeline_root="gs://bucket/root", gpu_count=0)
    spec = json.load(open(path))["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    assert "base_model_importer" in tasks
    base = tasks["Trainer"]["inputs"]["artifacts"]["base_model"]["taskOutputArtifact"]
    assert base["producerTask"] == "base_model_importer"
    assert BASELINE in json.dumps(spec["deploymentSpec"]["executors"])
