"""Kubeflow Pipelines: compile the pipeline with TFX's KubeflowV2DagRunner
(`kubeflow.compile`), submit it with the kfp client (`kubeflow.deploy`), or
run the compiled spec here, task by task, as a KFP backend would
(`kubeflow.local_execution`)."""
