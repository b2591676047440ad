"""What the training loop reports: per-interval means (loss, perplexity,
learning rate, tokens/s, ETA, the worst expert max/min load ratio) as
console lines and history, the same interval records (with the gradient
norm and each MoE layer's expert load) to `metrics_fn` as dicts, the
per-step record (tests), the expert-balance summary, and the run's timings."""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from training.optim import warmup_cosine_lr


def expert_summary(load: np.ndarray, dropped: float, bias: np.ndarray) -> Dict[str, object]:
    """One MoE layer's balance over an interval (also the Trainer's eval summary)."""
    load = np.asarray(load, np.float64)
    total, mean = load.sum(), load.mean()
    return {
        "load_max_min_ratio": float(load.max() / load.min()) if load.min() > 0 else float("inf"),
        "load_cv": float(load.std() / mean) if mean > 0 else 0.0,
        "dropped_fraction": float(dropped / total) if total else 0.0,
        "bias_mean": float(np.mean(bias)),
        "bias_spread": float(np.max(bias) - np.min(bias)),
        "load_fraction": (load / total).tolist() if total else [0.0] * len(load),
        "assignments": float(total),  # routed (token, expert) pairs
    }


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainingMetrics:
    """Fed each step's host metrics (`record`); logs a line every `log_every`
    steps and at the last one, and keeps the history and the timings."""

    def __init__(self, settings, moe_names: List[str], start_step: int,
                 log_fn: Callable[[str], None],
                 metrics_fn: Optional[Callable[[dict], None]] = None):
        self.s, self.moe_names, self.start_step, self.log_fn = settings, moe_names, start_step, log_fn
        # Machine-readable progress: {"event": "start", ...} now, then
        # {"event": "interval", ...} with each console line.
        self.metrics_fn = metrics_fn or (lambda record: None)
        self.metrics_fn({"event": "start", "start_step": start_step, "train_steps": settings.train_steps,
                         "log_every": settings.log_every, "tokens_per_step": settings.tokens_per_step,
                         "moe_layers": list(moe_names)})
        self.history: List[dict] = []    # one entry per console line
        self.steps: List[dict] = []      # one per step (settings.record_history)
        self.last_experts: Dict[str, dict] = {}
        self.first_step_seconds: Optional[float] = None
        self.run_start = time.perf_counter()
        self._reset(start_step)

    def _reset(self, step: int) -> None:
        self._start, self._start_step = time.perf_counter(), step
        self._loss = self._ce = self._grad_norm = self._grad_norm_max = 0.0
        self._load = self._dropped = None

    def record(self, step: int, m: dict, step_seconds: float) -> None:
        """`m`: the step's metrics on the host, `step` its 0-based index."""
        s = self.s
        if self.first_step_seconds is None:
            self.first_step_seconds = step_seconds
        done, loss = step + 1, float(m["loss"])
        self._loss += loss
        self._ce += float(m["ce"])
        self._grad_norm_max = max(self._grad_norm_max, float(m["grad_norm"]))
        self._grad_norm += float(m["grad_norm"])
        load, dropped = np.asarray(m["load"], np.float64), np.asarray(m["dropped"], np.float64)
        self._load = load if self._load is None else self._load + load
        self._dropped = dropped if self._dropped is None else self._dropped + dropped
        if s.record_history:
            self.steps.append({"step": done, "loss": loss, "ce": float(m["ce"]),
                               "grad_norm": float(m["grad_norm"]),
                               "load": m["load"].tolist(), "bias": m["bias"].tolist(),
                               "micro_load": m["micro_load"].tolist() if "micro_load" in m else None})
        if done % s.log_every == 0 or done == s.train_steps:
            self._log(step, m["bias"])

    def _log(self, step: int, bias) -> None:
        s, done, now = self.s, step + 1, time.perf_counter()
        n = done - self._start_step
        loss_mean, ce_mean = self._loss / n, self._ce / n
        ppl = math.exp(min(ce_mean, 50.0))
        lr = warmup_cosine_lr(step, s.learning_rate, s.warmup_steps, s.train_steps)
        elapsed = now - self._start
        tps = n * s.tokens_per_step / elapsed if elapsed > 0 else float("nan")
        eta = (now - self.run_start) / max(done - self.start_step, 1) * (s.train_steps - done)
        self.last_experts = {name: expert_summary(self._load[i], self._dropped[i], bias[i])
                             for i, name in enumerate(self.moe_names)}
        balance = ""
        if self.last_experts:
            worst = max(e["load_max_min_ratio"] for e in self.last_experts.values())
            balance = f" | expert max/min {worst:.2f}"
        self.history.append({"step": done, "loss": loss_mean, "next_token_loss": ce_mean,
                             "perplexity": ppl, "learning_rate": lr, "tokens_per_second": tps,
                             "grad_norm": self._grad_norm / n, "max_grad_norm": self._grad_norm_max,
                             "experts": self.last_experts})
        self.metrics_fn({"event": "interval", "time": time.time(), **self.history[-1]})
        width = len(str(s.train_steps))
        self.log_fn(f"step {done:>{width}}/{s.train_steps} | loss {loss_mean:.4f} | ppl {ppl:.2f} | "
                    f"lr {lr:.2e} | {tps:,.0f} tok/s | ETA {format_duration(eta)}{balance}"
                    f" | grad norm max {self._grad_norm_max:.3g}")
        self._reset(done)

    def summary(self, end_step: int) -> dict:
        """The run's throughput and history (the engine's result keys)."""
        tokens = self.s.tokens_per_step
        train_seconds = time.perf_counter() - self.run_start
        trained = end_step - self.start_step
        steady = trained - 1
        steady_seconds = train_seconds - (self.first_step_seconds or 0.0)
        return {
            "tokens_trained": trained * tokens,
            "train_seconds": train_seconds,
            "train_finished_at": time.time(),  # Unix time, just after the last step
            "first_step_seconds": self.first_step_seconds,
            "tokens_per_second": trained * tokens / train_seconds if trained and train_seconds > 0 else None,
            "steady_tokens_per_second": (steady * tokens / steady_seconds
                                         if steady > 0 and steady_seconds > 0 else None),
            "steady_step_ms": 1000 * steady_seconds / steady if steady > 0 else None,
            "loss_history": self.history,
            "expert_utilization_last_interval": self.last_experts,
            "steps": self.steps,
        }
