"""The benchmark suite: `run_all --smoke` produces a complete, sane result
file, and `check_regressions` flags a slowdown but passes identical files.
Only structure and invariants are asserted here, never timings."""

import copy
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT)
    env.pop("DEEPSEEK_TFX_REFERENCE_PYTHON", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--smoke", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def test_smoke_header(smoke_result):
    r = smoke_result
    assert r["mode"] == "smoke" and r["backend"] == "jax"
    assert "benchmarks.run_all" in r["command"] and "--smoke" in r["command"]
    for key in ("cpu_model", "cores", "platform"):
        assert r["machine"][key]
    assert r["machine"]["cores"] >= 1
    for key in ("python", "keras", "backend_lib", "numpy"):
        assert r["versions"][key]
    assert {"sizes", "attention", "decode", "train", "fp8"} <= set(r["configs"])
    assert "errors" not in r, r.get("errors")


def test_smoke_mla_vs_mha(smoke_result):
    rows = smoke_result["mla_vs_mha"]
    assert [row["seq_len"] for row in rows] == smoke_result["configs"]["sizes"]["attn_seq_lens"]
    for row in rows:
        assert _positive(row["mla_ms"]) and _positive(row["mha_ms"])
        assert 0 < row["mla_cache_bytes"] < row["mha_cache_bytes"]
        assert row["mla_cache_bytes"] == row["mla_bytes_analytic"] == row["mla_bytes_model_analysis"]
        assert row["mha_cache_bytes"] == row["mha_bytes_analytic"]
        assert row["mla_bytes_equal_analytic"] is True
        assert row["mla_timing"]["repeats"] >= 1
        assert row["mla_timing"]["min_ms"] <= row["mla_timing"]["median_ms"]
    # Bytes grow linearly with the sequence length.
    assert rows[1]["mla_cache_bytes"] * rows[0]["seq_len"] == rows[0]["mla_cache_bytes"] * rows[1]["seq_len"]


def test_smoke_moe_scaling(smoke_result):
    rows = smoke_result["moe_scaling"]
    sizes = smoke_result["configs"]["sizes"]
    expected = {(e, k) for e in sizes["moe_experts"] for k in sizes["moe_top_k"] if k <= e}
    assert {(row["num_experts"], row["top_k"]) for row in rows} == expected
    for row in rows:
        assert _positive(row["step_ms"])
        assert row["compilations"] == 1  # no retracing between steps
    for ratio in smoke_result["moe_scaling_ratio"].values():
        assert _positive(ratio["ratio"]) and isinstance(ratio["met"], bool)


def test_smoke_decode(smoke_result):
    rows = smoke_result["decode"]
    assert [row["context"] for row in rows] == smoke_result["configs"]["sizes"]["decode_contexts"]
    for row in rows:
        assert _positive(row["naive_tokens_per_s"]) and _positive(row["absorbed_tokens_per_s"])
        assert row["absorbed_cache_bytes"] < row["naive_cache_bytes"]
        assert row["naive_cache_bytes"] == row["naive_cache_bytes_analytic"]
        assert row["absorbed_cache_bytes"] == row["absorbed_cache_bytes_analytic"]
        assert row["naive_compilations"] == 1 and row["absorbed_compilations"] == 1


def test_smoke_generate(smoke_result):
    g = smoke_result["generate"]
    sizes = smoke_result["configs"]["sizes"]
    assert g["context"] == sizes["decode_contexts"][0] and g["batch"] == sizes["decode_batch"]
    assert g["new_tokens"] >= 1
    assert _positive(g["ours_tokens_per_s"]) and _positive(g["eager_tokens_per_s"])
    assert g["reference_tokens_per_s"] is None and g["reference_skipped"]
    assert g["compiled_equals_eager"] is True
    assert g["compilations"] == [1, 1]  # repeated calls reuse each compiled function
    assert _positive(g["ours_decode_tokens_per_s"]) and _positive(g["ours_prefill_ms"])
    b = g["cache_bytes"]
    assert b["absorbed_float32"] == 2 * b["absorbed_bfloat16"] == 2 * b["absorbed_bfloat16_analytic"]
    assert b["naive_float32"] == 2 * b["naive_bfloat16"] > b["absorbed_float32"]
    assert g["bfloat16_cache_dtypes_after_10_steps"] == ["bfloat16"]
    assert any(t["target"].startswith("compiled generate >= 4 x eager") for t in smoke_result["targets"])


def test_smoke_fp8_vs_bf16(smoke_result):
    fp8 = smoke_result["fp8_vs_bf16"]
    steps = smoke_result["configs"]["sizes"]["fp8_steps"]
    for variant in ("bf16", "float8"):
        assert _positive(fp8[variant]["step_ms"])
        assert len(fp8[variant]["loss"]) == steps and fp8[variant]["finite"]
    assert fp8["float8"]["float8_layers"] > 0
    assert fp8["note"]


def test_smoke_train_vs_reference(smoke_result):
    train = smoke_result["train_vs_reference"]
    assert _positive(train["ours_tokens_per_s"])
    assert train["batch"] > 0 and train["seq_len"] > 0 and train["config"]["hidden_size"] > 0
    # Smoke mode skips the PyTorch reference, and says why.
    assert train["reference_tokens_per_s"] is None
    assert "smoke" in train["reference_skipped"]


def _check(old, new, tmp_path, *extra):
    paths = []
    for name, doc in (("old.json", old), ("new.json", new)):
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        paths.append(str(path))
    return subprocess.run([sys.executable, "-m", "benchmarks.check_regressions", *paths, *extra],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=120)


def test_check_regressions_passes_identical(smoke_result, tmp_path):
    proc = _check(smoke_result, smoke_result, tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "OK" in proc.stdout


def test_check_regressions_flags_2x_slowdown(smoke_result, tmp_path):
    slow = copy.deepcopy(smoke_result)
    for row in slow["moe_scaling"]:
        row["step_ms"] *= 2
    proc = _check(smoke_result, slow, tmp_path, "--tolerance", "0.15")
    assert proc.returncode == 1, proc.stdout
    assert "REGRESSION" in proc.stdout and "moe_scaling" in proc.stdout


def test_check_regressions_throughput_bytes_and_missing(smoke_result, tmp_path):
    new = copy.deepcopy(smoke_result)
    new["decode"][0]["absorbed_tokens_per_s"] /= 2
    proc = _check(smoke_result, new, tmp_path)
    assert proc.returncode == 1 and "absorbed_tokens_per_s" in proc.stdout

    new = copy.deepcopy(smoke_result)
    new["mla_vs_mha"][0]["mla_cache_bytes"] += 1
    proc = _check(smoke_result, new, tmp_path)
    assert proc.returncode == 1 and "mla_cache_bytes" in proc.stdout

    # A whole section gone is reported, not a crash and not a failure...
    new = copy.deepcopy(smoke_result)
    del new["decode"]
    proc = _check(smoke_result, new, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "missing" in proc.stdout
    # ... unless asked to fail on it.
    assert _check(smoke_result, new, tmp_path, "--fail-on-missing").returncode == 1
