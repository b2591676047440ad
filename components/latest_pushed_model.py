"""LatestPushedModel: the Evaluator's baseline where TFX's Resolver cannot
run (open-source Kubeflow Pipelines has no executor for Resolver tasks).

A plain component: it reads the Pusher's filesystem destination
(``<serving_dir>/<version>/saved_model.pb``, the version a number the
Pusher chose, newer is larger), copies the newest version into its output
Model as ``Format-Serving`` (where the Evaluator looks), and records
``pushed_version`` and ``pushed_destination``. With nothing pushed yet it
copies the candidate itself and sets ``is_candidate`` = 1: the change
threshold then compares the candidate with itself (a change of 0), which
is what TFX's Evaluator does without a baseline (it "rubber-stamps" change
thresholds); the value thresholds still apply.
"""

import os

from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import standard_artifacts

SERVING_FORMAT_DIR = "Format-Serving"


def latest_pushed_version(serving_dir: str):
    """(version, path) of the newest completely pushed SavedModel under
    `serving_dir` (a half-copied version is passed over), or None when
    nothing has been pushed there."""
    from components.serving_versions import latest_complete

    return latest_complete(serving_dir)


@component
def LatestPushedModel(candidate: InputArtifact[standard_artifacts.Model],
                      baseline: OutputArtifact[standard_artifacts.Model],
                      serving_dir: Parameter[str]):
    from tfx.utils import io_utils

    latest = latest_pushed_version(serving_dir)
    target = os.path.join(baseline.uri, SERVING_FORMAT_DIR)
    if latest is None:
        io_utils.copy_dir(os.path.join(candidate.uri, SERVING_FORMAT_DIR), target)
        baseline.set_int_custom_property("is_candidate", 1)
        print(f"LatestPushedModel: nothing pushed to {serving_dir} yet; the baseline is the candidate")
        return
    version, path = latest
    io_utils.copy_dir(path, target)
    baseline.set_int_custom_property("is_candidate", 0)
    baseline.set_int_custom_property("pushed_version", version)
    baseline.set_string_custom_property("pushed_destination", path)
    print(f"LatestPushedModel: baseline is pushed version {version} ({path})")
