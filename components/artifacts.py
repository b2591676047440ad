"""Custom artifact types of this pipeline."""

from tfx.types import artifact


class ValidationReport(artifact.Artifact):
    """The gate's human-readable verdict: report.json and report.md."""

    TYPE_NAME = "components.artifacts.ValidationReport"
