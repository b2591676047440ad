"""The run report page from gathered data (no pipeline run): a refusal by an
integration check is named in the verdict, beside its row in the checks
table; every picture is an inline PNG; the DAG places each component after
its inputs."""

import base64
import re

import pytest

pytest.importorskip("matplotlib")

from app.run_report import Blessing, RunOutcome  # noqa: E402
from report import page  # noqa: E402


def _records(steps=(5, 10, 15)):
    return [{"step": s, "loss": 4.0 - s / 10, "next_token_loss": 3.9 - s / 10, "perplexity": 40.0,
             "learning_rate": 1e-3, "tokens_per_second": 1000.0, "grad_norm": 1.0 / s,
             "experts": {"layers_1": {"load_fraction": [0.5, 0.5, 0.0, 0.0], "load_max_min_ratio": None,
                                      "load_cv": 1.0, "bias_spread": 0.01}}} for s in steps]


def _refused_by_a_check():
    failure = "expert_utilization: layers_1: max/min expert load inf > 4.0"
    components = [{"id": i, "component": c, "state": "COMPLETE", "created": i, "seconds": 1.5 * i,
                   "failure": []} for i, c in enumerate(["SyntheticTokenExampleGen", "Trainer",
                                                         "IntegrationValidator", "Pusher"])]
    return {
        "run_id": "run-1", "metadata_path": "m.sqlite", "created": 0, "components": components,
        "edges": [{"from": "SyntheticTokenExampleGen", "to": "Trainer", "artifact": "Examples"},
                  {"from": "Trainer", "to": "IntegrationValidator", "artifact": "Model"},
                  {"from": "IntegrationValidator", "to": "Pusher", "artifact": "InfraBlessing"}],
        "outcome": RunOutcome("run-1", {}, [Blessing("IntegrationValidator", "InfraBlessing", False, [failure])],
                              None),
        "verdict": "NOT PUSHED", "pushed": None, "failed": [],
        "summary": {"model_config": {"vocab_size": 64}, "training": {"log_every": 5}, "train_steps": 15},
        "records": _records(), "model_run_uri": "/x/model_run", "optimal_loss": 2.0, "evaluation": None,
        "checks": {"blessed": False, "failures": [failure], "checks": {
            "forward_pass": {"passed": True, "finite": True},
            "expert_utilization": {"passed": False, "reason": "layers_1: max/min expert load inf > 4.0"}}},
        "lineage": [{"artifact_id": 3, "type": "Model", "uri": "/x/model", "produced_by": "Trainer", "inputs": [1]},
                    {"artifact_id": 1, "type": "Examples", "uri": "/x/ex", "produced_by": "SyntheticTokenExampleGen",
                     "inputs": []}],
    }


def test_a_refusing_check_is_named_in_the_verdict_and_the_table():
    html = page.render(_refused_by_a_check())
    verdict = html[html.index('<section id="verdict">'):html.index('<section id="dag">')]
    assert "Model NOT pushed" in verdict and "IntegrationValidator" in verdict
    assert "expert_utilization: layers_1: max/min expert load inf &gt; 4.0" in verdict
    checks = html[html.index('<section id="checks">'):html.index('<section id="lineage">')]
    assert re.search(r"<td>expert_utilization</td><td class=\"fail\">FAILED</td>", checks)
    assert "candidate model (not pushed)" in html
    assert "http://" not in html and "https://" not in html


def test_pictures_are_inline_pngs_and_the_dag_follows_the_edges():
    html = page.render(_refused_by_a_check())
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', html)
    assert [alt for alt, _ in images] == ["training curves", "expert load heatmap layers_1"]
    for _, data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    xs = {name: float(x) for x, name in re.findall(
        r'<rect x="([\d.]+)"[^>]*/><text[^>]*>([A-Za-z]+)</text>', html)}
    assert xs["SyntheticTokenExampleGen"] < xs["Trainer"] < xs["IntegrationValidator"] < xs["Pusher"]


def test_a_failed_run_without_a_record_still_says_why(tmp_path):
    path = page.write_report(str(tmp_path / "none.sqlite"), str(tmp_path / "r.html"), run_id="r",
                             failure={"component": "DataValidationGate", "lines": ["ValueError: bad data"]})
    html = open(path).read()
    assert "The run FAILED in DataValidationGate" in html and "ValueError: bad data" in html
