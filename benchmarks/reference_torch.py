"""The PyTorch reference: Hugging Face transformers' DeepseekV3ForCausalLM
trained with AdamW on CPU, on the same dimensions, batch and sequence length
as our Keras model. Runs in its own Python (with torch + transformers), as a
subprocess of benchmarks.run_all:

    /path/to/python benchmarks/reference_torch.py --config-json '{...}' \\
        --batch 8 --seq-len 128 --steps 5 --warmup 2 --threads 2

With `--generate --save-dir DIR --new-tokens N` it times transformers'
greedy `generate` (its KV cache on) instead: a seeded random model, saved
to DIR with `save_pretrained` (safetensors) so our side loads the same
weights through `model.hf_checkpoint`, and batch x seq_len random prompts.

`--config-json` takes our DeepSeekV3Config as a dict (to_dict()); it is
mapped onto the HF config by `hf_config_kwargs`. Prints one line
`REFERENCE_RESULT {json}` with tokens/s. Imports neither Keras nor our model
package, so it needs nothing but torch and transformers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

RESULT_PREFIX = "REFERENCE_RESULT "

# Fields with the same name and meaning in both configs.
_SAME = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
    "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "rope_interleave", "initializer_range",
)


def hf_config_kwargs(ours: Dict[str, Any], rope_parameters_style: bool = True
                     ) -> Tuple[Dict[str, Any], List[str]]:
    """Maps our DeepSeekV3Config dict onto HF DeepseekV3Config keyword
    arguments. Returns (kwargs, differences): what the HF model cannot express
    and therefore runs differently. rope_parameters_style: transformers >= 5
    (`rope_parameters`) or 4.x (`rope_theta` + `rope_scaling`)."""
    kwargs = {key: ours[key] for key in _SAME if key in ours}
    kwargs.update(
        num_key_value_heads=ours["num_attention_heads"],  # MLA: every head has its own k/v
        hidden_act="silu",
        attention_dropout=0.0,
        use_cache=False,
        pad_token_id=None,
    )
    if ours.get("num_nextn_predict_layers"):
        kwargs["num_mtp_layers"] = ours["num_nextn_predict_layers"]
    scaling = ours.get("rope_scaling") or None
    theta = float(ours.get("rope_theta", 10000.0))
    if rope_parameters_style:
        rope = {"rope_type": "default", "rope_theta": theta}
        if scaling:
            rope = {**{k: v for k, v in scaling.items() if k != "type"},
                    "rope_type": scaling.get("rope_type", scaling.get("type")), "rope_theta": theta}
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_theta"] = theta
        kwargs["rope_scaling"] = dict(scaling) if scaling else None

    differences = []
    if ours.get("attention_type", "mla") != "mla":
        differences.append("attention_type=mha has no HF DeepseekV3 equivalent (HF runs MLA)")
    if ours.get("scoring_func", "sigmoid") != "sigmoid":
        differences.append("scoring_func=softmax: HF DeepseekV3 routes with sigmoid only")
    if ours.get("expert_capacity_factor") is not None:
        differences.append(
            f"ours drops routed assignments beyond capacity factor {ours['expert_capacity_factor']} "
            "in training; HF is dropless (loops over the experts hit)")
    if ours.get("bias_update_speed", 0) > 0:
        differences.append("ours updates the routing correction bias every training step; "
                           "HF keeps it fixed")
    if ours.get("seq_aux_loss_alpha", 0) > 0:
        differences.append("ours adds the sequence-wise balance loss; HF does not")
    if ours.get("num_nextn_predict_layers"):
        differences.append("MTP modules: ours trains them; HF's forward ignores them")
    return kwargs, differences


def _build_model(config: Dict[str, Any], experts_implementation: str, use_cache: bool):
    """-> (HF DeepseekV3ForCausalLM in float32, its config kwargs, differences)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    style = "rope_parameters" in inspect.signature(DeepseekV3Config.__init__).parameters
    kwargs, differences = hf_config_kwargs(config, rope_parameters_style=style)
    kwargs["use_cache"] = use_cache
    hf_config = DeepseekV3Config(**kwargs)
    if experts_implementation and experts_implementation != "default":
        # "eager" loops over the experts that received tokens (the classic HF
        # MoE); on CPU it is as fast as "grouped_mm" after the latter's long
        # warm-up and steadier, and "batched_mm" is far slower.
        model = DeepseekV3ForCausalLM._from_config(
            hf_config, experts_implementation=experts_implementation).float()
    else:
        model = DeepseekV3ForCausalLM(hf_config).float()
    return model, kwargs, differences


def _timed_steps(model, optimizer, batches, warmup: int) -> Tuple[List[float], List[float]]:
    times, losses = [], []
    for i, ids in enumerate(batches):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        elapsed = (time.perf_counter() - start) * 1e3
        losses.append(loss)
        if i >= warmup:
            times.append(elapsed)
    return times, losses


def run(config: Dict[str, Any], batch: int, seq_len: int, steps: int, warmup: int,
        threads: int, lr: float = 1e-3, seed: int = 0,
        experts_implementation: str = "eager") -> Dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, kwargs, differences = _build_model(config, experts_implementation, use_cache=False)
    hf_config = model.config
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, config["vocab_size"], (batch, seq_len), generator=generator)
               for _ in range(warmup + steps)]
    times, losses = _timed_steps(model, optimizer, batches, warmup)
    median = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    return {
        "tokens_per_s": batch * seq_len * 1e3 / median,
        "median_ms": median, "min_ms": min(times), "max_ms": max(times), "repeats": len(times),
        "warmup_steps": warmup, "losses": losses,
        "batch": batch, "seq_len": seq_len, "threads": torch.get_num_threads(),
        "parameters": params,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "attn_implementation": getattr(hf_config, "_attn_implementation", None),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "hf_config": {k: v for k, v in kwargs.items()},
        "differences": differences,
        "mode": "eager PyTorch (no torch.compile), float32, AdamW(lr, weight_decay=0.01)",
    }


def run_generate(config: Dict[str, Any], batch: int, prompt_len: int, new_tokens: int,
                 repeats: int, threads: int, save_dir: str, seed: int = 0,
                 experts_implementation: str = "eager") -> Dict[str, Any]:
    """Greedy transformers generate with its KV cache; new tokens per second
    (prefill included, as in our measurement)."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, _, differences = _build_model(config, experts_implementation, use_cache=True)
    model.eval()
    model.save_pretrained(save_dir, safe_serialization=True)
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, config["vocab_size"], (batch, prompt_len), generator=generator)
    settings = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=0, eos_token_id=None)
    times = []
    with torch.inference_mode():
        out = model.generate(prompts, **settings)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(prompts, **settings)
            times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    return {
        "tokens_per_s": batch * new_tokens * 1e3 / median,
        "median_ms": median, "min_ms": min(times), "max_ms": max(times), "repeats": len(times),
        "prompts": prompts.tolist(), "tokens": out[:, prompt_len:].tolist(),
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": sys.version.split()[0],
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "differences": differences,
        "mode": "eager PyTorch (no torch.compile), float32, greedy generate with DynamicCache",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-json", required=True,
                        help="our DeepSeekV3Config as JSON, or @FILE")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--generate", action="store_true",
                        help="time greedy generate instead of training")
    parser.add_argument("--save-dir", help="--generate: where to save the HF checkpoint")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--experts-implementation", default="eager",
                        help="HF experts implementation: eager | grouped_mm | batched_mm | default")
    args = parser.parse_args(argv)
    text = args.config_json
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    if args.generate:
        if not args.save_dir:
            parser.error("--generate needs --save-dir")
        result = run_generate(json.loads(text), args.batch, args.seq_len, args.new_tokens,
                              args.steps, args.threads, args.save_dir,
                              experts_implementation=args.experts_implementation)
    else:
        result = run(json.loads(text), args.batch, args.seq_len, args.steps, args.warmup,
                     args.threads, args.lr, experts_implementation=args.experts_implementation)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
