"""The command-line app on top of the pipeline: `deepseek-tfx` (`app.cli`),
its console and run report, ML Metadata inspection, serving from the pushed
model, and the demo. It uses `pipeline/` (the DAG and its local runner) and
`kubeflow/` (compile, deploy); neither imports it."""
