"""Runs the pipeline on LocalDagRunner with ML Metadata in SQLite, every
path under one run directory."""

from __future__ import annotations

import os

from tfx import v1 as tfx

from pipeline.pipeline import create_pipeline
from pipeline.settings import PipelineSettings


def run_local(settings: PipelineSettings) -> None:
    os.makedirs(settings.run_dir, exist_ok=True)
    metadata = tfx.orchestration.metadata.sqlite_metadata_connection_config(settings.path("metadata"))
    pipeline = create_pipeline(settings, metadata_connection_config=metadata)
    tfx.orchestration.LocalDagRunner().run(pipeline)
