"""The pushed models in a serving directory (TF Serving layout:
`<serving_dir>/<version>/`, the version a number, newer is larger).

TFX's Pusher copies a SavedModel into its version directory file by file,
so a push that is still running or died half-way leaves a directory that
looks like a version. Only a complete one counts: `saved_model.pb`, the
variables index and every data shard the shard names announce. Paths go
through tf.io.gfile, so gs:// and other registered schemes work."""

from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

_SHARD = re.compile(r"^variables\.data-(\d+)-of-(\d+)$")


def missing_parts(version_dir: str) -> List[str]:
    """What a SavedModel version directory lacks ([] when complete)."""
    import tensorflow as tf

    gfile = tf.io.gfile
    missing = [name for name in ("saved_model.pb", "variables/variables.index")
               if not gfile.exists(os.path.join(version_dir, name))]
    variables = os.path.join(version_dir, "variables")
    shards = ([m for m in (_SHARD.match(n.rstrip("/")) for n in gfile.listdir(variables)) if m]
              if gfile.isdir(variables) else [])
    if not shards:
        missing.append("variables/variables.data-*")
    else:
        total = int(shards[0].group(2))
        have = {int(m.group(1)) for m in shards}
        missing += [f"variables/variables.data-{i:05d}-of-{total:05d}"
                    for i in range(total) if i not in have]
    return missing


def versions(serving_dir: str) -> List[Tuple[int, str]]:
    """(version, path) of every numbered directory, oldest first."""
    import tensorflow as tf

    if not serving_dir or not tf.io.gfile.isdir(serving_dir):
        return []
    found = [(int(n.rstrip("/")), os.path.join(serving_dir, n.rstrip("/")))
             for n in tf.io.gfile.listdir(serving_dir) if n.rstrip("/").isdigit()]
    return sorted(found)


def latest_complete(serving_dir: str) -> Optional[Tuple[int, str]]:
    """(version, path) of the newest complete version, or None."""
    for version, path in reversed(versions(serving_dir)):
        if not missing_parts(path):
            return version, path
    return None
