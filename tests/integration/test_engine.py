"""The training engine (training/) in child processes with KERAS_BACKEND=jax
and 8 virtual CPU devices: the same training on 1 device, 8-way data
parallel, 2 x 4 and 1 x 8 (batch x expert) meshes and two processes with
the experts split between them; expert-parallel shardings; what crosses
devices in the compiled step (its HLO); DeepSeek-V3's once-per-step global
bias update under gradient accumulation; kill -9 and resume (with the
batches streamed on stdin, and onto another device count)."""

import json
import os
import signal
import socket

import numpy as np
import pytest

from model import get_preset
from training import launch

pytestmark = pytest.mark.integration

TINY = get_preset("tiny", n_routed_experts=8)  # 1 MoE layer; 8 experts for the 1 x 8 mesh
STEPS, BATCH, SEQ = 20, 8, 16
GAMMA = TINY.bias_update_speed
# Float tolerances between meshes: XLA reduces in a different order when the
# batch is split, so losses agree to ~1e-6 relative; the expert loads are
# integer counts and the biases sign steps, equal unless a routing decision
# sits on a float tie (none does on this seeded run).
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-4


def _tokens(path, micro_batches, seed=0):
    rng = np.random.default_rng(seed)
    np.save(path, rng.integers(0, TINY.vocab_size, (micro_batches, BATCH, SEQ)).astype(np.int32))
    return str(path)


def _spec(workdir, tokens, **engine):
    settings = {"batch_size": BATCH, "seq_len": SEQ, "train_steps": STEPS, "learning_rate": 3e-3,
                "warmup_steps": 5, "log_every": 5, "record_history": True}
    settings.update(engine)
    return {"model_config": TINY.to_dict(), "engine": settings, "tokens": tokens,
            "output_dir": str(workdir / "out"), "report_shardings": True,
            "report_collectives": True}


def _run(workdir, spec, devices=8, num_devices=None, env=None, batches=None):
    workdir.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, output_dir=str(workdir / "out"), num_devices=num_devices)
    lines = []
    result = launch.run_worker(spec, str(workdir / "spec.json"), launch.worker_env(devices, env),
                               log_fn=lines.append, batches=batches)
    with np.load(workdir / "out" / "weights.npz") as w:
        weights = {k: w[k] for k in w.files}
    return result, weights, lines


def _assert_same_training(a, b, tol=LOSS_RTOL):
    assert len(a["steps"]) == len(b["steps"]) > 0
    for sa, sb in zip(a["steps"], b["steps"]):
        assert sa["loss"] == pytest.approx(sb["loss"], rel=tol), sa["step"]
        np.testing.assert_array_equal(sa["load"], sb["load"], err_msg=f"step {sa['step']}")
        np.testing.assert_allclose(sa["bias"], sb["bias"], atol=1e-7, err_msg=f"step {sa['step']}")


def _assert_same_weights(a, b, atol=WEIGHT_ATOL):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-4, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    tokens = _tokens(root / "tokens.npy", STEPS)
    spec = _spec(root, tokens)
    # A cache of its own: the 1-device run compiles (and fills it) here.
    one = _run(root / "one", spec, num_devices=1, env={"DEEPSEEK_TFX_JAX_CACHE": str(root / "jax-cache")})
    dp = _run(root / "dp8", spec)
    ep = _run(root / "ep4", dict(spec, engine=dict(spec["engine"], expert_parallel=4)))
    ep8 = _run(root / "ep8", dict(spec, engine=dict(spec["engine"], expert_parallel=8)))
    return {"root": root, "tokens": tokens, "spec": spec, "one": one, "dp": dp, "ep": ep,
            "ep8": ep8}


def test_one_device_dp8_2x4_and_1x8_meshes_train_the_same(runs):
    one, dp, ep, ep8 = (runs[k][0] for k in ("one", "dp", "ep", "ep8"))
    assert (one["mesh"], dp["mesh"], ep["mesh"], ep8["mesh"]) == (
        {"batch": 1, "expert": 1}, {"batch": 8, "expert": 1}, {"batch": 2, "expert": 4},
        {"batch": 1, "expert": 8})
    for other in ("dp", "ep", "ep8"):
        _assert_same_training(one, runs[other][0])
        _assert_same_weights(runs["one"][1], runs[other][1])
    # Every step with an overflow (extra all-to-all rounds) is counted, nothing dropped.
    for run in (ep, ep8):
        assert run["dispatch"]["overflow_steps"] == sum(
            s["dispatch_overflow"] > 0 for s in run["steps"])
        assert all(e["dropped_fraction"] == 0 for e in run["expert_utilization_last_interval"]
                   .values())
    # The bias really moved, by one gamma-sized step per optimizer step.
    bias = np.array([s["bias"] for s in one["steps"]])  # [steps, layers, E]
    steps = np.abs(np.diff(bias, axis=0))
    assert np.abs(bias[-1]).max() > 0
    assert np.all(np.isclose(steps, 0, atol=1e-7) | np.isclose(steps, GAMMA, atol=1e-6))


def test_a_rerun_takes_the_compiled_step_from_the_persistent_cache(runs):
    first, weights, _ = runs["one"]
    cache = str(runs["root"] / "jax-cache")
    assert first["compilation_cache"]["dir"] == cache
    assert first["compilation_cache"]["hits"] == 0 and first["compilation_cache"]["misses"] >= 1
    assert any(name.startswith("jit_step") for name in os.listdir(cache))
    again, again_weights, _ = _run(runs["root"] / "one-again", runs["spec"], num_devices=1,
                                   env={"DEEPSEEK_TFX_JAX_CACHE": cache})
    assert again["compilation_cache"]["hits"] >= 1
    assert [s["loss"] for s in again["steps"]] == [s["loss"] for s in first["steps"]]
    _assert_same_weights(weights, again_weights, atol=0)
    off, _, _ = _run(runs["root"] / "one-off", dict(runs["spec"], engine=dict(runs["spec"]["engine"], train_steps=2)),
                     num_devices=1, env={"DEEPSEEK_TFX_JAX_CACHE": "off"})
    assert off["compilation_cache"] == {"dir": None, "hits": 0, "misses": 0}


def test_expert_parallel_shards_routed_experts_and_their_moments(runs):
    shardings = runs["ep"][0]["shardings"]
    experts = TINY.n_routed_experts
    routed = {k: v for k, v in shardings["model"].items()
              if len(v["shape"]) == 3 and v["shape"][0] == experts and "/mlp/" in k}
    assert len(routed) == 3 * len(runs["ep"][0]["expert_utilization_last_interval"])
    for name, s in routed.items():
        assert s["shard_shape"] == [experts // 4] + s["shape"][1:], name
    for name, s in shardings["model"].items():
        if name not in routed:
            assert s["replicated"], name
    for name in routed:  # AdamW's two moments of every routed weight
        moments = [s for k, s in shardings["optimizer"].items()
                   if k.replace("_", "/").endswith(name.replace("_", "/") + "/momentum")
                   or k.replace("_", "/").endswith(name.replace("_", "/") + "/velocity")]
        assert len(moments) == 2, name
        for s in moments:
            assert s["shard_shape"] == [experts // 4] + s["shape"][1:], name
    assert all(s["replicated"] for k, s in shardings["optimizer"].items()
               if "experts_" not in k or "shared" in k)


def test_accumulation_moves_each_bias_once_by_the_sign_of_the_global_load(tmp_path):
    # Micro-batch 0 of every step repeats one token (all its load on the same
    # experts), 1-3 are random: the per-micro-batch errors point the other
    # way from the error of the summed load for some experts.
    steps, accumulation = 3, 4
    tokens = np.random.default_rng(1).integers(
        0, TINY.vocab_size, (steps * accumulation, BATCH, SEQ)).astype(np.int32)
    tokens[::accumulation] = 3
    np.save(tmp_path / "skewed.npy", tokens)
    spec = _spec(tmp_path, str(tmp_path / "skewed.npy"), train_steps=steps,
                 gradient_accumulation=accumulation, log_every=1)
    result, _, _ = _run(tmp_path / "acc", spec, devices=2)
    assert result["mesh"] == {"batch": 2, "expert": 1}
    bias_before = np.zeros_like(np.asarray(result["steps"][0]["bias"]))
    discriminating = 0
    for s in result["steps"]:
        bias, load = np.asarray(s["bias"]), np.asarray(s["load"])
        micro = np.diff(np.concatenate([np.zeros_like(load)[None], np.asarray(s["micro_load"])]),
                        axis=0)  # [A, layers, E] load of each micro-batch
        np.testing.assert_allclose(micro.sum(axis=0), load)
        assert load.sum() == BATCH * SEQ * accumulation * TINY.num_experts_per_tok * len(load)
        expected = GAMMA * np.sign(load.mean(axis=-1, keepdims=True) - load)
        np.testing.assert_allclose(bias - bias_before, expected, atol=1e-6)
        per_micro = np.sign(micro.mean(axis=-1, keepdims=True) - micro).sum(axis=0)
        discriminating += int(np.sum(np.sign(per_micro) != np.sign(expected)))
        bias_before = bias
    # The constructed batch does tell the global sign from per-micro-batch signs.
    assert discriminating > 0


def _token_sized(dims):
    """A tensor over the global batch's tokens or (token, expert) assignments."""
    tokens = BATCH * SEQ  # no weight of the tiny model has a dimension of this size
    return any(d in (tokens, tokens * TINY.num_experts_per_tok) for d in dims)


@pytest.mark.parametrize("run,shards", [("dp", 1), ("ep", 4), ("ep8", 8)])
def test_compiled_step_keeps_tokens_local_and_expert_weights_in_their_shard(runs, run, shards):
    ops = runs[run][0]["collectives"]
    assert ops, "the step on 8 devices has collectives"
    kinds = {op["kind"] for op in ops}
    # Tokens and routing state are never gathered or reduced across devices.
    for op in ops:
        if op["kind"] in ("all-gather", "all-reduce", "reduce-scatter"):
            assert not any(_token_sized(d) for d in op["dims"]), op
    # Expert parallel: the assignments travel by all-to-all; data parallel: nothing does.
    assert ("all-to-all" in kinds) == (shards > 1), kinds
    if shards > 1:
        c = TINY
        expert_planes = {(c.hidden_size, c.moe_intermediate_size),
                         (c.moe_intermediate_size, c.hidden_size)}
        for op in ops:  # no full expert weight (or per-tile copies of it), no full gradient
            for d in op["dims"] if op["kind"] != "all-to-all" else ():  # those carry tokens
                if len(d) == 3 and tuple(d[1:]) in expert_planes:
                    assert d[0] == c.n_routed_experts // shards and op["kind"] == "all-reduce", op


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_the_experts_split_between_them_train_like_one(runs, tmp_path):
    spec = dict(runs["spec"], output_dir=str(tmp_path / "out"),
                engine=dict(runs["spec"]["engine"], expert_parallel=2))
    port = _free_port()
    procs = []
    for pid in range(2):
        # One CPU device per process: JAX 0.4.30's gloo collectives hang when
        # a process holds several (measured here), GPUs have no such limit.
        env = launch.worker_env(1, {"KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
                                    "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                                    "KERAS_DISTRIBUTION_PROCESS_ID": str(pid)})
        procs.append(launch.start_worker(spec, str(tmp_path / f"spec{pid}.json"), env))
    try:
        for p in procs:
            launch.wait_worker(p, log_fn=lambda line: None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    with open(tmp_path / "out" / "result.json") as f:
        result = json.load(f)
    assert result["processes"] == 2 and result["num_devices"] == 2
    assert result["mesh"] == {"batch": 1, "expert": 2}
    assert any(op["kind"] == "all-to-all" for op in result["collectives"])
    _assert_same_training(runs["one"][0], result)
    with np.load(tmp_path / "out" / "weights.npz") as w:
        _assert_same_weights(runs["one"][1], {k: w[k] for k in w.files})


def test_kill_9_then_resume_matches_and_resumes_onto_8_devices(runs, tmp_path):
    checkpoints = tmp_path / "ckpt"
    spec = dict(runs["spec"], engine=dict(runs["spec"]["engine"], checkpoint_dir=str(checkpoints),
                                          checkpoint_every=5, log_every=1))
    proc = launch.start_worker(dict(spec, output_dir=str(tmp_path / "killed")),
                               str(tmp_path / "spec.json"), launch.worker_env(1))
    for line in proc.stdout:
        if line.startswith("checkpoint step 10"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = sorted(int(n[5:-4]) for n in os.listdir(checkpoints) if n.endswith(".npz"))
    assert saved and max(saved) < STEPS and not [n for n in os.listdir(checkpoints) if ".tmp" in n]
    copy = tmp_path / "ckpt_copy"
    copy.mkdir()
    for name in os.listdir(checkpoints):
        (copy / name).write_bytes((checkpoints / name).read_bytes())

    # Resumed with the batches streamed on stdin (as the Trainer adapter
    # does): the engine skips the batches of the done steps.
    result, weights, lines = _run(tmp_path / "resumed", dict(spec, tokens="stdin"), devices=1,
                                  batches=iter(np.load(runs["tokens"])))
    assert result["start_step"] == max(saved) and any(l.startswith("resuming from step") for l in lines)
    _assert_same_weights(runs["one"][1], weights, atol=1e-6)
    # The remaining steps are the uninterrupted run's steps.
    _assert_same_training({"steps": runs["one"][0]["steps"][max(saved):]}, result, tol=1e-6)

    spec8 = dict(spec, engine=dict(spec["engine"], checkpoint_dir=str(copy)))
    result8, weights8, _ = _run(tmp_path / "resumed8", spec8, devices=8)
    assert result8["start_step"] == max(saved) and result8["num_devices"] == 8
    _assert_same_weights(runs["one"][1], weights8)


def test_pads_add_no_expert_load_and_the_bias_follows_the_real_tokens(tmp_path):
    steps = 3
    tokens = np.random.default_rng(2).integers(0, TINY.vocab_size, (steps, BATCH, SEQ))
    mask = np.ones_like(tokens)
    mask[:, ::2, :5] = 0  # left padding on every other row
    np.save(tmp_path / "tokens.npy", tokens.astype(np.int32))
    np.save(tmp_path / "mask.npy", mask.astype(np.int32))
    spec = dict(_spec(tmp_path, str(tmp_path / "tokens.npy"), train_steps=steps, log_every=1),
                padding_mask=str(tmp_path / "mask.npy"))
    result, _, _ = _run(tmp_path / "pads", spec, devices=2)
    before = np.zeros(TINY.n_routed_experts)
    for s, m in zip(result["steps"], mask):
        (load,), (bias,) = np.asarray(s["load"]), np.asarray(s["bias"])
        assert load.sum() == m.sum() * TINY.num_experts_per_tok
        np.testing.assert_allclose(bias - before, GAMMA * np.sign(load.mean() - load), atol=1e-6)
        before = bias
