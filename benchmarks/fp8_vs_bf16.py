"""Float8 training (Keras 3's `model.quantize("float8")`: Dense kernels and
activations quantize-dequantized with delayed scaling) against plain
mixed_bfloat16 training of the same small model on the same Markov data.

Under JAX both train with the engine's own step (`Engine.step_runner`:
AdamW + schedule + clipping + bias update) at the engine's precision settings
"bf16" and "float8" (float8 on "auto": float32 on CPU, mixed_bfloat16 on GPU).
Under TensorFlow both models are built under the mixed_bfloat16 policy and
the float8 one is then quantized, through common.TrainStep.
On a CPU float8 matmuls are emulated (quantize, dequantize, then a bf16/f32
matmul), so float8 is expected to be slower here; it is recorded as measured."""

from __future__ import annotations

import time
from typing import Any, Dict, List

import numpy as np

from . import common
from .configs import SIZES, fp8_config

LEARNING_RATE = 3e-3


def _next_token_loss(model, ids):
    from keras import ops

    from model.deepseek_v3 import sparse_ce

    logits = model(ids, training=True)
    return ops.mean(sparse_ce(logits[:, :-1], ids[:, 1:]))


def _float8_layers(model):
    out = []
    for layer in model._flatten_layers(include_self=False):
        policy = getattr(layer, "dtype_policy", None)
        if getattr(policy, "quantization_mode", None) == "float8":
            out.append(layer)
    return out


def _zero_scale_layers(model) -> List[str]:
    """float8 layers whose inputs/kernel scale is 0 after training: a layer
    never called with training=True gets a zero "gradient" for its scales,
    which Keras writes into them (overwrite_with_gradient)."""
    from keras import ops

    bad = []
    for layer in _float8_layers(model):
        for name in ("inputs_scale", "kernel_scale"):
            value = float(np.asarray(ops.convert_to_numpy(getattr(layer, name))).ravel()[0])
            if value == 0.0:
                bad.append(f"{layer.path}:{name}")
    return bad


def _train_engine(variant: str, config, data, batch: int, steps: int) -> Dict[str, Any]:
    """The engine's own step (training.step: AdamW + schedule + clipping +
    bias update) under the engine's precision setting of that name."""
    from training.engine import Engine
    from training.settings import TrainingSettings

    settings = TrainingSettings(batch_size=batch, seq_len=data.shape[1], train_steps=steps,
                                learning_rate=LEARNING_RATE, weight_decay=0.01, precision=variant)
    engine = Engine(config, settings, log_fn=lambda line: None)
    info: Dict[str, Any] = {"policy": engine.policy, "step": "training.engine"}
    if engine.float8:
        layers = _float8_layers(engine.model)
        info["float8_layers"] = len(layers)
        info["float8_kernel_params"] = int(sum(int(np.prod(l.kernel.shape)) for l in layers))
        info["trainable_params"] = int(sum(int(np.prod(v.shape)) for v in engine.model.trainable_variables
                                           if not getattr(v, "overwrite_with_gradient", False)))
    start = time.perf_counter()
    run, compile_s = engine.step_runner(data[:batch][None])
    losses, times = [], []
    for i in range(steps):
        if i:
            start = time.perf_counter()
        loss = float(np.asarray(run(data[i * batch:(i + 1) * batch][None])))
        times.append((time.perf_counter() - start) * 1e3)  # the first one with its compile
        losses.append(loss)
    run.sync()
    timed = times[1:] or times
    info.update(common.summarize(timed, first_call_ms=times[0]))
    info["step_ms"] = info["median_ms"]
    info["compile_ms"] = compile_s * 1e3
    info["loss"] = losses
    info["compilations"] = 1
    info["finite"] = bool(np.all(np.isfinite(losses)))
    if engine.float8:
        info["float8_layers_with_zero_scale"] = _zero_scale_layers(engine.model)
    return info


def _train(variant: str, config, data, batch: int, steps: int) -> Dict[str, Any]:
    import keras

    if keras.backend.backend() == "jax":
        return _train_engine(variant, config, data, batch, steps)

    from model import DeepSeekV3ForCausalLM

    previous = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("float32" if variant == "float32" else "mixed_bfloat16")
        keras.utils.set_random_seed(0)
        model = DeepSeekV3ForCausalLM(config)
        info: Dict[str, Any] = {"policy": keras.mixed_precision.global_policy().name}
        if variant == "float8":
            model.quantize("float8")
            layers = _float8_layers(model)
            info["float8_layers"] = len(layers)
            info["float8_kernel_params"] = int(sum(int(np.prod(l.kernel.shape)) for l in layers))
            info["trainable_params"] = int(sum(int(np.prod(v.shape)) for v in model.trainable_variables
                                               if not getattr(v, "overwrite_with_gradient", False)))
        step = common.TrainStep(model, keras.optimizers.AdamW(LEARNING_RATE, weight_decay=0.01),
                                _next_token_loss)
        losses, times = [], []
        for i in range(steps):
            ids = data[i * batch:(i + 1) * batch]
            start = time.perf_counter()
            loss = float(np.asarray(step(ids)))
            times.append((time.perf_counter() - start) * 1e3)
            losses.append(loss)
        step.sync_to_module()
        timed = times[1:] or times
        info.update(common.summarize(timed, first_call_ms=times[0]))
        info["step_ms"] = info["median_ms"]
        info["loss"] = losses
        info["compilations"] = step.compilations()
        info["finite"] = bool(np.all(np.isfinite(losses)))
        if variant == "float8":
            info["float8_layers_with_zero_scale"] = _zero_scale_layers(model)
        return info
    finally:
        keras.mixed_precision.set_global_policy(previous)


def run(mode: str, include_float32: bool = False) -> Dict[str, Any]:
    from data import DataSpec, generate, optimal_loss

    sizes = SIZES[mode]
    config = fp8_config(mode)
    spec = DataSpec("markov", vocab_size=config.vocab_size, seq_len=sizes.fp8_seq_len, seed=0)
    data = generate(spec, sizes.fp8_steps * sizes.fp8_batch)
    variants = ["bf16", "float8"] + (["float32"] if include_float32 else [])
    results = {v: _train(v, config, data, sizes.fp8_batch, sizes.fp8_steps) for v in variants}
    bf16, fp8 = results["bf16"], results["float8"]
    out = {
        **results,
        "float8_over_bf16_step_time": fp8["step_ms"] / bf16["step_ms"],
        "final_loss_difference": fp8["loss"][-1] - bf16["loss"][-1],
        "optimal_loss": float(optimal_loss(spec)),
        "note": ("CPU has no float8 matmul units: Keras emulates float8 by quantize-dequantize "
                 "around bf16/f32 matmuls, so float8 adds work here instead of saving it. Only "
                 "Dense layers are quantized (attention projections, dense and shared-expert "
                 "MLPs, LM head); routed-expert weights are raw einsum kernels and stay bf16."),
        "config": {"model": config.to_dict(), "data": spec.to_dict(), "batch": sizes.fp8_batch,
                   "steps": sizes.fp8_steps, "optimizer": f"AdamW({LEARNING_RATE}, wd=0.01)",
                   "base_policy": (
                       "the engine's precision settings (JAX): bf16 = mixed_bfloat16, float8 = "
                       "float8 on 'auto' (float32 on CPU, mixed_bfloat16 on GPU)"
                       if results["bf16"].get("step") == "training.engine" else
                       "mixed_bfloat16 for both; float8 = quantize('float8') after build")},
    }
    return out
