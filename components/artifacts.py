"""Custom artifact types of this pipeline."""

from tfx.types import artifact


class ValidationReport(artifact.Artifact):
    """The gate's human-readable verdict: report.json and report.md."""

    # KubeflowV2 encodes a custom type's TYPE_NAME as the KFP schema title,
    # which must match `<namespace>.<Title>` (one dot, see TFX's
    # kubeflow/v2/compiler_utils._SCHEMA_TITLE_RE), and its executor
    # entrypoint imports the class back from that title with
    # import_class_by_path. So the name is `<package>.<Class>`, and
    # `components` re-exports the class (components/__init__.py).
    TYPE_NAME = "components.ValidationReport"


class Tokenizer(artifact.Artifact):
    """A SentencePiece tokenizer: `tokenizer.model` (the model proto) and
    `tokenizer.json` (its facts: vocab size, special ids, sha256, how it was
    made). Custom properties: vocab_size, pad_id, bos_id, eos_id, sha256,
    source ("trained" or the user's file)."""

    TYPE_NAME = "components.Tokenizer"  # <package>.<Class>: see ValidationReport
