"""The one DAG definition. Runners (local, Kubeflow) only configure it.

    ExampleGen (synthetic, or ImportExampleGen over your TFRecords)
      -> StatisticsGen -> ExampleValidator (against CuratedSchemaGen's schema)
      -> DataValidationGate (stops the run on any anomaly or empty split)
      -> Trainer (components.trainer.run_fn; with --base-model an Importer
         puts that directory into ML Metadata as a Model: its `base_model`)
      -> Evaluator (TFMA over the eval split; baseline: the latest blessed
         model, or on open-source KFP the latest pushed one) -> ModelBlessing
      -> IntegrationValidator (the checks TFMA cannot do)  -> InfraBlessing
      -> Pusher (model_blessing + infra_blessing: only when both bless)
"""

from __future__ import annotations

import json
from typing import List, Optional

# The modules themselves, not `tfx.v1`: its `extensions` import the Vertex AI
# client library (~5 s of every process that builds the DAG).
from tfx.components import Evaluator, ExampleValidator, ImportExampleGen, Pusher, StatisticsGen, Trainer
from tfx.dsl.components.base import executor_spec
from tfx.dsl.components.common.importer import Importer
from tfx.dsl.components.common.resolver import Resolver
from tfx.dsl.input_resolution.strategies.latest_blessed_model_strategy import LatestBlessedModelStrategy
from tfx.orchestration.pipeline import Pipeline
from tfx.proto import example_gen_pb2, pusher_pb2, trainer_pb2
from tfx.types import standard_artifacts
from tfx.types.channel import Channel

from components.curated_schema import CuratedSchemaGen
from components.data_validation import DataValidationGate
from components.evaluation import eval_config
from components.integration_validator import IntegrationValidator
from components.latest_pushed_model import LatestPushedModel
from components.pusher import Executor as PusherExecutor
from components.synthetic_example_gen import SyntheticTokenExampleGen
from pipeline.settings import PipelineSettings

TRAINER_RUN_FN = "components.trainer.run_fn"
BASELINE_RESOLVER_ID = "latest_blessed_model_resolver"
BASE_MODEL_IMPORTER_ID = "base_model_importer"
#: Where the Evaluator's baseline comes from: the latest model TFMA blessed
#: (TFX's Resolver; needs an orchestrator that runs Resolver nodes: the local
#: runner, Vertex AI Pipelines), the latest version the Pusher wrote to the
#: serving directory (a plain component: runs anywhere, e.g. open-source
#: Kubeflow Pipelines, which has no Resolver executor), or none.
BASELINES = ("latest_blessed", "latest_pushed", "none")


def _example_gen(s: PipelineSettings):
    if s.examples_dir:
        # The user's own tokenized TFRecords: <dir>/train/* and <dir>/eval/*.
        input_config = example_gen_pb2.Input(splits=[
            example_gen_pb2.Input.Split(name="train", pattern="train/*"),
            example_gen_pb2.Input.Split(name="eval", pattern="eval/*"),
        ])
        return ImportExampleGen(input_base=s.examples_dir, input_config=input_config)
    spec = s.data_spec
    params = {k: v for k, v in spec.to_dict().items()
              if k not in ("kind", "vocab_size", "seq_len", "seed") and v is not None}
    return SyntheticTokenExampleGen(
        kind=spec.kind, vocab_size=spec.vocab_size, seq_len=spec.seq_len,
        train_examples=s.train_examples, eval_examples=s.eval_examples, seed=spec.seed,
        generator_params=params)


def _baseline(kind: str, candidate, serving_dir: str):
    """(the baseline Model channel or None, the nodes that produce it)."""
    if kind == "latest_blessed":
        resolver = Resolver(
            strategy_class=LatestBlessedModelStrategy,
            model=Channel(type=standard_artifacts.Model),
            model_blessing=Channel(type=standard_artifacts.ModelBlessing),
        ).with_id(BASELINE_RESOLVER_ID)
        return resolver.outputs["model"], [resolver]
    if kind == "latest_pushed":
        pushed = LatestPushedModel(candidate=candidate, serving_dir=serving_dir)
        return pushed.outputs["baseline"], [pushed]
    return None, []  # "none"


def create_pipeline(settings: PipelineSettings, pipeline_root: Optional[str] = None,
                    metadata_connection_config=None,
                    beam_pipeline_args: Optional[List[str]] = None,
                    trainer_platform_config=None,
                    baseline: str = "latest_blessed") -> Pipeline:
    """The DAG. `baseline` (one of BASELINES) chooses what the Evaluator's
    change threshold compares against."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline: must be one of {BASELINES}, got {baseline!r}")
    s = settings
    config = s.model_config
    tokenizer_nodes, tokenizer = [], None
    if s.text_dir:
        from pipeline.text_data import text_example_gen

        example_gen, tokenizer_nodes, tokenizer_gen = text_example_gen(s.text_data, s.seq_len, s.batch_size)
        tokenizer = tokenizer_gen.outputs["tokenizer"]
    else:
        example_gen = _example_gen(s)
    statistics_gen = StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = CuratedSchemaGen(vocab_size=config.vocab_size, seq_len=s.seq_len, tokenizer=tokenizer)
    example_validator = ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"])
    data_gate = DataValidationGate(anomalies=example_validator.outputs["anomalies"],
                                   statistics=statistics_gen.outputs["statistics"])

    base_nodes, base_model = [], None
    if s.base_model:
        # The checkpoint directory as a Model artifact (TFX's Importer: no
        # copy; the artifact records its uri and identity digest).
        importer = Importer(
            source_uri=s.base.path, artifact_type=standard_artifacts.Model,
            custom_properties={"base_model_identity": s.base.identity},
        ).with_id(BASE_MODEL_IMPORTER_ID)
        base_nodes, base_model = [importer], importer.outputs["result"]
    trainer = Trainer(
        run_fn=TRAINER_RUN_FN,
        examples=example_gen.outputs["examples"],
        schema=schema_gen.outputs["schema"],
        base_model=base_model,
        train_args=trainer_pb2.TrainArgs(num_steps=s.train_steps),
        eval_args=trainer_pb2.EvalArgs(num_steps=s.eval_steps),
        custom_config=s.trainer_custom_config())
    # The Trainer consumes nothing from the gate; this edge makes it wait for
    # (and be skipped by) a failed data validation.
    trainer.add_upstream_node(data_gate)
    if trainer_platform_config is not None:
        trainer.with_platform_config(trainer_platform_config)

    baseline_model, baseline_nodes = _baseline(baseline, trainer.outputs["model"], s.path("serving"))
    evaluator = Evaluator(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=baseline_model,
        eval_config=eval_config(s),
        example_splits=["eval"])

    checks = IntegrationValidator(
        model=trainer.outputs["model"],
        examples=example_gen.outputs["examples"],
        thresholds_json=json.dumps(s.thresholds, sort_keys=True))

    # TFX's Pusher, but an unchanged model already served is not pushed again.
    pusher = Pusher(
        custom_executor_spec=executor_spec.ExecutorClassSpec(PusherExecutor),
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        infra_blessing=checks.outputs["blessing"],
        push_destination=pusher_pb2.PushDestination(
            filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=s.path("serving"))))

    components = [*(tokenizer_nodes or [example_gen]), statistics_gen, schema_gen, example_validator, data_gate,
                  *base_nodes, trainer, *baseline_nodes, evaluator, checks, pusher]
    return Pipeline(
        pipeline_name=s.pipeline_name,
        pipeline_root=pipeline_root or s.path("pipeline_root"),
        components=components,
        enable_cache=s.enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=beam_pipeline_args if beam_pipeline_args is not None else s.beam_pipeline_args,
    )
