"""The pipeline's TFX components."""


def __getattr__(name):
    # `components.ValidationReport` (and `.Tokenizer`) are the custom artifacts' TYPE_NAMEs, which
    # KubeflowV2's executor entrypoint imports by that path. Resolved lazily so
    # importing a light submodule does not pull in TFX.
    if name in ("ValidationReport", "Tokenizer"):
        from components import artifacts

        return getattr(artifacts, name)
    raise AttributeError(f"module 'components' has no attribute {name!r}")
