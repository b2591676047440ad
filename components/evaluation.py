"""What the standard TFX Evaluator computes for our causal LM, with
TensorFlow Model Analysis: the metrics, their thresholds, and the EvalConfig.

The SavedModel's ``token_metrics`` signature (components/export.py) turns
each serialized eval Example into three scalars: ``example_loss`` (mean
next-token cross-entropy of the example), ``token_count`` (its target
positions) and ``correct_tokens``. TFMA aggregates them here, on Beam:

* ``token_loss`` = sum(example_loss * token_count) / sum(token_count), the
  corpus per-token loss in nats (a plain mean of example losses would weight
  short examples like long ones);
* ``perplexity`` = exp(token_loss);
* ``next_token_accuracy`` = sum(correct_tokens) / sum(token_count);
* ``example_count`` (TFMA's own).

The metric classes are looked up by TFMA from ``MetricConfig.module``, so
this module must import in every Evaluator pod: it is part of the package
the images install, and imports only TFMA, Beam and NumPy.

Thresholds (all from `GateThresholds`, the settings' ``thresholds``):

* value: token_loss <= log(vocab_size) - ``min_gain_over_uniform_nats``
  (better than uniform guessing by a margin) and, when the data's optimal
  loss is known when the pipeline is built, token_loss <= optimal +
  ``max_loss_gap_nats``. TFMA thresholds are static in the EvalConfig; the
  synthetic data's optimum is a pure function of its DataSpec, so
  `eval_config` computes it from the settings (the same number the
  ExampleGen writes to the Examples' ``optimal_loss`` property). The user's
  own TFRecords have no known optimum: only the uniform bound applies.
* change: token_loss(candidate) - token_loss(baseline) <=
  ``max_regression_nats`` (LOWER_IS_BETTER) against the baseline model (the
  latest blessed one). TFX's Evaluator passes it when there is no baseline
  (its "rubber stamp").
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

import apache_beam as beam
import numpy as np
from tensorflow_model_analysis.metrics import metric_types

SIGNATURE = "token_metrics"
EXAMPLE_LOSS_KEY = "example_loss"
TOKEN_COUNT_KEY = "token_count"
CORRECT_TOKENS_KEY = "correct_tokens"

TOKEN_LOSS = "token_loss"
PERPLEXITY = "perplexity"
NEXT_TOKEN_ACCURACY = "next_token_accuracy"
EXAMPLE_COUNT = "example_count"
MODULE = __name__


# --------------------------------------------------------------------------- metrics
class _TokenSums(beam.CombineFn):
    """Accumulates [sum of example_loss * token_count, sum of token_count,
    sum of correct_tokens] over the examples of one slice, for one model."""

    def __init__(self, key: metric_types.MetricKey, model_name: str, value: str):
        self._key = key
        self._model_name = model_name
        self._value = value

    def create_accumulator(self):
        return np.zeros(3, np.float64)

    def add_input(self, accumulator, element: metric_types.StandardMetricInputs):
        outputs = element.get_predictions(self._model_name)
        if not isinstance(outputs, dict) or EXAMPLE_LOSS_KEY not in outputs:
            raise ValueError(f"{self._key.name}: the model's {SIGNATURE!r} signature must return "
                             f"{EXAMPLE_LOSS_KEY!r}, {TOKEN_COUNT_KEY!r} and {CORRECT_TOKENS_KEY!r}; "
                             f"got {sorted(outputs) if isinstance(outputs, dict) else type(outputs)}")
        count = float(np.sum(outputs[TOKEN_COUNT_KEY]))
        accumulator[0] += float(np.sum(outputs[EXAMPLE_LOSS_KEY])) * count
        accumulator[1] += count
        accumulator[2] += float(np.sum(outputs[CORRECT_TOKENS_KEY]))
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[np.ndarray]):
        return np.sum(list(accumulators), axis=0)

    def extract_output(self, accumulator) -> Dict[metric_types.MetricKey, float]:
        loss_sum, tokens, correct = accumulator
        if tokens == 0:
            return {self._key: float("nan")}
        loss = loss_sum / tokens
        value = {TOKEN_LOSS: loss, PERPLEXITY: math.exp(min(loss, 700.0)),
                 NEXT_TOKEN_ACCURACY: correct / tokens}[self._value]
        return {self._key: float(value)}


def _token_computations(name: str, value: str, model_names: Optional[List[str]] = None,
                        output_names: Optional[List[str]] = None) -> metric_types.MetricComputations:
    from tensorflow_model_analysis import constants

    computations = []
    for model_name in model_names or [""]:
        for output_name in output_names or [""]:
            key = metric_types.MetricKey(name=name, model_name=model_name, output_name=output_name)
            computations.append(metric_types.MetricComputation(
                keys=[key],
                preprocessors=[metric_types.StandardMetricInputsPreprocessor(
                    include_filter={constants.PREDICTIONS_KEY: {}}, include_default_inputs=False)],
                combiner=_TokenSums(key, model_name, value)))
    return computations


class TokenLoss(metric_types.Metric):
    """Corpus per-token next-token cross-entropy (nats), token-weighted."""

    def __init__(self, name: str = TOKEN_LOSS):
        super().__init__(_token_computations, name=name, value=TOKEN_LOSS)


class Perplexity(metric_types.Metric):
    """exp(token_loss)."""

    def __init__(self, name: str = PERPLEXITY):
        super().__init__(_token_computations, name=name, value=PERPLEXITY)


class NextTokenAccuracy(metric_types.Metric):
    """Fraction of target tokens that are the argmax of the logits."""

    def __init__(self, name: str = NEXT_TOKEN_ACCURACY):
        super().__init__(_token_computations, name=name, value=NEXT_TOKEN_ACCURACY)


# --------------------------------------------------------------------------- config
def token_loss_upper_bound(vocab_size: int, optimal_loss: Optional[float], thresholds) -> float:
    """The value threshold on token_loss: better than uniform by the margin
    and, when the optimum is known, within the gap of it."""
    bound = math.log(vocab_size) - thresholds.min_gain_over_uniform_nats
    if optimal_loss is not None:
        bound = min(bound, optimal_loss + thresholds.max_loss_gap_nats)
    return bound


def data_optimal_loss(settings) -> Optional[float]:
    """The synthetic data's optimal per-token loss (a lower bound for
    mixtures), computed from the settings; None for the user's TFRecords or
    text (no optimum is known: only the uniform bound applies)."""
    if settings.examples_dir or getattr(settings, "text_dir", None):
        return None
    import data

    return float(data.describe(settings.data_spec)["optimal_loss"])


def eval_config(settings):
    """The EvalConfig of the pipeline's Evaluator, from validated settings."""
    import tensorflow_model_analysis as tfma

    from components.validation_checks import GateThresholds

    t = GateThresholds(**settings.thresholds)
    upper = token_loss_upper_bound(settings.model_config.vocab_size, data_optimal_loss(settings), t)
    loss_threshold = tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(upper_bound={"value": upper}),
        change_threshold=tfma.GenericChangeThreshold(
            direction=tfma.MetricDirection.LOWER_IS_BETTER,
            absolute={"value": t.max_regression_nats}))
    metrics = [
        tfma.MetricConfig(class_name="ExampleCount"),
        tfma.MetricConfig(class_name="TokenLoss", module=MODULE, threshold=loss_threshold),
        tfma.MetricConfig(class_name="Perplexity", module=MODULE),
        tfma.MetricConfig(class_name="NextTokenAccuracy", module=MODULE),
    ]
    return tfma.EvalConfig(
        # tf_generic: a SavedModel called through a named signature on the
        # serialized Examples (TFMA feeds raw records to a signature whose
        # only input is a string tensor not named like a feature).
        model_specs=[tfma.ModelSpec(signature_name=SIGNATURE, model_type="tf_generic")],
        # The token records carry one feature, input_ids (fixed length, no
        # source id): there is no feature to slice on, so one overall slice.
        slicing_specs=[tfma.SlicingSpec()],
        metrics_specs=[tfma.MetricsSpec(metrics=metrics)])
