"""End-to-end greedy generation, tokens per second (prefill included):

* ours: `model.generation.generate`, compiled (prefill + on-device decode
  loop, one compilation reused across calls);
* eager: the same generation with `compiled=False` (one eager
  call_with_cache per token, sampling on the host: the path generate used
  to take);
* reference: transformers' `DeepseekV3ForCausalLM.generate` (PyTorch CPU,
  greedy, its KV cache), on the same config and the same weights: the
  reference saves its seeded random model with `save_pretrained` and we load
  it with `model.hf_checkpoint.load_hf_checkpoint`. Without a reference
  Python our model keeps its own random weights.

Also the KV-cache bytes per dtype (float32 / bfloat16) for this batch and
context, and whether a bfloat16 cache is still bfloat16 after 10 decode steps.
"""

from __future__ import annotations

import tempfile
from typing import Any, Dict, Optional

import numpy as np

from . import common
from .configs import SIZES, decode_config
from .train_vs_reference import call_reference, find_reference_python

TARGET_OVER_EAGER = 4.0
TARGET_OVER_REFERENCE = 1.5
NEW_TOKENS = {"smoke": 4, "quick": 32, "full": 64}
REPEATS = {"smoke": 2, "quick": 3, "full": 5}


def _reference(python, config, batch, prompt_len, new_tokens, repeats, threads, save_dir):
    return call_reference(python, ["--generate", "--config-json", config.to_json(),
                                   "--batch", str(batch), "--seq-len", str(prompt_len),
                                   "--new-tokens", str(new_tokens), "--steps", str(repeats),
                                   "--save-dir", save_dir], threads)


def _cache_dtype_probe(model, steps=10):
    """A bfloat16 cache through a prefill and `steps` decode steps."""
    import keras

    caches = model.init_caches(1, 4 + steps, dtype="bfloat16")
    key_mask = np.zeros((1, 4 + steps), "int32")
    key_mask[:, :4] = 1
    _, caches = model.call_with_cache(np.arange(1, 5, dtype="int32")[None],
                                      np.arange(4, dtype="int32")[None], caches, 0, key_mask)
    for t in range(4, 4 + steps):
        key_mask[:, t] = 1
        _, caches = model.call_with_cache(np.array([[1]], "int32"), np.array([[t]], "int32"),
                                          caches, t, key_mask)
    return sorted({keras.backend.standardize_dtype(t.dtype) for c in caches for t in c})


def run(mode: str, reference_python: Optional[str] = None,
        skip_reference: Optional[str] = None) -> Dict[str, Any]:
    import keras

    from model import DeepSeekV3ForCausalLM, load_hf_checkpoint
    from model.analysis import kv_cache_bytes
    from model.generation import compiled_functions, generate

    sizes = SIZES[mode]
    config = decode_config(mode)
    batch, context = sizes.decode_batch, sizes.decode_contexts[0]
    new_tokens, repeats = NEW_TOKENS[mode], REPEATS[mode]
    prompt_len = context - new_tokens  # the last token attends `context` slots
    threads = common._CONFIGURED.get("threads") or common.available_cores()
    out: Dict[str, Any] = {"context": context, "batch": batch, "new_tokens": new_tokens,
                           "prompt_len": prompt_len, "threads": threads}

    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        reference: Dict[str, Any]
        if skip_reference:
            reference = {"skipped": skip_reference}
        else:
            python, notes = find_reference_python(reference_python)
            reference = ({"skipped": "no Python with torch + transformers: " + "; ".join(notes)}
                         if python is None else
                         _reference(python, config, batch, prompt_len, new_tokens, repeats,
                                    threads, tmp))
        keras.utils.set_random_seed(0)
        if "skipped" in reference:
            model = DeepSeekV3ForCausalLM(config)
            prompts = np.random.default_rng(0).integers(
                0, config.vocab_size, (batch, prompt_len)).tolist()
            out["weights"] = "random (ours)"
        else:
            model = load_hf_checkpoint(tmp)
            prompts = reference.pop("prompts")
            out["weights"] = "the reference's, through save_pretrained + load_hf_checkpoint"

    ours = common.time_calls(lambda: generate(model, prompts, new_tokens), repeats=repeats,
                             warmup=2)
    tokens = generate(model, prompts, new_tokens)
    eager = common.time_calls(lambda: generate(model, prompts, new_tokens, compiled=False),
                              repeats=max(1, repeats - 1), warmup=1)
    eager_tokens = generate(model, prompts, new_tokens, compiled=False)
    per_call = batch * new_tokens * 1e3
    out.update(
        ours_tokens_per_s=per_call / ours["median_ms"],
        eager_tokens_per_s=per_call / eager["median_ms"],
        reference_tokens_per_s=reference.get("tokens_per_s"),
        ours_timing=ours, eager_timing=eager,
        compiled_equals_eager=tokens == eager_tokens,
    )
    # Decode steps alone: a whole call minus a prefill-only call (1 new token).
    ours_prefill = common.time_calls(lambda: generate(model, prompts, 1), repeats=repeats,
                                     warmup=2)
    eager_prefill = common.time_calls(lambda: generate(model, prompts, 1, compiled=False),
                                      repeats=1, warmup=1)
    steps = batch * (new_tokens - 1) * 1e3
    if new_tokens > 1:
        out["ours_decode_tokens_per_s"] = steps / max(ours["median_ms"] - ours_prefill["median_ms"], 1e-3)
        out["eager_decode_tokens_per_s"] = steps / max(eager["median_ms"] - eager_prefill["median_ms"], 1e-3)
        out["ours_over_eager_decode_only"] = (out["ours_decode_tokens_per_s"]
                                              / out["eager_decode_tokens_per_s"])
    out["ours_prefill_ms"], out["eager_prefill_ms"] = ours_prefill["median_ms"], eager_prefill["median_ms"]
    out["ours_over_eager"] = out["ours_tokens_per_s"] / out["eager_tokens_per_s"]
    # One function per (batch, bucket, max_new_tokens): here 2 (32 and 1 new tokens), each traced once.
    out["compilations"] = [f.compilations() for f in compiled_functions(model).values()]
    out["target_over_eager"] = {"ratio": TARGET_OVER_EAGER,
                                "met": out["ours_over_eager"] >= TARGET_OVER_EAGER}
    if "skipped" in reference:
        out["reference_skipped"] = reference["skipped"]
    else:
        ref_tokens = reference.pop("tokens")
        out["ours_over_reference"] = out["ours_tokens_per_s"] / reference["tokens_per_s"]
        out["ours_over_reference_of_min_times"] = reference["min_ms"] / ours["min_ms"]
        out["target_over_reference"] = {"ratio": TARGET_OVER_REFERENCE,
                                        "met": out["ours_over_reference"] >= TARGET_OVER_REFERENCE}
        # Same weights, greedy: the float32 computations differ in rounding
        # only, so the tokens agree unless two logits nearly tie.
        same = [a == b for a, b in zip(tokens, ref_tokens)]
        out["sequences_equal_to_reference"] = f"{sum(same)}/{len(same)}"
    out["reference"] = reference

    cache_bytes = {}
    for dtype in ("float32", "bfloat16"):
        for cache_mode in ("absorbed", "naive"):
            caches = model.init_caches(batch, context, mode=cache_mode, dtype=dtype)
            cache_bytes[f"{cache_mode}_{dtype}"] = sum(common.nbytes(t) for c in caches for t in c)
    cache_bytes["absorbed_bfloat16_analytic"] = kv_cache_bytes(config, "mla_absorbed", batch,
                                                               context, 2)
    out["cache_bytes"] = cache_bytes
    out["bfloat16_cache_dtypes_after_10_steps"] = _cache_dtype_probe(model)
    out["config"] = {"model": config.to_dict(), "greedy": True,
                     "tokens_per_s": "batch x new_tokens / time of one whole generate call "
                                     "(prefill included), median over repeats"}
    return out
