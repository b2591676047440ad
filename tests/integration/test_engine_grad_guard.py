"""A finite loss with non-finite gradients must not become the "last good
checkpoint": the engine checks the step's gradient norm (also in its
metrics) before anything of that step is saved."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from training import launch

pytestmark = pytest.mark.integration

# Runs in a JAX child. Fault injection: the loss is the real one, but its
# gradient is NaN for a batch made only of token 0 (the 4th step's).
SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from model import get_preset
    from training import engine as E
    from training import step as S
    from training.settings import TrainingSettings

    real_ce = S.next_token_ce

    @jax.custom_vjp
    def poison(x, flag):
        return x

    def fwd(x, flag):
        return x, flag

    def bwd(flag, g):
        return jnp.where(flag > 0, jnp.nan, 1.0).astype(g.dtype) * g, jnp.zeros_like(flag)

    poison.defvjp(fwd, bwd)

    def ce(logits, ids, mask=None):
        return real_ce(poison(logits, jnp.all(ids == 0).astype(jnp.float32)), ids, mask)

    S.next_token_ce = ce  # looked up when the step is traced
    ckpt = sys.argv[1]
    settings = TrainingSettings(batch_size=4, seq_len=8, train_steps=6, checkpoint_dir=ckpt,
                                checkpoint_every=1, log_every=1, record_history=True)
    tokens = np.random.default_rng(0).integers(1, 64, (6, 4, 8)).astype(np.int32)
    tokens[3] = 0
    lines = []
    engine = E.Engine(get_preset("tiny"), settings, devices=jax.devices()[:1], log_fn=lines.append)
    try:
        engine.train(tokens, None)
        error = None
    except E.TrainingDiverged as e:
        error = str(e)
    print(json.dumps({"error": error, "lines": lines}))
""")


def test_non_finite_gradients_stop_training_before_they_are_saved(tmp_path):
    import numpy as np

    ckpt = tmp_path / "ckpt"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt)], capture_output=True, text=True,
                         env=launch.worker_env(), cwd=launch.ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] is not None, result["lines"]
    assert result["error"].startswith("training diverged: the gradient norm is nan (loss ")
    assert "at step 4" in result["error"] and "last good checkpoint is step 3" in result["error"]
    saved = sorted(int(n[5:-4]) for n in os.listdir(ckpt) if n.endswith(".npz"))
    assert max(saved) == 3
    with np.load(ckpt / "ckpt-3.npz") as data:
        for name in data.files:
            if data[name].dtype.kind == "f":
                assert np.isfinite(data[name]).all(), name
    # The norm is a step metric: finite and positive for the good steps.
    logged = [line for line in result["lines"] if line.startswith("step ")]
    norms = [float(line.rsplit("grad norm max ", 1)[1]) for line in logged]
    assert len(norms) == 3 and all(0 < n < 1e3 for n in norms), logged
