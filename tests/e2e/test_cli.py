"""`deepseek-tfx run` as a user sees it: our lines on the terminal, the
third-party output in the run's log, a short account of a failure, and the
exit status (0 pushed, 3 not pushed, 1 failed, 2 invalid settings).
Failures and invalid settings are reported on stderr."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.e2e.test_pipeline_local import LOOSE_GATE, _good_rows, _write_user_examples

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--preset", "tiny", "--seq-len", "16", "--train-examples", "256", "--eval-examples", "32",
        "--steps", "10", "--batch-size", "16"]
NOISE = ("Traceback", "FutureWarning", "WARNING:absl", "cuda_", "I0000")


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # TensorFlow's C++ start-up lines as a user gets them
    return subprocess.run([sys.executable, "-m", "app.cli", "run", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=900)


def _log_path(out):
    match = re.search(r"(\S+/logs/run-\S+\.log)", out.stdout)
    assert match, out.stdout
    return match.group(1)


def _report_path(out):
    match = re.search(r"^Report: (\S+\.html)$", out.stdout, re.M)
    assert match, out.stdout
    return match.group(1)


SECTIONS = ("verdict", "dag", "training", "experts", "evaluation", "checks", "lineage")


def _check_page(path, tmp_path):
    """The report as a browser shows it: self-contained (no http(s) resource,
    every image inline and decoded), every section, a screenshot with content."""
    import numpy as np
    from PIL import Image

    from tests.support import browser

    page = open(path, encoding="utf-8").read()
    assert "http://" not in page and "https://" not in page
    resources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page) + re.findall(r"url\(([^)]*)\)", page)
    assert all(r.startswith(("data:image/png;base64,", "#")) for r in resources), resources
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    images = page.count("<img ")
    body = re.search(r"<body[^>]*>", browser.dom(path)).group(0)
    assert f'data-images="{images}"' in body and 'data-broken-images="0"' in body, body
    shot = np.asarray(Image.open(browser.screenshot(path, str(tmp_path / "report.png"))).convert("RGB"))
    assert shot.shape[:2] == (3600, 1280)
    ink = np.any(shot < 200, axis=-1).mean()  # not white
    assert ink > 0.02, ink
    assert len(np.unique(shot.reshape(-1, 3)[::7], axis=0)) > 200  # plots, not just text
    return page


def _assert_quiet(out):
    terminal = out.stdout + out.stderr
    for noise in NOISE:
        assert noise not in terminal, (noise, terminal)


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    out = _cli("--run-dir", str(run_dir), *TINY, "--thresholds", json.dumps(LOOSE_GATE))
    return run_dir, out


def test_pushed_run_exits_0_and_shows_only_our_lines(pushed_run):
    run_dir, out = pushed_run
    assert out.returncode == 0, out.stdout + out.stderr
    _assert_quiet(out)
    for component in ("SyntheticTokenExampleGen", "StatisticsGen", "DataValidationGate", "Trainer",
                      "IntegrationValidator", "Pusher"):
        assert f"{component} ..." in out.stdout and f"{component} done (" in out.stdout, component
    assert re.search(r"^    step 10/10 \| loss \d", out.stdout, re.M)  # the Trainer's progress
    assert "Model blessed and pushed to" in out.stdout
    log = open(_log_path(out)).read()
    assert os.path.dirname(_log_path(out)) == str(run_dir / "logs")
    assert "FutureWarning" in log and "Component Trainer is running." in log  # the noise went here
    assert out.stdout.rstrip().splitlines()[-1].startswith("Report: ")  # the last line


def test_pushed_runs_report_page(pushed_run, tmp_path):
    run_dir, out = pushed_run
    path = _report_path(out)
    assert os.path.dirname(path) == str(run_dir / "reports")
    page = _check_page(path, tmp_path)
    assert "Model blessed and pushed: version" in page
    for component in ("SyntheticTokenExampleGen", "StatisticsGen", "DataValidationGate", "Trainer",
                      "Evaluator", "IntegrationValidator", "Pusher"):
        assert f"<title>{component}: COMPLETE</title>" in page, component  # a DAG node
    summary = json.load(open(next(run_dir.glob("pipeline_root/Trainer/model/*/training_summary.json"))))
    layers = sorted(summary["expert_load_per_layer"])
    assert layers and all(f'<figure data-layer="{layer}">' in page for layer in layers)
    assert 'alt="training curves"' in page and "token_loss" in page and "gradient_flow" in page
    lineage = page[page.index('<section id="lineage">'):]
    assert "PushedModel" in lineage and "Examples" in lineage
    # `deepseek-tfx report` writes the same run's page on demand.
    again = subprocess.run([sys.executable, "-m", "app.cli", "report", "--run-dir", str(run_dir),
                            "--out", str(tmp_path / "again.html")], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == str(tmp_path / "again.html"), again.stderr
    assert "Model blessed and pushed: version" in (tmp_path / "again.html").read_text()
    missing = subprocess.run([sys.executable, "-m", "app.cli", "report", "--run-dir", str(run_dir),
                              "--run-id", "no-such-run"], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert missing.returncode == 2 and "no pipeline run 'no-such-run'" in missing.stderr


def test_exit_status_is_this_runs_verdict_not_the_stores_newest(pushed_run, tmp_path):
    # Same run directory: the store already holds a blessed, pushed model,
    # and this run's verdict must not be taken from it.
    run_dir, _ = pushed_run
    out = _cli("--run-dir", str(run_dir), *TINY,
               "--thresholds", json.dumps({**LOOSE_GATE, "max_loss_gap_nats": 1e-6}))
    assert out.returncode == 3, out.stdout + out.stderr
    _assert_quiet(out)
    assert "Model NOT pushed." in out.stdout
    # Quality is TFMA's: the Evaluator refuses, naming the threshold.
    assert "Evaluator: NOT blessed" in out.stdout and "tfma token_loss" in out.stdout
    assert "Trainer done (cached)" in out.stdout
    # So does the refused run's page, in its verdict.
    page = _check_page(_report_path(out), tmp_path)
    verdict = page[page.index('<section id="verdict">'):page.index('<section id="dag">')]
    assert "Model NOT pushed" in verdict and "tfma token_loss:" in verdict and "&gt; upper bound" in verdict
    # The first settings again, after the refusal: the Trainer is reused, the
    # gate runs against the blessed baseline and this run pushes.
    # The same model is already served: nothing new is pushed, and the run says so.
    out = _cli("--run-dir", str(run_dir), *TINY, "--thresholds", json.dumps(LOOSE_GATE))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Trainer done (cached)" in out.stdout
    assert "Model unchanged: already served as version" in out.stdout and "nothing new pushed" in out.stdout
    assert len(os.listdir(run_dir / "serving")) == 1

    # Each run's record is found by its own pipeline-run id.
    from app.inspect_metadata import collect
    from app.run_report import run_outcome

    metadata = str(run_dir / "metadata.sqlite")
    runs = sorted(collect(metadata)["runs"], key=lambda r: r["created"])
    first, refused, last = (run_outcome(metadata, r["name"]) for r in runs)
    assert first.pushed and last.pushed and refused.pushed is None
    assert any(b.component == "Evaluator" and not b.blessed for b in refused.blessings)
    assert any(b.component == "IntegrationValidator" and b.blessed for b in refused.blessings)
    assert refused.states["Trainer"] == "CACHED"
    assert last.pushed["pushed_version"] == first.pushed["pushed_version"]
    assert last.pushed["already_pushed"] == 1 and "already_pushed" not in first.pushed


def test_corrupt_tfrecord_fails_with_the_file_named_and_no_traceback(tmp_path):
    data_dir = tmp_path / "data"
    _write_user_examples(str(data_dir), _good_rows(64), _good_rows(32, seed=1))
    corrupt = data_dir / "eval" / "data.tfrecord"
    raw = bytearray(corrupt.read_bytes())
    raw[200:210] = b"\xff" * 10
    corrupt.write_bytes(bytes(raw))
    out = _cli("--run-dir", str(tmp_path / "run"), *TINY, "--examples-dir", str(data_dir))
    assert out.returncode == 1, out.stdout + out.stderr
    _assert_quiet(out)
    assert "the run FAILED in ImportExampleGen" in out.stderr
    assert f"corrupt TFRecord file: {corrupt}: corrupted record" in out.stderr
    failure = out.stderr[out.stderr.index("the run FAILED"):]
    assert len(failure.splitlines()) <= 8, failure
    assert "Traceback" in open(_log_path(out)).read()


def test_bad_data_fails_in_the_gate_naming_the_anomaly(tmp_path):
    data_dir = tmp_path / "data"
    _write_user_examples(str(data_dir), _good_rows(64)[:-1] + [[70] * 16], _good_rows(32, seed=1))
    out = _cli("--run-dir", str(tmp_path / "run"), *TINY, "--examples-dir", str(data_dir))
    assert out.returncode == 1, out.stdout + out.stderr
    _assert_quiet(out)
    assert "the run FAILED in DataValidationGate" in out.stderr
    assert "[train] feature 'input_ids'" in out.stderr and "Out-of-range" in out.stderr
    assert "Trainer ..." not in out.stdout
    page = open(_report_path(out), encoding="utf-8").read()  # a failed run's page says why
    verdict = page[page.index('<section id="verdict">'):page.index('<section id="dag">')]
    assert "The run FAILED in DataValidationGate" in verdict and "Out-of-range" in verdict
    assert "<title>DataValidationGate: FAILED</title>" in page


def test_invalid_settings_exit_2_and_create_nothing(tmp_path):
    out = _cli("--run-dir", str(tmp_path / "run"), *TINY, "--precision", "fp16")
    assert out.returncode == 2
    assert "invalid settings: precision" in out.stderr
    assert not (tmp_path / "run").exists()
