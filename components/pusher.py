"""The Pusher's executor: TFX's, except that a model the serving directory
already serves as its newest version is not pushed again.

A cached rerun of an unchanged pipeline reuses the Trainer's model, but the
Evaluator runs again (its baseline, the latest blessed model, is now that
same model), so its new blessing reruns the Pusher, and TFX's would copy
the same SavedModel into a new version. Here the candidate is compared with
the newest complete version (saved_model.pb and the variables index, which
holds every tensor's checksum, byte for byte; the data shards by size):
when equal, the PushedModel records that version with `already_pushed` = 1
and nothing is copied."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
from tfx import types
from tfx.components.pusher import executor as tfx_pusher
from tfx.proto import pusher_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

ALREADY_PUSHED_KEY = "already_pushed"


def _files(root: str) -> Dict[str, int]:
    import tensorflow as tf

    out = {}
    for folder, _, names in tf.io.gfile.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = tf.io.gfile.stat(path).length
    return out


def _read(path: str) -> bytes:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def same_saved_model(a: str, b: str) -> bool:
    """True when the SavedModels at a and b hold the same graph and weights."""
    if _files(a) != _files(b):
        return False
    return all(_read(os.path.join(a, name)) == _read(os.path.join(b, name))
               for name in ("saved_model.pb", os.path.join("variables", "variables.index")))


def served_copy(model_path: str, base_directory: str) -> Optional[Tuple[int, str]]:
    """(version, path) when the newest complete version is this model."""
    from components.serving_versions import latest_complete

    latest = latest_complete(base_directory)
    if latest is not None and same_saved_model(model_path, latest[1]):
        return latest
    return None


class Executor(tfx_pusher.Executor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]], exec_properties: Dict[str, Any]) -> None:
        destination = pusher_pb2.PushDestination()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.PUSH_DESTINATION_KEY],
                                  destination)
        if destination.WhichOneof("destination") == "filesystem" and self.CheckBlessing(input_dict):
            model_path = self.GetModelPath(input_dict)
            served = served_copy(model_path, destination.filesystem.base_directory)
            if served is not None:
                version, path = served
                model_push = artifact_utils.get_single_instance(
                    output_dict[standard_component_specs.PUSHED_MODEL_KEY])
                self._MarkPushed(model_push, pushed_destination=path, pushed_version=str(version))
                model_push.set_int_custom_property(ALREADY_PUSHED_KEY, 1)
                logging.info("Model %s is already served as version %s (%s); nothing pushed",
                             model_path, version, path)
                return
        super().Do(input_dict, output_dict, exec_properties)
