"""`DataValidationGate`, a pipeline gate on ExampleValidator's findings
(the schema it validates against is `components.curated_schema`).

ExampleValidator only *records* anomalies (and a ``blessed`` custom property);
it never fails, and it does not flag an empty split (TFDV only sets
``Anomalies.data_missing``). `DataValidationGate` turns its findings into a
hard stop: its executor raises `DataValidationError`, naming every anomaly as
``[split] feature 'name': short description (TYPE: description)``, when

* ExampleValidator found any anomaly in any split (feature or dataset level,
  including ``data_missing``);
* a split has fewer than ``min_examples`` examples (default 1) in the
  statistics (an empty split);
* a required split (default ``["train", "eval"]``) is absent from the
  statistics or was not validated (e.g. ``exclude_splits``).

On success it outputs ``result``, a ``standard_artifacts.String`` holding a
JSON summary (``{"passed": true, "splits": {"train": {"num_examples": N}, ...}}``)
and custom properties ``passed`` = 1 and ``num_examples_<split>``.

Wire it before the Trainer with ``trainer.add_upstream_node(gate)`` (a pure
ordering edge: TFX's Trainer has no input slot for it); both LocalDagRunner
and KubeflowV2DagRunner (``dependent_tasks``) honour it, and neither starts a
node whose upstream node failed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tensorflow_metadata.proto.v0 import anomalies_pb2
from tfx import types
from tfx.dsl.components.base import base_component, base_executor, executor_spec
from tfx.dsl.io import fileio
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter
from tfx.utils import io_utils

from model.checks import check_int

ANOMALIES_KEY = "anomalies"
STATISTICS_KEY = "statistics"
RESULT_KEY = "result"
MIN_EXAMPLES_KEY = "min_examples"
REQUIRED_SPLITS_KEY = "required_splits"

DEFAULT_REQUIRED_SPLITS = ("train", "eval")
#: File ExampleValidator (TFX >= 0.29) writes per split: ``<uri>/Split-<name>/SchemaDiff.pb``.
ANOMALIES_FILE_NAME = "SchemaDiff.pb"


# --------------------------------------------------------------------------- checks
@dataclasses.dataclass(frozen=True)
class Problem:
    """One reason the gate fails."""

    split: str
    feature: Optional[str]  # None for dataset/split-level problems
    short_description: str
    anomaly_type: str  # AnomalyInfo.Type name, or EMPTY_SPLIT / SPLIT_MISSING / SPLIT_NOT_VALIDATED
    description: str = ""

    def __str__(self) -> str:
        where = f"[{self.split}] " + (f"feature '{self.feature}'" if self.feature is not None else "dataset")
        detail = self.anomaly_type + (f": {self.description}" if self.description else "")
        return f"{where}: {self.short_description} ({detail})"


class DataValidationError(RuntimeError):
    """Raised by the gate; ``.problems`` lists every `Problem`."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"DataValidationGate: data validation failed with {len(self.problems)} problem(s):\n{lines}")


def _type_name(anomaly_type: int) -> str:
    try:
        return anomalies_pb2.AnomalyInfo.Type.Name(anomaly_type)
    except ValueError:
        return f"TYPE_{anomaly_type}"


def _info_problems(split: str, feature: Optional[str], info: anomalies_pb2.AnomalyInfo) -> List[Problem]:
    reasons = list(info.reason)
    if not reasons:
        return [Problem(split, feature, info.short_description or "anomaly", "UNKNOWN_TYPE", info.description)]
    return [
        Problem(split, feature, r.short_description or info.short_description, _type_name(r.type), r.description)
        for r in reasons
    ]


def problems_from_anomalies(anomalies: anomalies_pb2.Anomalies, split: str) -> List[Problem]:
    """The problems in one split's ``Anomalies`` proto (sorted by feature)."""
    out: List[Problem] = []
    for feature in sorted(anomalies.anomaly_info):
        out.extend(_info_problems(split, feature, anomalies.anomaly_info[feature]))
    if anomalies.HasField("dataset_anomaly_info"):
        out.extend(_info_problems(split, None, anomalies.dataset_anomaly_info))
    if anomalies.data_missing:
        out.append(Problem(split, None, "No data", "DATA_MISSING", "TFDV reports the split's statistics as empty"))
    return out


def load_anomalies(anomalies_artifact: types.Artifact, split: str) -> anomalies_pb2.Anomalies:
    """``Split-<split>/SchemaDiff.pb`` of an ExampleAnomalies artifact."""
    split_uri = artifact_utils.get_split_uri([anomalies_artifact], split)
    path = os.path.join(split_uri, ANOMALIES_FILE_NAME)
    if not fileio.exists(path):
        raise FileNotFoundError(f"ExampleAnomalies artifact has no {ANOMALIES_FILE_NAME} for split {split!r}: {path}")
    return anomalies_pb2.Anomalies.FromString(io_utils.read_bytes_file(path))


def load_num_examples(statistics_artifact: types.Artifact, split: str) -> int:
    """Examples counted by StatisticsGen in ``split`` (``Split-<split>/FeatureStats.pb``)."""
    from tfx.components.statistics_gen import stats_artifact_utils  # noqa: WPS433 (imports TFDV)

    stats = stats_artifact_utils.load_statistics(statistics_artifact, split).proto()
    if not stats.datasets:
        return 0
    # With slicing, the unsliced dataset comes first ("All Examples" or unnamed).
    for dataset in stats.datasets:
        if dataset.name in ("", "All Examples"):
            return int(dataset.num_examples)
    return int(stats.datasets[0].num_examples)


def find_problems(
    anomalies_artifact: types.Artifact,
    statistics_artifact: types.Artifact,
    min_examples: int = 1,
    required_splits: Sequence[str] = DEFAULT_REQUIRED_SPLITS,
) -> Tuple[List[Problem], Dict[str, int]]:
    """All problems, and ``{split: num_examples}`` from the statistics."""
    anomaly_splits = artifact_utils.decode_split_names(anomalies_artifact.split_names)
    stats_splits = artifact_utils.decode_split_names(statistics_artifact.split_names)
    problems: List[Problem] = []
    for split in required_splits:
        if split not in stats_splits:
            problems.append(Problem(split, None, "Split missing", "SPLIT_MISSING",
                                    f"statistics have splits {stats_splits}"))
        elif split not in anomaly_splits:
            problems.append(Problem(split, None, "Split not validated", "SPLIT_NOT_VALIDATED",
                                    f"ExampleValidator validated only {anomaly_splits}"))
    counts: Dict[str, int] = {}
    for split in stats_splits:
        counts[split] = load_num_examples(statistics_artifact, split)
        if counts[split] < min_examples:
            what = "Empty split" if counts[split] == 0 else "Too few examples"
            problems.append(Problem(split, None, what, "EMPTY_SPLIT" if counts[split] == 0 else "TOO_FEW_EXAMPLES",
                                    f"num_examples = {counts[split]} < min_examples = {min_examples}"))
    for split in anomaly_splits:
        problems.extend(problems_from_anomalies(load_anomalies(anomalies_artifact, split), split))
    return problems, counts


# --------------------------------------------------------------------------- component
def _parse_required_splits(value: Any) -> List[str]:
    if value is None or value == "":
        return list(DEFAULT_REQUIRED_SPLITS)
    splits = json.loads(value) if isinstance(value, str) else value
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise ValueError(f"required_splits must be a JSON list of split names, got {value!r}")
    return splits


class DataValidationGateExecutor(base_executor.BaseExecutor):
    """Raises `DataValidationError` on any problem; else writes the summary."""

    def Do(
        self,
        input_dict: Dict[str, List[types.Artifact]],
        output_dict: Dict[str, List[types.Artifact]],
        exec_properties: Dict[str, Any],
    ) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        min_examples = exec_properties.get(MIN_EXAMPLES_KEY)
        min_examples = 1 if min_examples is None else check_int(MIN_EXAMPLES_KEY, int(min_examples), 0)
        required = _parse_required_splits(exec_properties.get(REQUIRED_SPLITS_KEY))
        problems, counts = find_problems(
            artifact_utils.get_single_instance(input_dict[ANOMALIES_KEY]),
            artifact_utils.get_single_instance(input_dict[STATISTICS_KEY]),
            min_examples=min_examples,
            required_splits=required,
        )
        if problems:
            raise DataValidationError(problems)
        result = artifact_utils.get_single_instance(output_dict[RESULT_KEY])
        result.value = json.dumps(
            {"passed": True, "splits": {s: {"num_examples": n} for s, n in counts.items()}}, sort_keys=True
        )
        result.set_int_custom_property("passed", 1)
        for split, n in counts.items():
            result.set_int_custom_property(f"num_examples_{split}", n)


#: TFX convention: the executor of a component module is also importable as `Executor`.
Executor = DataValidationGateExecutor


class DataValidationGateSpec(types.ComponentSpec):
    """ComponentSpec of `DataValidationGate`."""

    PARAMETERS = {
        MIN_EXAMPLES_KEY: ExecutionParameter(type=int, optional=True),
        REQUIRED_SPLITS_KEY: ExecutionParameter(type=str, optional=True),  # JSON list
    }
    INPUTS = {
        ANOMALIES_KEY: ChannelParameter(type=standard_artifacts.ExampleAnomalies),
        STATISTICS_KEY: ChannelParameter(type=standard_artifacts.ExampleStatistics),
    }
    OUTPUTS = {RESULT_KEY: ChannelParameter(type=standard_artifacts.String)}


class DataValidationGate(base_component.BaseComponent):
    """Fails the pipeline when ExampleValidator found anomalies or a split is empty.

    Args:
      anomalies: ``ExampleAnomalies`` channel (ExampleValidator ``anomalies``).
      statistics: ``ExampleStatistics`` channel (StatisticsGen ``statistics``).
      min_examples: fewest examples each split must have (default 1).
      required_splits: splits that must exist and be validated
        (default ``["train", "eval"]``).

    Output ``outputs['result']``: a ``String`` artifact (JSON summary), only
    produced when validation passed.
    """

    SPEC_CLASS = DataValidationGateSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(DataValidationGateExecutor)

    def __init__(
        self,
        anomalies: types.BaseChannel,
        statistics: types.BaseChannel,
        min_examples: int = 1,
        required_splits: Sequence[str] = DEFAULT_REQUIRED_SPLITS,
    ):
        check_int(MIN_EXAMPLES_KEY, min_examples, 0)
        if isinstance(required_splits, str) or not all(isinstance(s, str) for s in required_splits):
            raise ValueError(f"required_splits must be a list of split names, got {required_splits!r}")
        spec = DataValidationGateSpec(
            anomalies=anomalies,
            statistics=statistics,
            min_examples=min_examples,
            required_splits=json.dumps(list(required_splits)),
            result=types.Channel(type=standard_artifacts.String),
        )
        super().__init__(spec=spec)
