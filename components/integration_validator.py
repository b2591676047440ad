"""The integration checks as a TFX component: runs them on the trained
model and blesses it for the infrastructure (or not), with the reasons.

Output `blessing` is a standard InfraBlessing, the artifact TFX's
InfraValidator writes and the Pusher's ``infra_blessing`` input reads:
custom property `blessed` 1/0 (what Pusher reads), `current_model` /
`current_model_id`, and `failures` (why not). Model quality is the
Evaluator's (TFMA, its ModelBlessing); the Pusher pushes only when both
blessings say yes. Being an InfraBlessing, not a ModelBlessing, it is never
mistaken for TFMA's blessing by the latest-blessed-model resolver.
"""

import json
import os

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


@component
def IntegrationValidator(
    model: InputArtifact[standard_artifacts.Model],
    examples: InputArtifact[standard_artifacts.Examples],
    blessing: OutputArtifact[standard_artifacts.InfraBlessing],
    report: OutputArtifact[ValidationReport],
    thresholds_json: Parameter[str] = "{}",
):
    """Forward pass, gradient flow, expert balance, KV-cache memory, decode and
    SavedModel parity; blesses only when all pass."""
    from components.validation_checks import GateThresholds, IntegrationValidator as Checks
    from components.validation_checks import to_markdown

    thresholds = GateThresholds.from_json(thresholds_json)
    keras_model = _load_keras_model(model.uri)
    seq_len = examples.get_int_custom_property("seq_len") or None
    if not seq_len:
        summary_path = os.path.join(model.uri, "training_summary.json")
        with fileio.open(summary_path) as f:
            seq_len = json.load(f)["seq_len"]
    tokens = _eval_tokens(examples, seq_len, thresholds.eval_batches * thresholds.batch_size)
    serving_dir = os.path.join(model.uri, "Format-Serving")
    result = Checks(keras_model, tokens, thresholds).run(
        serving_dir=serving_dir if fileio.isdir(serving_dir) else None)
    result["model_uri"] = model.uri
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
    print(to_markdown(result))

