"""The integration checks (`IntegrationChecks`, the seeds' IntegrationValidator;
the TFX component is `IntegrationValidator`), on a trained
Keras model and real eval data: what TensorFlow Model Analysis cannot see
(forward pass, gradient flow, expert balance, KV-cache memory, decode and
SavedModel parity). Model quality -- the token loss against uniform, the
data's optimum and the blessed baseline -- is TFMA's, in the Evaluator
(components/evaluation.py), with thresholds from the same dataclass here.

Each check returns {"passed": bool, "reason": str, ...measurements}. The
checks pass a model only when every enabled check passes. Thresholds live in
one validated dataclass so a bad threshold fails before any work is done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Dict, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class GateThresholds:
    # Expert balance on the eval split after training, per MoE layer, as the
    # aux-loss-free balancing paper measures it (Wang et al. 2024, "MaxVio"):
    # max expert load / mean load - 1, with the router bias as trained; it
    # must also be no worse than with the bias zeroed (the bias balances).
    max_expert_load_violation: float = 1.5
    # Optional stricter limits (None = not checked): max/min routed
    # assignments (unbounded once one expert is idle, as real text can make
    # one in a short run) and the coefficient of variation of the load.
    max_expert_load_ratio: Optional[float] = None
    max_expert_load_cv: Optional[float] = None
    # Fraction of trainable variables with a finite, non-zero gradient.
    min_gradient_coverage: float = 0.95
    # Absorbed-MLA cache bytes / standard MHA cache bytes.
    max_cache_ratio_vs_mha: float = 0.5
    # Cache bytes must grow linearly with sequence length (ratio per doubling / 2).
    max_cache_scaling: float = 1.05
    # Relative max |difference| / max |logit| allowed for the parity checks.
    max_decode_parity_error: float = 1e-3
    max_savedmodel_parity_error: float = 1e-3
    # Quality (TFMA's value and change thresholds on token_loss, nats per token):
    # at most this far above the data's optimal loss, when it is known;
    max_loss_gap_nats: float = 0.35
    # at least this far below uniform guessing, log(vocab_size);
    min_gain_over_uniform_nats: float = 0.1
    # at most this much above the last blessed model's.
    max_regression_nats: float = 0.02
    eval_batches: int = 8
    batch_size: int = 32

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in _OPTIONAL_THRESHOLDS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"GateThresholds.{field.name}: must be a positive finite number, "
                                 f"got {value!r}")
        if self.min_gradient_coverage > 1:
            raise ValueError("GateThresholds.min_gradient_coverage: must be <= 1")

    @classmethod
    def from_json(cls, text: Optional[str]) -> "GateThresholds":
        values = json.loads(text) if text else {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"GateThresholds: unknown thresholds {unknown}; known: {sorted(known)}")
        return cls(**values)


_OPTIONAL_THRESHOLDS = ("max_expert_load_ratio", "max_expert_load_cv")
#: MaxVio the trained bias may add over the unbiased router before the check
#: calls it unbalancing: the bias steps by gamma per training batch, so on a
#: short run it can sit a step away from where the eval tokens want it.
_BIAS_TOLERANCE = 0.05


def load_violation(load) -> float:
    """MaxVio of one layer's expert load: max / mean - 1 (0 = perfectly even)."""
    load = np.asarray(load, np.float64)
    return float(load.max() / load.mean() - 1) if load.mean() > 0 else 0.0


def _rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# The one eval-loss definition (Trainer, gate, benchmarks).
from model.evaluation import eval_loss  # noqa: E402,F401


class IntegrationChecks:
    def __init__(self, model, eval_tokens: np.ndarray, thresholds: GateThresholds):
        if eval_tokens.ndim != 2 or len(eval_tokens) == 0:
            raise ValueError("IntegrationChecks: eval_tokens must be a non-empty [N, L] array")
        self.model = model
        self.tokens = eval_tokens.astype(np.int32)
        self.t = thresholds
        self._forward = None

    def _logits(self, batch) -> np.ndarray:
        """model(batch, training=False) as NumPy; under TensorFlow one traced
        graph (the export's `logits_fn`) for every inference call of the
        checks (~20 eager calls of the model took ~10 s, the trace ~3 s). The
        routers' load counters update inside it as in an eager call."""
        import keras

        if keras.backend.backend() != "tensorflow":
            return np.asarray(self.model(batch, training=False))
        if self._forward is None:
            from components.export import logits_fn

            self._forward = logits_fn(self.model, self.tokens.shape[1])
        return self._forward(batch).numpy()

    # ---------------------------------------------------------------- checks
    def forward_pass(self) -> Dict[str, Any]:
        batch = self.tokens[: min(len(self.tokens), 4)]
        logits = self._logits(batch)
        expected = (batch.shape[0], batch.shape[1], self.model.config.vocab_size)
        finite = bool(np.isfinite(logits).all())
        ok = logits.shape == expected and finite
        return {"passed": ok, "shape": list(logits.shape), "expected_shape": list(expected),
                "finite": finite,
                "reason": "" if ok else f"logits shape {logits.shape} (want {expected}), finite={finite}"}

    def gradient_flow(self) -> Dict[str, Any]:
        import tensorflow as tf

        from model.losses import NextTokenLoss

        batch = self.tokens[: min(len(self.tokens), self.t.batch_size)]
        variables = self.model.trainable_variables
        # A training-mode call moves the routers' balance biases and counters:
        # restore them so later checks see the model exactly as trained.
        state = [(v, np.asarray(v)) for v in self.model.non_trainable_variables]
        with tf.GradientTape() as tape:
            logits = self.model(batch, training=True)
            loss = NextTokenLoss()(batch, logits)
            if self.model.losses:
                loss = loss + tf.add_n(self.model.losses)
        grads = tape.gradient(loss, variables)
        for v, value in state:
            v.assign(value)
        dead = []
        for variable, grad in zip(variables, grads):
            g = None if grad is None else np.asarray(tf.convert_to_tensor(grad))
            if g is None or not np.isfinite(g).all() or not np.any(g):
                dead.append(variable.path)
        coverage = 1 - len(dead) / len(variables)
        ok = coverage >= self.t.min_gradient_coverage
        return {"passed": ok, "coverage": coverage, "variables": len(variables),
                "without_gradient": dead[:20],
                "reason": "" if ok else f"gradient coverage {coverage:.3f} < {self.t.min_gradient_coverage}"}

    def _eval_load(self) -> Dict[str, Any]:
        self.model.reset_expert_counts()
        n = min(len(self.tokens), self.t.eval_batches * self.t.batch_size)
        for start in range(0, n, self.t.batch_size):
            self._logits(self.tokens[start:start + self.t.batch_size])
        stats = self.model.get_expert_utilization()
        self.model.reset_expert_counts()
        return stats

    def expert_utilization(self) -> Dict[str, Any]:
        """The load of each routed expert over the eval tokens, with the
        router bias as trained and again with it zeroed (the bias is
        restored): MaxVio within its threshold, and no worse than without
        the bias, since balancing the load is what the bias is for."""
        trained = self._eval_load()
        biases = [moe.gate.e_score_correction_bias for moe in self.model.moe_layers()]
        values = [np.asarray(b) for b in biases]
        try:
            for b in biases:
                b.assign(np.zeros(b.shape, "float32"))
            unbiased = self._eval_load()
        finally:
            for b, value in zip(biases, values):
                b.assign(value)
        layers = {}
        problems = []
        for name, stats in trained.items():
            vio, vio_unbiased = load_violation(stats["load"]), load_violation(unbiased[name]["load"])
            layers[name] = {"max_violation": vio, "max_violation_without_bias": vio_unbiased,
                            **{k: stats[k] for k in ("max_min_ratio", "cv", "fraction", "bias")}}
            if vio > self.t.max_expert_load_violation:
                problems.append(f"{name} load MaxVio {vio:.2f} > {self.t.max_expert_load_violation}")
            if vio > vio_unbiased + _BIAS_TOLERANCE:
                problems.append(f"{name} the router bias unbalances the load (MaxVio {vio:.2f} with it, "
                                f"{vio_unbiased:.2f} without)")
            if self.t.max_expert_load_ratio is not None and stats["max_min_ratio"] > self.t.max_expert_load_ratio:
                problems.append(f"{name} max/min load {stats['max_min_ratio']:.2f} > "
                                f"{self.t.max_expert_load_ratio}")
            if self.t.max_expert_load_cv is not None and stats["cv"] > self.t.max_expert_load_cv:
                problems.append(f"{name} load cv {stats['cv']:.2f} > {self.t.max_expert_load_cv}")
        return {"passed": not problems, "layers": layers,
                "max_violation": max((v["max_violation"] for v in layers.values()), default=0.0),
                "reason": "; ".join(problems)}

    def memory(self, seq_lens=(64, 128, 256, 512)) -> Dict[str, Any]:
        from model.analysis import kv_cache_bytes
        from model.attention import MultiHeadAttention

        config = self.model.config
        mha_layer = MultiHeadAttention(config.replace(attention_type="mha"))
        rows = []
        for seq_len in seq_lens:
            absorbed = self.model.init_caches(1, seq_len, mode="absorbed")
            naive = self.model.init_caches(1, seq_len, mode="naive")
            size = lambda caches: int(sum(np.asarray(t).nbytes for cache in caches for t in cache))
            mha = size([mha_layer.init_cache(1, seq_len)] * config.num_hidden_layers)
            rows.append({"seq_len": seq_len, "mla_absorbed_bytes": size(absorbed),
                         "mla_naive_bytes": size(naive), "mha_bytes": mha,
                         "analytic_absorbed_bytes": kv_cache_bytes(config, "mla_absorbed", 1, seq_len, 4)})
        ratio = max(r["mla_absorbed_bytes"] / r["mha_bytes"] for r in rows)
        scaling = max((b["mla_absorbed_bytes"] / a["mla_absorbed_bytes"]) / (b["seq_len"] / a["seq_len"])
                      for a, b in zip(rows, rows[1:]))
        analytic = all(r["mla_absorbed_bytes"] == r["analytic_absorbed_bytes"] for r in rows)
        problems = []
        if ratio > self.t.max_cache_ratio_vs_mha:
            problems.append(f"absorbed cache is {ratio:.2%} of MHA's (max {self.t.max_cache_ratio_vs_mha:.0%})")
        if scaling > self.t.max_cache_scaling:
            problems.append(f"cache grows super-linearly ({scaling:.2f}x per unit length ratio)")
        if not analytic:
            problems.append("cache bytes differ from (kv_lora_rank + rope_dim) x layers x tokens")
        return {"passed": not problems, "rows": rows, "ratio_vs_mha": ratio,
                "scaling_efficiency": scaling, "matches_analytic": analytic, "reason": "; ".join(problems)}

    def decode_parity(self, decode_steps: int = 8) -> Dict[str, Any]:
        """A prefill into the cache, then the last `decode_steps` positions one
        token at a time (each an eager call: 8 steps instead of all but 8
        made the mini's check 19 s -> ~3 s), against the full forward."""
        batch = self.tokens[:2]
        length = batch.shape[1]
        prefix = max(1, length - decode_steps)
        full = self._logits(batch)
        errors = {}
        for mode in ("absorbed", "naive"):
            caches = self.model.init_caches(len(batch), length, mode=mode)
            key_mask = np.ones((len(batch), length), "int32")
            positions = np.broadcast_to(np.arange(length, dtype="int32"), batch.shape)
            logits, caches = self.model.call_with_cache(batch[:, :prefix], positions[:, :prefix], caches, 0, key_mask)
            steps = [np.asarray(logits)]
            for t in range(prefix, length):
                logits, caches = self.model.call_with_cache(batch[:, t:t + 1], positions[:, t:t + 1],
                                                            caches, t, key_mask)
                steps.append(np.asarray(logits))
            errors[mode] = _rel_error(np.concatenate(steps, axis=1), full)
        worst = max(errors.values())
        ok = worst <= self.t.max_decode_parity_error
        return {"passed": ok, "relative_error": errors,
                "reason": "" if ok else f"incremental decoding differs from the full forward by {worst:.2e}"}

    def savedmodel_parity(self, serving_dir: str) -> Dict[str, Any]:
        import tensorflow as tf

        from data.tfrecord import serialize_sequences

        batch = self.tokens[:4]
        loaded = tf.saved_model.load(serving_dir)
        serving = loaded.signatures["serving_default"]
        outputs = serving(examples=tf.constant(serialize_sequences(batch)))
        reference = self._logits(batch)
        error = _rel_error(outputs["logits"].numpy(), reference)
        problems = []
        if error > self.t.max_savedmodel_parity_error:
            problems.append(f"SavedModel logits differ from Keras by {error:.2e}")
        generate_equal = None
        if "generate" in loaded.signatures:
            # Greedy generation from prompts of different lengths: the
            # signature must give model.generation.generate's tokens (its
            # eager path: 4 tokens eagerly cost a fraction of tracing the
            # compiled loop, and greedy tokens are the same on both).
            from model.generation import generate, left_pad

            prompts = [batch[0, :6].tolist(), batch[-1, :3].tolist()]
            ids, mask = left_pad(prompts)
            out = loaded.signatures["generate"](
                token_ids=tf.constant(ids), padding_mask=tf.constant(mask),
                max_new_tokens=tf.constant(4), temperature=tf.constant(0.0), top_k=tf.constant(0),
                top_p=tf.constant(1.0), eos_id=tf.constant(-1), seed=tf.constant(0))
            expected = generate(self.model, prompts, 4, compiled=False)
            generate_equal = out["tokens"].numpy().tolist() == expected
            if not generate_equal:
                problems.append("the SavedModel's generate signature differs from "
                                "model.generation.generate (greedy)")
        ok = not problems
        return {"passed": ok, "relative_error": error, "signatures": sorted(loaded.signatures.keys()),
                "generate_equal": generate_equal, "reason": "; ".join(problems)}

    # ------------------------------------------------------------------- all
    def run(self, serving_dir: Optional[str] = None) -> Dict[str, Any]:
        checks = {}
        steps = [("forward_pass", self.forward_pass), ("expert_utilization", self.expert_utilization),
                 ("memory", self.memory), ("decode_parity", self.decode_parity)]
        if serving_dir:
            steps.append(("savedmodel_parity", lambda: self.savedmodel_parity(serving_dir)))
        steps.append(("gradient_flow", self.gradient_flow))
        for name, fn in steps:
            started = time.perf_counter()
            try:
                checks[name] = fn()
            except Exception as e:  # a crashing check fails the gate, with the error
                checks[name] = {"passed": False, "reason": f"{type(e).__name__}: {e}"}
            checks[name]["seconds"] = round(time.perf_counter() - started, 3)
        failures = [f"{name}: {c['reason']}" for name, c in checks.items() if not c["passed"]]
        return {"blessed": not failures, "failures": failures, "checks": checks}


def to_markdown(report: Dict[str, Any]) -> str:
    lines = ["# Model validation report", "",
             f"**Verdict: {'BLESSED' if report['blessed'] else 'NOT BLESSED'}**", ""]
    if report["failures"]:
        lines += ["Failures:", ""] + [f"- {f}" for f in report["failures"]] + [""]
    lines += ["| check | passed | seconds | detail |", "|---|---|---:|---|"]
    for name, check in report["checks"].items():
        detail = check.get("reason") or ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in check.items() if k not in ("passed", "reason", "seconds") and not isinstance(v, (list, dict)))
        seconds = f"{check['seconds']:.1f}" if "seconds" in check else ""
        lines.append(f"| {name} | {'yes' if check['passed'] else 'NO'} | {seconds} | {detail} |")
    return "\n".join(lines) + "\n"
