"""The pictures of a training run, drawn with matplotlib (Agg, no display):
the training curves, the expert load of one MoE layer as an experts x steps
heatmap, the balance statistics, and TFMA's metrics against the baseline.
Each function returns a Figure; `png` / `rgb` turn it into bytes for the
report page or pixels for a TensorBoard image summary. Inputs are the
engine's interval records (`training.engine`: "step", "loss", ...,
"experts": {layer: expert_summary})."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np


def _figure(width: float, height: float, layout: Optional[str] = "constrained"):
    # The object API, not pyplot: no global figure registry, safe in a
    # writer thread, no display backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def png(fig, dpi: int = 100) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def rgb(fig) -> np.ndarray:
    """[height, width, 3] uint8 pixels of the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def step_edges(steps: Sequence[int], log_every: Optional[int] = None) -> np.ndarray:
    """Column edges for intervals ending at `steps`: interval i covers
    (steps[i-1], steps[i]]; the first starts log_every before its end."""
    steps = np.asarray(steps, np.float64)
    first = steps[0] - (log_every or (steps[1] - steps[0] if len(steps) > 1 else steps[0]))
    return np.concatenate([[max(first, 0.0)], steps])


def relative_load(records: Sequence[Mapping], layer: str) -> np.ndarray:
    """[experts, intervals]: each expert's share of the layer's routed
    assignments over an interval, times the number of experts (1 = the
    balanced share, 0 = an expert that got nothing)."""
    columns = []
    for r in records:
        fractions = np.asarray(r["experts"][layer]["load_fraction"], np.float64)
        columns.append(fractions * len(fractions))
    return np.stack(columns, axis=1)


def expert_load_heatmap(layer: str, records: Sequence[Mapping], log_every: Optional[int] = None,
                        width: float = 6.4, height: float = 3.6):
    """Experts x optimizer steps, colored by load / mean load on a scale
    centred at 1 (white): blue under-used (dark blue: no tokens), red over-used."""
    from matplotlib.colors import TwoSlopeNorm

    load = relative_load(records, layer)
    steps = [r["step"] for r in records]
    # Fixed margins: the constrained layout costs more than the drawing (this
    # is drawn at every log interval for TensorBoard).
    fig = _figure(width, height, layout=None)
    fig.subplots_adjust(left=0.1, right=0.9, bottom=0.14, top=0.9)
    ax = fig.add_subplot()
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, float(load.max())))
    mesh = ax.pcolormesh(step_edges(steps, log_every), np.arange(load.shape[0] + 1) - 0.5, load,
                         cmap="RdBu_r", norm=norm, shading="flat")
    ax.set_xlabel("optimizer step (end of log interval)")
    ax.set_ylabel("routed expert")
    if load.shape[0] <= 16:
        ax.set_yticks(range(load.shape[0]))
    ax.set_title(f"{layer}: expert load per log interval")
    fig.colorbar(mesh, ax=ax, label="load / mean load (1 = balanced)", fraction=0.05, pad=0.02)
    return fig


def _series(records: Sequence[Mapping], key: str):
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(records: Sequence[Mapping], uniform_loss: Optional[float] = None,
                    optimal_loss: Optional[float] = None):
    """Loss (nats/token), perplexity, learning rate, throughput and gradient
    norm against the optimizer step, one panel each."""
    fig = _figure(11.0, 6.0)
    axes = fig.subplots(2, 3).ravel()
    ax = axes[0]
    for key, label in (("loss", "loss (with auxiliary losses)"), ("next_token_loss", "next-token loss")):
        x, y = _series(records, key)
        ax.plot(x, y, marker="o", markersize=3, label=label)
    if uniform_loss is not None:
        ax.axhline(uniform_loss, color="grey", linestyle=":", label="uniform guess")
    if optimal_loss is not None:
        ax.axhline(optimal_loss, color="green", linestyle="--", label="data optimum")
    ax.set(title="training loss", xlabel="optimizer step", ylabel="nats / token")
    last_step = max((r["step"] for r in records), default=1)
    ax.legend(fontsize=7)
    panels = (("perplexity", "perplexity", "exp(next-token loss)", False),
              ("learning_rate", "learning rate", "learning rate", False),
              ("tokens_per_second", "throughput", "tokens / s", False),
              ("grad_norm", "gradient norm (before clipping)", "global L2 norm", True))
    for ax, (key, title, unit, log) in zip(axes[1:], panels):
        x, y = _series(records, key)
        ax.plot(x, y, marker="o", markersize=3)
        ax.set(title=title, xlabel="optimizer step", ylabel=unit)
        ax.set_xlim(0, last_step * 1.05)
        if not y:
            _not_recorded(ax)
        elif log and min(y) > 0:
            ax.set_yscale("log")
    ax = axes[5]
    layers = sorted(records[-1].get("experts") or {}) if records else []
    for layer in layers:
        x = [r["step"] for r in records if layer in (r.get("experts") or {})]
        y = [r["experts"][layer]["load_max_min_ratio"] for r in records if layer in (r.get("experts") or {})]
        ax.plot(x, [v if v is not None else np.nan for v in y], marker="o", markersize=3, label=layer)
    ax.set(title="expert balance", xlabel="optimizer step", ylabel="max / min expert load")
    ax.set_xlim(0, last_step * 1.05)
    axes[0].set_xlim(0, last_step * 1.05)
    if layers:
        ax.legend(fontsize=7)
    else:
        _not_recorded(ax)
    return fig


def _not_recorded(ax) -> None:
    ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")


def metrics_chart(metrics: Mapping[str, float], baseline: Mapping[str, float],
                  upper_bounds: Optional[Mapping[str, float]] = None,
                  names: Sequence[str] = ("token_loss",)):
    """Candidate vs baseline bars per metric, with the value threshold's upper bound."""
    upper_bounds = upper_bounds or {}
    names = [n for n in names if n in metrics]
    fig = _figure(1.8 + 1.6 * max(len(names), 1), 3.0)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x - 0.2, [metrics[n] for n in names], 0.4, label="candidate")
    if any(n in baseline for n in names):
        ax.bar(x + 0.2, [baseline.get(n, np.nan) for n in names], 0.4, label="baseline")
    for i, n in enumerate(names):
        if n in upper_bounds:
            ax.hlines(upper_bounds[n], i - 0.45, i + 0.45, colors="red", linestyles="--",
                      label="upper bound" if i == 0 else None)
    ax.set_xticks(x, names)
    ax.set(title="TFMA, overall slice", ylabel="nats / token")
    ax.legend(fontsize=7)
    return fig


def layers_of(records: Sequence[Mapping]) -> List[str]:
    seen: Dict[str, None] = {}
    for r in records:
        for layer in r.get("experts") or {}:
            seen.setdefault(layer, None)
    return list(seen)
