"""Where the training step's time goes: each part of the model timed on its
own (jitted forward + backward on the shapes it sees inside the step), the
optimizer update, the loop's host work, and the engine's whole step.

    KERAS_BACKEND=jax .venv-engine/bin/python -m benchmarks.profile_step \
        --config mini --batch 32 --seq-len 64 --out benchmarks/results/profile_mini.json

Parts: attention (every layer's MLA, its projections included), routed
experts (every MoE layer minus its shared experts), shared/dense MLP (the
shared experts and the dense layers' SwiGLU), norms (2 per layer + the
final one), embeddings + head, loss (next-token cross-entropy), optimizer
(AdamW + clipping on every trainable variable), host (per step: slicing the
batch, putting it on the device, fetching the metrics). The parts run
separately, so XLA cannot fuse across them: their sum is an upper bound of
the step's compute, and "step - sum" (negative when fusion wins) says how
much the whole-step graph gains or loses against them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable, Dict

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")

PARTS = ("attention", "routed_experts", "shared_dense_mlp", "norms", "embeddings_head", "loss",
         "optimizer", "host")


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile
    jax.block_until_ready(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append((time.perf_counter() - start) * 1e3)
    return float(np.median(samples))


def _fwd_bwd_ms(layer, call: Callable, inputs, repeats: int) -> float:
    """Forward + backward of `call(layer, *inputs)` w.r.t. the layer's
    trainable variables and its float inputs (a fixed random cotangent)."""
    import jax
    import jax.numpy as jnp

    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]
    floats = [i for i, x in enumerate(inputs) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]

    def loss(tv, float_inputs):
        args = list(inputs)
        for i, x in zip(floats, float_inputs):
            args[i] = x
        mapping = list(zip(layer.trainable_variables, tv)) + list(zip(layer.non_trainable_variables,
                                                                       ntv))
        import keras

        with keras.StatelessScope(state_mapping=mapping):
            out = call(layer, *args)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape)))

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    float_inputs = [inputs[i] for i in floats]
    return _median_ms(lambda: step(tv, float_inputs), repeats)


def profile(config, batch: int, seq_len: int, repeats: int = 5) -> Dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import keras

    from model.deepseek_v3 import DeepSeekV3ForCausalLM, causal_mask, sparse_ce
    from training.parallel import batch_sharding, global_array
    from training.settings import TrainingSettings
    from training.step import training_mla_mode

    keras.utils.set_random_seed(0)
    model = DeepSeekV3ForCausalLM(config)
    rng = np.random.default_rng(0)
    c = config
    x = jnp.asarray(rng.normal(size=(batch, seq_len, c.hidden_size)).astype("float32"))
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype="int32")[None], (batch, seq_len))
    mask = causal_mask(seq_len, seq_len, 0, None)
    ids = rng.integers(0, c.vocab_size, (batch, seq_len)).astype("int32")
    parts = dict.fromkeys(PARTS, 0.0)

    mla_modes = {"naive": 0.0, "absorbed": 0.0}
    train_mode = training_mla_mode(c, float8=False)  # the engine's form
    for layer in model.decoder_layers:
        for mode in mla_modes if c.attention_type == "mla" else ():
            mla_modes[mode] += _fwd_bwd_ms(
                layer.self_attn, lambda l, x: l(x, positions, mask, mode=mode)[0], [x], repeats)
        parts["attention"] += _fwd_bwd_ms(
            layer.self_attn, lambda l, x: l(x, positions, mask, mode=train_mode)[0],
            [x], repeats)
        parts["norms"] += 2 * _fwd_bwd_ms(layer.input_layernorm, lambda l, x: l(x), [x], repeats)
        if layer.is_moe:
            moe_ms = _fwd_bwd_ms(layer.mlp, lambda l, x: l(x, training=True), [x], repeats)
            shared_ms = (_fwd_bwd_ms(layer.mlp.shared_experts, lambda l, x: l(x), [x], repeats)
                         if layer.mlp.shared_experts is not None else 0.0)
            parts["routed_experts"] += moe_ms - shared_ms
            parts["shared_dense_mlp"] += shared_ms
        else:
            parts["shared_dense_mlp"] += _fwd_bwd_ms(layer.mlp, lambda l, x: l(x), [x], repeats)
    parts["norms"] += _fwd_bwd_ms(model.norm, lambda l, x: l(x), [x], repeats)

    # (The model's other variables get zero gradients here: a small overcount.)
    parts["embeddings_head"] = _fwd_bwd_ms(
        model, lambda m, x: m.logits_from_hidden(x + m.embed_tokens(ids)), [x], repeats)

    logits = jnp.asarray(rng.normal(size=(batch, seq_len, c.vocab_size)).astype("float32"))
    ce = jax.jit(jax.grad(lambda z: jnp.mean(sparse_ce(z[:, :-1], ids[:, 1:]))))
    parts["loss"] = _median_ms(lambda: ce(logits), repeats)

    # The engine: its optimizer alone, its host work, its whole step.
    from training.engine import Engine

    settings = TrainingSettings(batch_size=batch, seq_len=seq_len, train_steps=repeats + 3)
    engine = Engine(config, settings, log_fn=lambda line: None)
    optimizer = engine.optimizer
    tv = [v.value for v in engine.model.trainable_variables]
    ov = [v.value for v in optimizer.variables]
    grads = [jnp.full_like(t, 1e-3) for t in tv]
    apply = jax.jit(lambda ov, g, tv: optimizer.stateless_apply(ov, g, tv))
    parts["optimizer"] = _median_ms(lambda: apply(ov, grads, tv), repeats)

    tokens = rng.integers(0, c.vocab_size, (repeats + 3, batch, seq_len)).astype("int32")
    sharding = batch_sharding(engine.distribution, 3)
    metrics = {"loss": jnp.float32(1.0), "load": jnp.zeros((2, 8))}

    def host():
        arr = global_array(np.asarray(tokens[1:2], np.int32), sharding)
        jax.device_get(metrics)
        return arr

    parts["host"] = _median_ms(host, repeats)
    run, compile_s = engine.step_runner(tokens[:1])
    step_ms = _median_ms(run, repeats)
    total = sum(parts.values())
    return {"config": c.to_dict(), "batch": batch, "seq_len": seq_len, "repeats": repeats,
            "parts_ms": parts, "sum_of_parts_ms": total, "step_ms": step_ms,
            "step_compile_s": compile_s, "attention_ms_by_mla_mode": mla_modes,
            "fraction_of_parts": {k: v / total for k, v in parts.items()},
            "jax": jax.__version__, "keras": keras.__version__,
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def _table(result: Dict[str, Any]) -> str:
    lines = ["| part | ms | share |", "| --- | ---: | ---: |"]
    for name in PARTS:
        lines.append(f"| {name} | {result['parts_ms'][name]:.1f} | "
                     f"{100 * result['fraction_of_parts'][name]:.0f}% |")
    lines.append(f"| sum of parts | {result['sum_of_parts_ms']:.1f} | |")
    lines.append(f"| engine step | {result['step_ms']:.1f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from benchmarks.configs import profile_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mini", help="a preset name or 'train_vs_reference'")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    config, batch, seq_len = profile_config(args.config)
    load_before = [round(x, 2) for x in os.getloadavg()]
    result = profile(config, args.batch or batch, args.seq_len or seq_len, args.repeats)
    result["loadavg_before"] = load_before
    result["name"] = args.config
    print(_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
