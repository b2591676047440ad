"""Kubeflow Pipelines: compile the pipeline with TFX's KubeflowV2DagRunner
(`kubeflow.compile`) and submit it with the kfp client (`kubeflow.deploy`)."""
