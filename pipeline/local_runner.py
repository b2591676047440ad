"""Runs the pipeline on LocalDagRunner with ML Metadata in SQLite (or the
MySQL database of `--metadata-mysql`), every path under one run directory."""

from __future__ import annotations

import datetime
import os
from typing import Optional

from pipeline.pipeline import create_pipeline
from pipeline.settings import PipelineSettings


def new_run_id() -> str:
    # The format LocalDagRunner itself uses.
    return datetime.datetime.now().isoformat()


def run_local(settings: PipelineSettings, run_id: Optional[str] = None) -> str:
    """Runs the pipeline; returns its pipeline-run id, the name of the run's
    `pipeline_run` context in ML Metadata (`run_id`, else a new one)."""
    from tfx.dsl.compiler import compiler, constants
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner
    from tfx.orchestration.portable import runtime_parameter_utils

    from pipeline.metadata_store import redact_passwords_in_logs, target_of

    os.makedirs(settings.run_dir, exist_ok=True)
    target = target_of(settings)
    target.check()  # an unreachable or refusing store fails here, in one line
    metadata = target.connection_config()
    redact_passwords_in_logs()  # TFX logs the connection config, password included
    pipeline = create_pipeline(settings, metadata_connection_config=metadata)
    ir = compiler.Compiler().compile(pipeline)
    # Bound here so the caller can find this run's record; LocalDagRunner
    # only fills the run id when it is still unset.
    run_id = run_id or new_run_id()
    runtime_parameter_utils.substitute_runtime_parameter(ir, {constants.PIPELINE_RUN_ID_PARAMETER_NAME: run_id})
    LocalDagRunner().run_with_ir(ir)
    return run_id
