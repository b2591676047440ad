"""The Evaluator gate: a TFX component that runs the integration checks on
the trained model and blesses it (or not), with the reasons.

Output `blessing` is a standard ModelBlessing: custom property `blessed`
1/0 (what Pusher reads), `current_model` / `current_model_id` (what
LatestBlessedModelStrategy reads), and `failures` (why not).
"""

import json
import os
from typing import Optional

from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.dsl.io import fileio
from tfx.types import standard_artifacts

from components.artifacts import ValidationReport


def _load_keras_model(model_uri: str):
    import keras

    import model.deepseek_v3  # noqa: F401  (registers the custom classes)

    path = os.path.join(model_uri, "keras", "model.keras")
    if not fileio.exists(path):
        raise FileNotFoundError(f"gate: the model artifact has no Keras model at {path}")
    return keras.saving.load_model(path)


def _eval_tokens(examples: standard_artifacts.Examples, seq_len: int, limit: int):
    import numpy as np

    from data.tfrecord import make_dataset

    pattern = os.path.join(examples.uri, "Split-eval", "*")
    rows = []
    for batch in make_dataset(pattern, seq_len, batch_size=256, shuffle=False):
        rows.append(batch["input_ids"].numpy())
        if sum(len(r) for r in rows) >= limit:
            break
    if not rows:
        raise ValueError(f"gate: the eval split at {pattern} is empty")
    return np.concatenate(rows)[:limit]


def _baseline_loss(baseline_model, tokens, thresholds) -> Optional[float]:
    if baseline_model is None:
        return None
    from components.validation_checks import eval_loss

    baseline = _load_keras_model(baseline_model.uri)
    n = min(len(tokens), thresholds.eval_batches * thresholds.batch_size)
    return eval_loss(baseline, tokens[:n], thresholds.batch_size)


@component
def IntegrationValidator(
    model: InputArtifact[standard_artifacts.Model],
    examples: InputArtifact[standard_artifacts.Examples],
    blessing: OutputArtifact[standard_artifacts.ModelBlessing],
    report: OutputArtifact[ValidationReport],
    baseline_model: InputArtifact[standard_artifacts.Model] = None,
    thresholds_json: Parameter[str] = "{}",
):
    """Forward pass, gradient flow, expert balance, KV-cache memory, decode and
    SavedModel parity, and quality against the data's optimum and the last
    blessed model; blesses only when all pass."""
    from components.validation_checks import GateThresholds, IntegrationChecks, to_markdown

    thresholds = GateThresholds.from_json(thresholds_json)
    keras_model = _load_keras_model(model.uri)
    seq_len = examples.get_int_custom_property("seq_len") or None
    if not seq_len:
        summary_path = os.path.join(model.uri, "training_summary.json")
        with fileio.open(summary_path) as f:
            seq_len = json.load(f)["seq_len"]
    tokens = _eval_tokens(examples, seq_len, thresholds.eval_batches * thresholds.batch_size)
    optimal = (examples.get_float_custom_property("optimal_loss")
               if examples.has_custom_property("optimal_loss") else None)
    baseline_loss = _baseline_loss(baseline_model, tokens, thresholds)
    serving_dir = os.path.join(model.uri, "Format-Serving")
    result = IntegrationChecks(keras_model, tokens, thresholds).run(
        serving_dir=serving_dir if fileio.isdir(serving_dir) else None,
        optimal_loss=optimal, baseline_loss=baseline_loss)
    result["model_uri"] = model.uri
    result["baseline_model_uri"] = baseline_model.uri if baseline_model is not None else None
    result["thresholds"] = json.loads(thresholds_json or "{}")

    # fileio: artifact URIs may be gs:// (Kubeflow) as well as local paths.
    fileio.makedirs(report.uri)
    with fileio.open(os.path.join(report.uri, "report.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    with fileio.open(os.path.join(report.uri, "report.md"), "w") as f:
        f.write(to_markdown(result))

    blessed = 1 if result["blessed"] else 0
    fileio.makedirs(blessing.uri)
    with fileio.open(os.path.join(blessing.uri, "BLESSED" if blessed else "NOT_BLESSED"), "w") as f:
        f.write("\n".join(result["failures"]))
    blessing.set_int_custom_property("blessed", blessed)
    blessing.set_string_custom_property("current_model", model.uri)
    blessing.set_int_custom_property("current_model_id", model.id)
    blessing.set_string_custom_property("failures", json.dumps(result["failures"]))
    if result["checks"].get("quality", {}).get("eval_loss") is not None:
        blessing.set_float_custom_property("eval_loss", float(result["checks"]["quality"]["eval_loss"]))
    if baseline_model is not None:
        blessing.set_string_custom_property("baseline_model", baseline_model.uri)
        blessing.set_int_custom_property("baseline_model_id", baseline_model.id)
    print(to_markdown(result))

