"""Compiles the pipeline of `pipeline.pipeline.create_pipeline` for Kubeflow
Pipelines with TFX's KubeflowV2DagRunner.

The output is the JSON the runner writes: a KFP ``PipelineJob`` whose
``pipelineSpec`` is the IR every KFP v2 backend runs (``root.dag`` with one
task per component, ``deploymentSpec.executors`` with one container per
component, running TFX's ``kubeflow_v2_run_executor`` entrypoint with the
executor's class path), plus ``runtimeConfig.gcsOutputDirectory`` (the
pipeline root). `kubeflow.deploy` turns it into the YAML package the kfp
client uploads; the e2e tests run it on this machine with a small emulator
of the KFP backend (tests/support/kfp_local.py).

What compiling adds to the DAG definition (nothing else changes):

* the Trainer's `ResourceSpec` (``trainer.with_platform_config``): CPU and
  memory limits and the accelerator request (type and count);
* images: one for every component, optionally another for the Trainer
  (KubeflowV2DagRunnerConfig's ``default_image`` map keyed by component id);
* the Beam arguments of the Beam-powered components (``--runner=...``);
* cluster paths: the pipeline root, the Pusher's serving directory (default
  ``<pipeline_root>/serving``) and the Trainer's checkpoint directory
  (``<pipeline_root>/checkpoints/<training fingerprint>``; a path on this
  machine would mean nothing in a pod, and shared storage lets a retried
  Trainer pod resume);
* the Evaluator's baseline (`PLATFORM_BASELINE`): on Vertex AI Pipelines
  the latest blessed model, TFX's Resolver, which KubeflowV2DagRunner
  compiles to two ``resolver`` executors (MLMD queries); open-source
  Kubeflow Pipelines implements no resolver executor and rejects the whole
  run, so for ``platform="kfp"`` the pipeline is *built* without the
  Resolver (``create_pipeline(baseline="latest_pushed")``): the baseline is
  the newest version in the Pusher's serving directory, read by a plain
  component (components/latest_pushed_model.py), and compiling says so on
  stderr. The compiled JSON is never edited.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

PLATFORMS = ("kfp", "vertex")
#: The accelerator type string is passed through to the backend: open-source
#: KFP uses it as the Kubernetes resource name of the limit, Vertex AI as a
#: machine accelerator enum.
DEFAULT_GPU_TYPE = {"kfp": "nvidia.com/gpu", "vertex": "NVIDIA_TESLA_A100"}
DEFAULT_GPU_COUNT = 1
DEFAULT_CPU = "8"
DEFAULT_MEMORY = "32G"
BEAM_RUNNERS = ("DirectRunner", "FlinkRunner", "SparkRunner", "DataflowRunner")

TRAINER_ID = "Trainer"
#: The Evaluator's baseline per platform (see pipeline.pipeline.BASELINES).
PLATFORM_BASELINE = {"kfp": "latest_pushed", "vertex": "latest_blessed"}
PLATFORM_NOTES = {
    "kfp": ("open-source Kubeflow Pipelines cannot run TFX Resolver tasks: the Evaluator's baseline is "
            "the latest model pushed to the serving directory (LatestPushedModel), not the latest "
            "blessed one; use --platform vertex for the Resolver"),
}

_DEFAULT_IMAGE_KEY = "default_image_path"  # TFX's key for "every other component" in an image map
_MEMORY_UNITS = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
                 "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


class CompileError(ValueError):
    """An invalid compile option; the message names it."""


# --------------------------------------------------------------------------- options
def parse_cpu(value: Any) -> float:
    """Kubernetes-style CPU quantity ("8", "0.5", "500m") -> cores."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(m?)", text)
    if not match:
        raise CompileError(f"--cpu: {value!r} is not a CPU quantity (e.g. 8, 0.5, 500m)")
    cores = float(match.group(1)) / (1000 if match.group(2) else 1)
    if cores <= 0:
        raise CompileError(f"--cpu: must be positive, got {value!r}")
    return cores


def parse_memory(value: Any) -> float:
    """Kubernetes-style memory quantity ("32G", "30Gi", "512Mi") -> GB (1e9
    bytes), the unit of ResourceSpec.memory_limit."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d*)?)([KMGTPE]i?)?", text)
    if not match:
        raise CompileError(f"--memory: {value!r} is not a memory quantity (e.g. 32G, 30Gi, 512Mi)")
    unit = match.group(2)
    # A bare number is bytes (as in Kubernetes).
    gigabytes = float(match.group(1)) * (_MEMORY_UNITS[unit] if unit else 1) / 1e9
    if gigabytes <= 0:
        raise CompileError(f"--memory: must be positive, got {value!r}")
    return gigabytes


def trainer_resource_spec(gpu_type: Optional[str], gpu_count: int, cpu: Any, memory: Any):
    """The Trainer's `ResourceSpec`, the proto KubeflowV2's step builder
    accepts as a component's platform_config (kfp_pipeline_spec's
    ``PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec``)."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    if isinstance(gpu_count, bool) or not isinstance(gpu_count, int) or gpu_count < 0:
        raise CompileError(f"--gpu-count: must be an integer >= 0, got {gpu_count!r}")
    spec = pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec(
        cpu_limit=parse_cpu(cpu), memory_limit=parse_memory(memory))
    if gpu_count:
        if not gpu_type:
            raise CompileError("--gpu-type: empty")
        spec.accelerator.type = gpu_type
        spec.accelerator.count = gpu_count
    return spec


def beam_pipeline_args(runner: str = "DirectRunner", extra_args: Sequence[str] = (),
                       direct_defaults: Sequence[str] = ()) -> List[str]:
    """``--runner=<runner>`` + the pass-through arguments. The DirectRunner
    keeps `direct_defaults` (the settings' in-pod defaults) unless arguments
    are given, and with neither is the empty list (Beam's default runner);
    other runners get only what is passed, and the ones that need a cluster
    address are checked."""
    if runner not in BEAM_RUNNERS:
        raise CompileError(f"--beam-runner: must be one of {BEAM_RUNNERS}, got {runner!r}")
    extra = list(extra_args or [])
    for arg in extra:
        if not arg.startswith("--"):
            raise CompileError(f"--beam-arg: {arg!r} is not a --flag[=value] Beam argument")
        if arg.split("=", 1)[0] == "--runner":
            raise CompileError("--beam-arg: give the runner with --beam-runner, not --beam-arg --runner=...")
    given = {a.split("=", 1)[0] for a in extra}
    if runner == "DataflowRunner":
        missing = [f for f in ("--project", "--region", "--temp_location") if f not in given]
        if missing:
            raise CompileError("--beam-runner DataflowRunner needs "
                               + " ".join(f"--beam-arg={m}=..." for m in missing))
    args = [f"--runner={runner}"]
    if runner == "DirectRunner" and not extra:
        args += [a for a in direct_defaults if not a.startswith("--runner")]
        if len(args) == 1:
            # Beam's default runner as is: no arguments, so TFX builds no
            # ephemeral sdist in each Beam pod (pipeline.settings).
            return []
    return args + extra


def beam_warnings(runner: str, beam_args: Sequence[str]) -> List[str]:
    """Advice for runners that usually need more than we can check."""
    given = {a.split("=", 1)[0] for a in beam_args}
    notes = []
    if runner == "FlinkRunner" and "--flink_master" not in given:
        notes.append("FlinkRunner without --flink_master runs a local embedded Flink in each pod "
                     "(a Java job server the images do not have); point it at your Flink cluster")
    if runner == "SparkRunner" and "--spark_master_url" not in given:
        notes.append("SparkRunner without --spark_master_url runs a local Spark in each pod "
                     "(a Java job server the images do not have); point it at your Spark master")
    if runner != "DirectRunner" and "--sdk_container_image" not in given:
        notes.append(f"{runner} workers must import this package (SyntheticTokenExampleGen's DoFns "
                     "use `data`): pass --beam-arg=--sdk_container_image=<the beam-worker image>, "
                     "see docker/README.md")
    return notes


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else os.path.join(root, *parts)


def _check_root(pipeline_root: str) -> str:
    if not pipeline_root:
        raise CompileError("--pipeline-root: required (a gs://, s3:// URI, or a path every pod mounts)")
    if "://" not in pipeline_root:
        return os.path.abspath(pipeline_root)
    if pipeline_root.startswith("minio://"):
        raise CompileError("--pipeline-root: TFX's executors read and write artifact URIs with "
                           "TensorFlow's filesystems, which do not know minio://; use "
                           "s3://<bucket>/... with the MinIO endpoint (see docker/README.md)")
    return pipeline_root.rstrip("/")


# --------------------------------------------------------------------------- compile
class _quiet_inverted_image_warning:
    """TFX 1.16 warns "DEFAULT_IMAGE_PATH_KEY is not found in default_image"
    exactly when it *is* found (an inverted check in pipeline_builder); drop
    that one message while compiling."""

    def _filter(self, record) -> bool:
        return "DEFAULT_IMAGE_PATH_KEY is not found" not in record.getMessage()

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("absl")
        self._logger.addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        self._logger.removeFilter(self._filter)
        return False


def compile_pipeline(settings, output: str, image: str, pipeline_root: str,
                     gpu_type: Optional[str] = None, gpu_count: int = DEFAULT_GPU_COUNT,
                     cpu: Any = DEFAULT_CPU, memory: Any = DEFAULT_MEMORY,
                     beam_args: Optional[Sequence[str]] = None, *,
                     trainer_image: Optional[str] = None, platform: str = "kfp",
                     display_name: Optional[str] = None) -> str:
    """Compiles `create_pipeline(settings, ...)` to the KFP v2 PipelineJob
    JSON `output` and returns its path.

    `beam_args` replaces the settings' Beam arguments when given (see
    `beam_pipeline_args`). `gpu_type` defaults per platform
    (`DEFAULT_GPU_TYPE`); `gpu_count=0` requests no accelerator. The
    platform's note (`PLATFORM_NOTES`) is printed to stderr."""
    from tfx import v1 as tfx

    from pipeline.pipeline import create_pipeline

    if platform not in PLATFORMS:
        raise CompileError(f"--platform: must be one of {PLATFORMS}, got {platform!r}")
    if not image:
        raise CompileError("--image: required (the image with the locked environment and this package)")
    pipeline_root = _check_root(pipeline_root)
    resources = trainer_resource_spec(gpu_type or DEFAULT_GPU_TYPE[platform], gpu_count, cpu, memory)
    settings = settings.replace(pipeline_root=pipeline_root,
                                serving_dir=settings.serving_dir or _join(pipeline_root, "serving"),
                                checkpoint_root=_join(pipeline_root, "checkpoints"))
    if beam_args is None:
        beam_args = beam_pipeline_args("DirectRunner", (), settings.beam_pipeline_args)

    pipeline = create_pipeline(settings, pipeline_root=pipeline_root, beam_pipeline_args=list(beam_args),
                               trainer_platform_config=resources, baseline=PLATFORM_BASELINE[platform])
    if platform in PLATFORM_NOTES:
        print(f"deepseek-tfx: warning: {PLATFORM_NOTES[platform]}", file=sys.stderr)

    images: Any = image
    if trainer_image and trainer_image != image:
        images = {_DEFAULT_IMAGE_KEY: image, TRAINER_ID: trainer_image}
    config = tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(
        display_name=display_name or settings.pipeline_name, default_image=images,
        use_pipeline_spec_2_1=True)
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(config=config)
    with _quiet_inverted_image_warning():
        job = runner.run(pipeline, write_out=False)
    job["pipelineSpec"]["defaultPipelineRoot"] = pipeline_root

    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(job, f, indent=2, sort_keys=True)
    os.replace(tmp, output)  # never a half-written spec
    return output


# --------------------------------------------------------------------------- reading
def load_pipeline_job(path: str) -> Dict[str, Any]:
    """A compiled file as a PipelineJob dict (also accepts a bare
    PipelineSpec, JSON or the YAML `kubeflow.deploy` writes)."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        doc = next(iter(yaml.safe_load_all(text)))
    else:
        doc = json.loads(text)
    if "pipelineSpec" not in doc:
        doc = {"pipelineSpec": doc, "runtimeConfig": {}}
    return doc


def pipeline_spec_proto(job: Dict[str, Any]):
    """`job["pipelineSpec"]` parsed (strictly) as KFP's PipelineSpec proto."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    return json_format.ParseDict(job["pipelineSpec"], pipeline_spec_pb2.PipelineSpec())


def executor_class_paths(job: Dict[str, Any]) -> Dict[str, str]:
    """{executor label: --executor_class_path} of every container executor."""
    paths = {}
    for label, executor in job["pipelineSpec"]["deploymentSpec"]["executors"].items():
        args = executor.get("container", {}).get("args", [])
        if "--executor_class_path" in args:
            paths[label] = args[args.index("--executor_class_path") + 1]
    return paths


def check_executors_importable(job: Dict[str, Any]) -> Dict[str, str]:
    """Imports every executor class the spec names, as the container
    entrypoint will; raises CompileError for one that does not import or
    lives in ``__main__``. Returns {label: class path}."""
    from tfx.utils import import_utils

    paths = executor_class_paths(job)
    for label, path in paths.items():
        if path.startswith("__main__."):
            raise CompileError(f"{label}: executor {path} is defined in __main__; it cannot be "
                               "imported in a container")
        try:
            import_utils.import_class_by_path(path)
        except ImportError as e:
            raise CompileError(f"{label}: executor {path} does not import: {e.__cause__ or e}") from None
    return paths
