"""Only complete pushed versions are served: TFX's Pusher copies a
SavedModel file by file, so a push still copying (or one that died) leaves
a numbered directory without all of its files."""

import os

import pytest

tf = pytest.importorskip("tensorflow")

from app.serving import check_version, latest_version  # noqa: E402
from components.latest_pushed_model import latest_pushed_version  # noqa: E402
from components.serving_versions import latest_complete, missing_parts  # noqa: E402

pytestmark = pytest.mark.unit


def _version(root, version, files):
    path = os.path.join(root, str(version))
    for name in files:
        tf.io.gfile.makedirs(os.path.dirname(os.path.join(path, name)))
        with tf.io.gfile.GFile(os.path.join(path, name), "w") as f:
            f.write("x")
    return path


COMPLETE = ["saved_model.pb", "variables/variables.index",
            "variables/variables.data-00000-of-00002", "variables/variables.data-00001-of-00002"]


@pytest.mark.parametrize("root_kind", ["local", "ram"])
def test_the_newest_complete_version_is_served(tmp_path, root_kind):
    root = str(tmp_path) if root_kind == "local" else f"ram://serving-{os.getpid()}/{tmp_path.name}"
    good = _version(root, 100, COMPLETE)
    half = _version(root, 200, COMPLETE[:3])  # the second data shard not copied yet
    _version(root, 300, ["variables/variables.index"])  # no graph yet
    assert missing_parts(half) == ["variables/variables.data-00001-of-00002"]
    assert latest_complete(root) == (100, good)
    assert latest_version(root) == good
    assert latest_pushed_version(root) == (100, good)  # the open-source KFP baseline too
    with pytest.raises(FileNotFoundError, match="is incomplete: it lacks variables/variables.data-00001"):
        check_version(half)


def test_no_complete_version_is_a_clear_error(tmp_path):
    _version(str(tmp_path), 5, ["saved_model.pb"])
    with pytest.raises(FileNotFoundError, match=r"no complete pushed model in .*/5 lacks variables/variables.index"):
        latest_version(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no pushed model versions"):
        latest_version(str(tmp_path / "nothing"))
