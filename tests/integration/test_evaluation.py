"""The TFMA side of evaluation without a pipeline: our metrics' arithmetic,
the EvalConfig's thresholds from settings, and the OSS-KFP baseline's
choice of pushed version."""

import math
import os

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def _combine(metric, examples, model_name=""):
    """Runs the metric's one computation over per-example prediction dicts."""
    from tensorflow_model_analysis import constants
    from tensorflow_model_analysis.metrics import metric_types

    (computation,) = metric.computations(model_names=[model_name])
    combiner = computation.combiner
    accumulators = []
    for chunk in (examples[:1], examples[1:]):  # two workers, then a merge
        acc = combiner.create_accumulator()
        for outputs in chunk:
            preds = {model_name: outputs} if model_name else outputs
            acc = combiner.add_input(acc, metric_types.StandardMetricInputs(
                {constants.PREDICTIONS_KEY: preds}))
        accumulators.append(acc)
    ((key, value),) = combiner.extract_output(combiner.merge_accumulators(accumulators)).items()
    return key, value


EXAMPLES = [  # a short and a long example: the plain mean of losses would be 2.0
    {"example_loss": np.float32(1.0), "token_count": np.float32(3), "correct_tokens": np.float32(3)},
    {"example_loss": np.float32(3.0), "token_count": np.float32(1), "correct_tokens": np.float32(0)},
    {"example_loss": np.float32(2.0), "token_count": np.float32(4), "correct_tokens": np.float32(1)},
]


def test_token_metrics_are_token_weighted():
    from components.evaluation import NextTokenAccuracy, Perplexity, TokenLoss

    expected = (1.0 * 3 + 3.0 * 1 + 2.0 * 4) / 8
    key, loss = _combine(TokenLoss(), EXAMPLES)
    assert key.name == "token_loss" and loss == pytest.approx(expected)
    assert _combine(Perplexity(), EXAMPLES)[1] == pytest.approx(math.exp(expected))
    assert _combine(NextTokenAccuracy(), EXAMPLES)[1] == pytest.approx(4 / 8)
    # With a baseline, TFMA keys predictions by model name.
    key, loss = _combine(TokenLoss(), EXAMPLES, model_name="baseline")
    assert key.model_name == "baseline" and loss == pytest.approx(expected)


def test_a_signature_without_the_token_outputs_is_named():
    from components.evaluation import TokenLoss

    with pytest.raises(ValueError, match="token_metrics"):
        _combine(TokenLoss(), [{"logits": np.zeros(3)}, {"logits": np.zeros(3)}])


def _loss_threshold(config):
    (spec,) = config.metrics_specs
    (metric,) = [m for m in spec.metrics if m.class_name == "TokenLoss"]
    return metric.threshold


def test_eval_config_thresholds_come_from_the_settings(tmp_path):
    import tensorflow_model_analysis as tfma

    import data
    from components.evaluation import SIGNATURE, eval_config
    from pipeline.settings import PipelineSettings

    settings = PipelineSettings(preset="tiny", seq_len=16,
                                thresholds={"max_loss_gap_nats": 0.5, "max_regression_nats": 0.03})
    optimal = data.describe(settings.data_spec)["optimal_loss"]
    config = eval_config(settings)
    (model_spec,) = config.model_specs
    assert model_spec.signature_name == SIGNATURE and model_spec.model_type == "tf_generic"
    threshold = _loss_threshold(config)
    assert threshold.value_threshold.upper_bound.value == pytest.approx(min(math.log(64) - 0.1, optimal + 0.5))
    assert threshold.change_threshold.direction == tfma.MetricDirection.LOWER_IS_BETTER
    assert threshold.change_threshold.absolute.value == pytest.approx(0.03)
    # The user's TFRecords: no known optimum, only the margin below uniform.
    (tmp_path / "train").mkdir()
    own = PipelineSettings(preset="tiny", seq_len=16, examples_dir=str(tmp_path),
                           thresholds={"min_gain_over_uniform_nats": 0.25})
    assert _loss_threshold(eval_config(own)).value_threshold.upper_bound.value == pytest.approx(math.log(64) - 0.25)


def test_invalid_tfma_threshold_is_a_settings_error():
    from pipeline.settings import PipelineSettings, SettingsError

    with pytest.raises(SettingsError, match="min_gain_over_uniform_nats"):
        PipelineSettings(thresholds={"min_gain_over_uniform_nats": -1})


def test_remote_examples_dir_is_not_checked_here():
    from pipeline.settings import PipelineSettings, SettingsError

    assert PipelineSettings(examples_dir="gs://bucket/tokens").examples_dir == "gs://bucket/tokens"
    with pytest.raises(SettingsError, match="not a directory"):
        PipelineSettings(examples_dir="/no/such/dir")


def test_latest_pushed_version_is_the_newest_complete_one(tmp_path):
    from components.latest_pushed_model import latest_pushed_version

    serving = tmp_path / "serving"
    assert latest_pushed_version(str(serving)) is None
    # 300 is newer but half-copied: its second data shard never arrived.
    for version, shards in ((100, (0, 1)), (300, (0,)), (200, (0, 1))):
        variables = serving / str(version) / "variables"
        os.makedirs(variables)
        (serving / str(version) / "saved_model.pb").write_bytes(b"")
        (variables / "variables.index").write_bytes(b"")
        for shard in shards:
            (variables / f"variables.data-{shard:05d}-of-00002").write_bytes(b"")
    (serving / "notes").mkdir()
    assert latest_pushed_version(str(serving)) == (200, str(serving / "200"))


@pytest.mark.parametrize("baseline, producer", [
    ("latest_blessed", "latest_blessed_model_resolver"), ("latest_pushed", "LatestPushedModel"), ("none", None)])
def test_the_evaluator_baseline_is_an_explicit_option(baseline, producer):
    from pipeline.pipeline import create_pipeline
    from pipeline.settings import PipelineSettings

    nodes = {n.id: n for n in create_pipeline(PipelineSettings(preset="tiny", seq_len=16),
                                              baseline=baseline).components}
    channel = nodes["Evaluator"].inputs.get("baseline_model")
    assert (channel.producer_component_id if channel is not None else None) == producer
    pusher = nodes["Pusher"].inputs
    assert pusher["model_blessing"].producer_component_id == "Evaluator"
    assert pusher["infra_blessing"].producer_component_id == "IntegrationValidator"


def test_an_unknown_baseline_is_refused():
    from pipeline.pipeline import create_pipeline
    from pipeline.settings import PipelineSettings

    with pytest.raises(ValueError, match="latest_pushed"):
        create_pipeline(PipelineSettings(preset="tiny", seq_len=16), baseline="previous")
