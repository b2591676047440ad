"""Deployment numbers (README "Deployment"): a Trainer on a remote root
killed mid-run and restarted (steps lost, the checkpoint mirroring's cost),
and ML Metadata on MySQL against SQLite (pipeline wall time, `inspect` time).

    .venv/bin/python -m benchmarks.deployment --out benchmarks/results/deployment_cpu.json

The remote root is TF's in-memory ram:// filesystem (no network: the copy
cost is a floor for a bucket). The MySQL server is the tests' throwaway
MariaDB (scripts/ensure_mariadb.sh installs it). One run of each: on a
shared machine the wall times are indicative, not precise."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class _PodKilled(Exception):
    pass


def remote_resume(work: str, steps: int = 24, checkpoint_every: int = 8, kill_at: int = 20) -> dict:
    """run_fn on ram:// URIs, its engine killed after step `kill_at` (the
    pod dies), then a fresh run_fn (a new pod: nothing local survives)."""
    import shutil

    from tfx.components.trainer.fn_args_utils import DataAccessor, FnArgs
    from tfx.components.util import tfxio_utils
    from tfx.types import artifact_utils, standard_artifacts

    from components import trainer
    from data import DataSpec, generate, write_tfrecords
    from model import get_preset

    seq_len, batch = 16, 8
    examples = os.path.join(work, "examples")
    tokens = generate(DataSpec("markov", vocab_size=64, seq_len=seq_len, seed=0), 256)
    for split, rows in (("train", tokens[:192]), ("eval", tokens[192:])):
        os.makedirs(os.path.join(examples, f"Split-{split}"))
        write_tfrecords(os.path.join(examples, f"Split-{split}", "data_tfrecord-00000-of-00001.gz"), rows)
    artifact = standard_artifacts.Examples()
    artifact.uri = examples
    artifact.split_names = artifact_utils.encode_split_names(["train", "eval"])
    root = f"ram://deployment-{os.getpid()}"
    fn_args = FnArgs(
        data_accessor=DataAccessor(tf_dataset_factory=tfxio_utils.get_tf_dataset_factory_from_artifact(
            [artifact], []), record_batch_factory=None, data_view_decode_fn=None),
        train_files=[os.path.join(examples, "Split-train", "*")],
        eval_files=[os.path.join(examples, "Split-eval", "*")], train_steps=steps, eval_steps=2,
        serving_model_dir=f"{root}/model/Format-Serving", model_run_dir=f"{root}/model_run",
        custom_config={"model_config": get_preset("tiny").to_dict(), "seq_len": seq_len,
                       "training": {"batch_size": batch, "learning_rate": 3e-3, "warmup_steps": 5,
                                    "weight_decay": 0.01, "precision": "auto", "seed": 0,
                                    "checkpoint_every": checkpoint_every, "log_every": 1}})

    def kill(line):
        if line.startswith(f"step {kill_at:>{len(str(steps))}}/"):
            raise _PodKilled(line)

    started = time.perf_counter()
    try:
        trainer.run_fn(fn_args, log_fn=kill)
        raise RuntimeError("the engine was not killed")
    except _PodKilled:
        pass
    killed_after = time.perf_counter() - started
    for leftover in os.listdir(tempfile.gettempdir()):  # the dead pod's disk
        if leftover.startswith("deepseek-tfx-engine-"):
            shutil.rmtree(os.path.join(tempfile.gettempdir(), leftover), ignore_errors=True)
    summary = trainer.run_fn(fn_args, log_fn=lambda line: None)
    return {"train_steps": steps, "checkpoint_every": checkpoint_every, "killed_after_step": kill_at,
            "resumed_from_step": summary["start_step"],
            "steps_lost": kill_at - summary["start_step"],
            "first_run_seconds": killed_after,
            "resumed_run": {"train_seconds": summary["train_seconds"],
                            "checkpoint_mirror_seconds": summary["checkpoint_mirror_seconds"],
                            "mirror_overhead_fraction": summary["checkpoint_mirror_seconds"]
                            / summary["train_seconds"],
                            "checkpoints_mirrored": summary["checkpoint_steps"]}}


def _timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def metadata_backends(work: str) -> dict:
    from app.inspect_metadata import collect
    from pipeline.local_runner import run_local
    from pipeline.metadata_store import MetadataTarget
    from pipeline.settings import PipelineSettings
    sys.path.insert(0, os.path.join(ROOT, "tests", "support"))
    import mariadb_server as mariadb

    loose = {"max_loss_gap_nats": 5.0, "max_expert_load_ratio": 100.0, "max_expert_load_cv": 5.0,
             "min_gain_over_uniform_nats": 0.05}

    db = mariadb.MariaDB().start()
    try:
        db.add_user("bench", "bench")
        os.environ["DEEPSEEK_TFX_MYSQL_PASSWORD"] = "bench"
        url = db.url("bench", "mlmd_bench")
        base = dict(preset="tiny", seq_len=16, train_examples=256, eval_examples=32, train_steps=5,
                    batch_size=16, eval_steps=2, checkpoint_every=5, log_every=5, thresholds=loose)
        out = {}
        for name, extra in (("sqlite", {}), ("mysql", {"metadata_mysql": url})):
            settings = PipelineSettings(run_dir=os.path.join(work, name), **base, **extra)
            target = MetadataTarget.of(settings.path("metadata"), settings.metadata_mysql)
            first = _timed(lambda: run_local(settings))
            cached = _timed(lambda: run_local(settings))
            collect(target)  # warm: ML Metadata imported, the store opened once
            inspect = min(_timed(lambda: collect(target)) for _ in range(3))
            # What a user waits for: `deepseek-tfx inspect` in a fresh process.
            where = (["--metadata-mysql", url] if name == "mysql"
                     else ["--run-dir", settings.run_dir])
            command = [sys.executable, "-m", "app.cli", "inspect", "--json", *where]
            cli = min(_timed(lambda: subprocess.run(command, check=True, capture_output=True, cwd=ROOT))
                      for _ in range(3))
            out[name] = {"pipeline_seconds": first, "cached_rerun_seconds": cached,
                         "inspect_seconds": inspect, "inspect_cli_seconds": cli}
        return out
    finally:
        db.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default="remote_resume,metadata_backends")
    args = parser.parse_args(argv)
    results = {}
    if os.path.exists(args.out):  # the sections not rerun keep their numbers
        with open(args.out) as f:
            results = json.load(f)
    results.update({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "note": "one run each; wall times; each section records the load average "
                            "(1 min) it started at"})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deepseek-tfx-bench-") as work:
        for section in args.sections.split(","):
            os.makedirs(os.path.join(work, section))
            load = os.getloadavg()[0]
            results[section] = {**globals()[section](os.path.join(work, section)),
                                "load_average_at_start": round(load, 2)}
            print(json.dumps({section: results[section]}, indent=2), flush=True)
            with open(args.out, "w") as f:  # after each section: a long run keeps what it has
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
