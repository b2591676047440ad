"""The pipeline's TFX components."""


def __getattr__(name):
    # `components.ValidationReport` is the custom artifact's TYPE_NAME, which
    # KubeflowV2's executor entrypoint imports by that path. Resolved lazily so
    # importing a light submodule does not pull in TFX.
    if name == "ValidationReport":
        from components.artifacts import ValidationReport

        return ValidationReport
    raise AttributeError(f"module 'components' has no attribute {name!r}")
