"""The run report: one self-contained HTML page per pipeline run (`report.page`), and the plots it and the live TensorBoard events share (`report.plots`)."""
