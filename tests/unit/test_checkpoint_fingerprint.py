"""The training setup's fingerprint is stored in every checkpoint and
compared with the checkpoint being resumed; the refusal names what changed."""

import json

import numpy as np
import pytest

from training.checkpoint import STATE_FILE, Checkpointer, CheckpointMismatchError

pytestmark = pytest.mark.unit


def _setup(**changes):
    setup = {"base_model": {"hidden_size": 32, "num_hidden_layers": 2},
             "data": {"identity": "abc123", "seq_len": 16, "batch_size": 8},
             "optimizer": {"learning_rate": 3e-3, "weight_decay": 0.01, "grad_clip_norm": 1.0},
             "precision": {"requested": "auto", "policy": "float32", "float8": False}}
    for path, value in changes.items():
        group, key = path.split(".")
        setup[group] = dict(setup[group], **{key: value})
    return setup


def _arrays():
    return {"w": np.ones(4, np.float32)}


def test_every_checkpoint_carries_its_fingerprint(tmp_path):
    ckpt = Checkpointer(str(tmp_path), _setup())
    ckpt.save(5, _arrays())
    assert ckpt.saved_fingerprint(5) == _setup()
    assert set(ckpt.load(5)) == {"w"}  # the stamp is not a variable
    ckpt.check_fingerprint(5)


@pytest.mark.parametrize("change, named", [
    ({"data.identity": "def456"}, "data.identity: 'abc123' -> 'def456'"),
    ({"optimizer.weight_decay": 0.1}, "optimizer.weight_decay: 0.01 -> 0.1"),
    ({"optimizer.grad_clip_norm": None}, "optimizer.grad_clip_norm: 1.0 -> None"),
    ({"precision.requested": "bf16"}, "precision.requested: 'auto' -> 'bf16'"),
    ({"base_model.hidden_size": 48}, "base_model (hidden_size)"),
])
def test_a_changed_setup_is_refused_naming_the_change(tmp_path, change, named):
    Checkpointer(str(tmp_path), _setup()).save(5, _arrays())
    with pytest.raises(CheckpointMismatchError, match="different training setup") as info:
        Checkpointer(str(tmp_path), _setup(**change)).check_fingerprint(5)
    assert named in str(info.value)


def test_a_run_killed_in_its_first_save_cannot_lend_its_fingerprint(tmp_path):
    """Setup A wrote trainer_state.json and died before its first checkpoint;
    setup B then trains in the same directory: B's checkpoints are B's, and
    A resuming them is refused."""
    (tmp_path / STATE_FILE).write_text(json.dumps(_setup()))
    other = _setup(**{"optimizer.learning_rate": 1e-2})
    Checkpointer(str(tmp_path), other).save(10, _arrays())
    assert Checkpointer(str(tmp_path), other).saved_fingerprint(10) == other
    assert json.loads((tmp_path / STATE_FILE).read_text()) == other
    with pytest.raises(CheckpointMismatchError, match="optimizer.learning_rate: 0.01 -> 0.003"):
        Checkpointer(str(tmp_path), _setup()).check_fingerprint(10)


@pytest.mark.parametrize("saved, current", [(None, "aa94b6f67bd849b46eb8"),
                                            ("aa94b6f67bd849b46eb8", "9a4ff114f33e13e5b708")])
def test_a_checkpoint_of_another_base_model_is_refused_naming_it(tmp_path, saved, current):
    """From random weights (no identity; older checkpoints lack the key) or
    from another base: refused, in words."""
    setup = _setup()
    if saved is not None:
        setup["base_model_identity"] = saved
    Checkpointer(str(tmp_path), setup).save(5, _arrays())
    with pytest.raises(CheckpointMismatchError,
                       match=rf"changed: base model \(the checkpoint training started from\): "
                             rf"{saved!r} -> '{current}'"):
        Checkpointer(str(tmp_path), dict(_setup(), base_model_identity=current)).check_fingerprint(5)
    # The same base resumes.
    Checkpointer(str(tmp_path), dict(_setup(), base_model_identity=saved)).check_fingerprint(5)
