"""Resuming the TensorBoard curves: the events and metrics records after the
resume step go, each (tag, step) stays once, and a prune interrupted between
writing its file and removing the old ones is finished by the next."""

import json
import os

import pytest

tf = pytest.importorskip("tensorflow")

from components import tensorboard_events as te  # noqa: E402


def _write(log_dir, points):
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for tag, step, value in points:
            tf.summary.scalar(tag, value, step=step)
    writer.close()


def _read(log_dir):
    from tensorboard.compat.proto import event_pb2

    out = []
    for path in te.event_files(log_dir):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = event_pb2.Event.FromString(raw)
            out += [(v.tag, event.step, float(tf.make_ndarray(v.tensor))) for v in event.summary.value]
    return sorted(out)


def test_prune_keeps_each_point_up_to_the_resume_step_once(tmp_path):
    log_dir = str(tmp_path)
    _write(log_dir, [("train/loss", s, s / 10) for s in (5, 10, 15)] + [("eval/loss", 15, 9.0)])
    # A second attempt that had re-logged step 10 before it too was killed.
    _write(log_dir, [("train/loss", 10, 1.5), ("train/loss", 15, 2.5)])
    assert len(te.event_files(log_dir)) == 2
    assert te.prune_events(log_dir, 10) == 2
    assert _read(log_dir) == [("train/loss", 5, 0.5), ("train/loss", 10, 1.5)]  # the newest step 10
    (pruned,) = te.event_files(log_dir)
    # Killed after the pruned file was written, before the old files went: the next prune is the same.
    _write(log_dir, [("train/loss", 10, 1.5), ("train/loss", 15, 2.5)])
    te.prune_events(log_dir, 10)
    assert te.event_files(log_dir) == [pruned]
    assert _read(log_dir) == [("train/loss", 5, 0.5), ("train/loss", 10, 1.5)]
    # A run that starts again from scratch keeps nothing.
    assert te.prune_events(log_dir, 0) == 0 and te.event_files(log_dir) == []


def test_prune_metrics_records(tmp_path):
    log_dir = str(tmp_path)
    with open(os.path.join(log_dir, te.METRICS_FILE), "w") as f:
        for step in (5, 10, 15, 10, 15):
            f.write(json.dumps({"step": step, "loss": step}) + "\n")
    assert [r["step"] for r in te.prune_metrics(log_dir, 10)] == [5, 10]
    assert [r["step"] for r in te.read_metrics(log_dir)] == [5, 10]
    assert te.read_metrics(str(tmp_path / "none")) == []


def test_load_extremes_are_relative_to_the_mean():
    assert te.load_extremes([0.5, 0.25, 0.25, 0.0]) == {"load_max": 2.0, "load_min": 0.0}
