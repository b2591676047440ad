"""The run report: one self-contained HTML page (inline CSS, images as
base64 PNG, the DAG as inline SVG; nothing fetched from the network) for one
pipeline run: the verdict and why, the DAG with each component's state and
wall time, the training curves, the expert load per MoE layer, TFMA's
metrics against the baseline and thresholds, the integration checks, and
the lineage from the Examples to the pushed (or refused) model.

    write_report(metadata_path, out, run_id=None, failure=None) -> out
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
from typing import Any, Dict, List, Optional

from report import plots

STATE_COLORS = {"COMPLETE": "#2e7d32", "CACHED": "#1565c0", "FAILED": "#c62828", "RUNNING": "#ef6c00",
                "NEW": "#757575", "CANCELED": "#757575"}

CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; padding-top: 12px; }
.meta { color: #666; font-size: 13px; }
.verdict { padding: 12px 16px; border-radius: 6px; font-size: 16px; margin: 16px 0; }
.verdict.PUSHED { background: #e8f5e9; border: 2px solid #2e7d32; }
.verdict.NOT-PUSHED { background: #fff3e0; border: 2px solid #ef6c00; }
.verdict.FAILED { background: #ffebee; border: 2px solid #c62828; }
.verdict ul { margin: 6px 0 0 0; } code, pre { font-size: 12px; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; white-space: pre-wrap; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #2e7d32; font-weight: bold; } .fail { color: #c62828; font-weight: bold; }
img { max-width: 100%; display: block; margin: 8px 0; }
.heatmaps { display: flex; flex-wrap: wrap; gap: 8px; } .heatmaps figure { margin: 0; }
.empty { color: #888; font-style: italic; }
"""

# Marks the page when the browser could not decode an image (the tests read it).
CHECK_IMAGES = """
addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken-images", String(broken.length));
  if (broken.length) {
    var note = document.createElement("p");
    note.className = "fail";
    note.textContent = broken.length + " picture(s) of this report could not be shown.";
    document.body.insertBefore(note, document.body.firstChild);
  }
});
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return esc(value)
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.{digits}f}"
    return esc(value)


def _img(fig, alt: str) -> str:
    data = base64.b64encode(plots.png(fig)).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _table(header: List[str], rows: List[List[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _td(value: Any, num: bool = False) -> str:
    return f'<td class="num">{_num(value)}</td>' if num else f"<td>{esc(value)}</td>"


# ------------------------------------------------------------------ sections
def _verdict(data: Dict[str, Any], failure: Optional[Dict[str, Any]]) -> str:
    verdict = data.get("verdict", "FAILED")
    lines: List[str] = []
    if verdict == "PUSHED":
        pushed = data["pushed"] or {}
        title = (f"Model blessed and pushed: version {esc(pushed.get('pushed_version', '?'))}"
                 f" to {esc(pushed.get('pushed_destination', '?'))}")
    elif verdict == "NOT PUSHED":
        title = "Model NOT pushed: refused by the gate"
        for b in data["outcome"].blessings:
            state = "blessed" if b.blessed else "NOT blessed"
            lines.append(f"<li><b>{esc(b.component)}</b>: {state}"
                         + ("<ul>" + "".join(f"<li>{esc(f)}</li>" for f in b.failures) + "</ul>"
                            if b.failures else "") + "</li>")
    else:
        failed = list(data.get("failed") or [])
        if failure and not any(f["component"] == failure.get("component") and f["lines"] for f in failed):
            failed = [failure] + [f for f in failed if f["component"] != failure.get("component")]
        where = ", ".join(esc(f["component"]) for f in failed if f.get("component"))
        title = "The run FAILED" + (f" in {where}" if where else "")
        for f in failed:
            lines.append(f"<li><b>{esc(f.get('component') or 'before any component')}</b>"
                         f"<pre>{esc(chr(10).join(f.get('lines') or ['(no message recorded)']))}</pre></li>")
    css = verdict.replace(" ", "-")
    body = f"<ul>{''.join(lines)}</ul>" if lines else ""
    return f'<section id="verdict"><div class="verdict {css}"><b>{title}</b>{body}</div></section>'


def _dag_svg(components: List[dict], edges: List[dict]) -> str:
    """Layered left-to-right: a component's column is its longest path from a source."""
    names = [c["component"] for c in components]
    column: Dict[str, int] = {}
    for name in names:  # components are in topological order
        column[name] = max([column.get(e["from"], 0) + 1 for e in edges if e["to"] == name
                            and e["from"] in column] or [0])
    rows: Dict[int, int] = {}
    place = {}
    for name in names:
        c = column[name]
        place[name] = (c, rows.get(c, 0))
        rows[c] = rows.get(c, 0) + 1
    w, h, dx, dy, pad = 200, 46, 234, 62, 10
    width = pad * 2 + dx * (max(column.values(), default=0)) + w
    height = pad * 2 + dy * (max(rows.values(), default=1) - 1) + h
    out = [f'<svg id="dag-svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="pipeline DAG">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/>'
           '</marker></defs>']

    def xy(name):
        c, r = place[name]
        return pad + c * dx, pad + r * dy

    for e in edges:
        if e["from"] not in place or e["to"] not in place:
            continue
        (x1, y1), (x2, y2) = xy(e["from"]), xy(e["to"])
        out.append(f'<line x1="{x1 + w}" y1="{y1 + h / 2}" x2="{x2}" y2="{y2 + h / 2}" stroke="#555" '
                   f'stroke-width="1.3" marker-end="url(#arrow)"><title>{esc(e["artifact"])}</title></line>')
    by_name = {c["component"]: c for c in components}
    for name in names:
        x, y = xy(name)
        c = by_name[name]
        color = STATE_COLORS.get(c["state"], "#757575")
        label = name if len(name) <= 24 else name[:23] + "\u2026"
        out.append(f'<g><title>{esc(name)}: {esc(c["state"])}</title>'
                   f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="#fff" stroke="{color}" '
                   f'stroke-width="2.5"/><text x="{x + w / 2}" y="{y + 19}" text-anchor="middle" '
                   f'font-size="11.5" font-weight="bold">{esc(label)}</text>'
                   f'<text x="{x + w / 2}" y="{y + 36}" text-anchor="middle" font-size="11" fill="{color}">'
                   f'{esc(c["state"])} \u00b7 {c["seconds"]:.1f} s</text></g>')
    out.append("</svg>")
    return "".join(out)


def _dag(data: Dict[str, Any]) -> str:
    components = data.get("components") or []
    if not components:
        return '<section id="dag"><h2>Pipeline</h2><p class="empty">No component ran.</p></section>'
    rows = [[_td(c["component"]), f'<td style="color:{STATE_COLORS.get(c["state"], "#757575")}">'
             f'{esc(c["state"])}</td>', f'<td class="num">{c["seconds"]:.1f} s</td>'] for c in components]
    return ('<section id="dag"><h2>Pipeline</h2>' + _dag_svg(components, data.get("edges") or [])
            + _table(["component", "state", "wall time"], rows) + "</section>")


def _training(data: Dict[str, Any]) -> str:
    records, summary = data.get("records") or [], data.get("summary") or {}
    parts = ['<section id="training"><h2>Training</h2>']
    if not records:
        parts.append('<p class="empty">No training record for this run.</p></section>')
        return "".join(parts)
    vocab = (summary.get("model_config") or {}).get("vocab_size")
    fig = plots.training_curves(records, uniform_loss=math.log(vocab) if vocab else None,
                                optimal_loss=data.get("optimal_loss"))
    parts.append(_img(fig, "training curves"))
    keys = [("train steps", "train_steps"), ("resumed from step", "start_step"),
            ("final train loss (nats/token)", "final_train_loss"), ("eval loss (nats/token)", "eval_loss"),
            ("eval perplexity", "eval_perplexity"), ("tokens trained", "tokens_trained"),
            ("train time (s)", "train_seconds"), ("tokens / s", "tokens_per_second"),
            ("parameters", "parameters"), ("devices", "num_devices"), ("mesh", "mesh"),
            ("precision", "precision")]
    rows = [[_td(label), _td(summary.get(key), num=isinstance(summary.get(key), (int, float)))]
            for label, key in keys if key in summary]
    if rows:
        parts.append(_table(["", "value"], rows))
    if data.get("model_run_uri"):
        parts.append(f'<p class="meta">TensorBoard: <code>tensorboard --logdir '
                     f'{esc(data["model_run_uri"])}</code></p>')
    parts.append("</section>")
    return "".join(parts)


def _experts(data: Dict[str, Any]) -> str:
    records = [r for r in data.get("records") or [] if r.get("experts")]
    parts = ['<section id="experts"><h2>Expert load per MoE layer</h2>']
    layers = plots.layers_of(records)
    if not layers:
        parts.append('<p class="empty">No expert load recorded.</p></section>')
        return "".join(parts)
    log_every = ((data.get("summary") or {}).get("training") or {}).get("log_every")
    parts.append('<div class="heatmaps">')
    for layer in layers:
        history = [r for r in records if layer in r["experts"] and r["experts"][layer].get("load_fraction")]
        if history:
            parts.append(f'<figure data-layer="{esc(layer)}">'
                         + _img(plots.expert_load_heatmap(layer, history, log_every, 5.6, 3.2),
                                f"expert load heatmap {layer}") + "</figure>")
    parts.append("</div></section>")
    return "".join(parts)


def _evaluation(data: Dict[str, Any]) -> str:
    ev = data.get("evaluation")
    parts = ['<section id="evaluation"><h2>Evaluation (TFMA, overall slice)</h2>']
    if not ev:
        parts.append('<p class="empty">The Evaluator did not run.</p></section>')
        return "".join(parts)
    verdict = {True: '<span class="pass">thresholds passed</span>',
               False: '<span class="fail">thresholds FAILED</span>', None: "no thresholds"}[ev["validated"]]
    parts.append(f"<p>{verdict}</p>")
    rows = []
    for name in sorted(ev["metrics"]):
        bounds = ev["thresholds"].get(name, {})
        limits = []
        if "upper_bound" in bounds:
            limits.append(f"&le; {_num(bounds['upper_bound'])}")
        if "lower_bound" in bounds:
            limits.append(f"&ge; {_num(bounds['lower_bound'])}")
        if "change_limit" in bounds:
            limits.append(f"change vs baseline within {_num(bounds['change_limit'])}")
        rows.append([_td(name), _td(ev["metrics"][name], True), _td(ev["baseline"].get(name), True),
                     _td(ev["change"].get(name), True), f"<td>{'; '.join(limits) or '&ndash;'}</td>"])
    parts.append(_table(["metric", "candidate", "baseline", "change", "threshold"], rows))
    if ev["failures"]:
        parts.append("<ul>" + "".join(f'<li class="fail">{esc(f)}</li>' for f in ev["failures"]) + "</ul>")
    if "token_loss" in ev["metrics"]:
        upper = {n: b["upper_bound"] for n, b in ev["thresholds"].items() if "upper_bound" in b}
        parts.append(_img(plots.metrics_chart(ev["metrics"], ev["baseline"], upper), "TFMA metrics chart"))
    parts.append("</section>")
    return "".join(parts)


def _detail(check: Dict[str, Any]) -> str:
    items = []
    for key, value in check.items():
        if key in ("passed", "reason"):
            continue
        shown = _num(value) if isinstance(value, (int, float)) or value is None else esc(value)
        items.append(f"{esc(key)}={shown}")
    return ", ".join(items)


def _checks(data: Dict[str, Any]) -> str:
    report = data.get("checks")
    parts = ['<section id="checks"><h2>Integration checks</h2>']
    if not report:
        parts.append('<p class="empty">The IntegrationValidator did not run.</p></section>')
        return "".join(parts)
    rows = []
    for name, check in report.get("checks", {}).items():
        ok = check.get("passed")
        rows.append([_td(name), f'<td class="{"pass" if ok else "fail"}">{"passed" if ok else "FAILED"}</td>',
                     f"<td>{esc(check.get('reason') or '')}</td>", f"<td><code>{_detail(check)}</code></td>"])
    parts.append(f"<p>{'<span class=pass>all passed</span>' if report.get('blessed') else '<span class=fail>NOT blessed</span>'}</p>")
    parts.append(_table(["check", "result", "reason", "details"], rows))
    parts.append("</section>")
    return "".join(parts)


def _lineage(data: Dict[str, Any]) -> str:
    steps = data.get("lineage") or []
    parts = ['<section id="lineage"><h2>Lineage</h2>']
    if not steps:
        parts.append('<p class="empty">No model to trace.</p></section>')
        return "".join(parts)
    what = "pushed model" if steps[0]["type"] == "PushedModel" else "candidate model (not pushed)"
    parts.append(f"<p>From the Examples to the {what}, as ML Metadata records it:</p>")
    rows = [[_td(s["type"]), _td(f"#{s['artifact_id']}"), _td(s["produced_by"] or "(imported)"),
             _td(", ".join(f"#{i}" for i in s["inputs"])), f"<td><code>{esc(s['uri'])}</code></td>"]
            for s in reversed(steps)]
    parts.append(_table(["artifact", "id", "produced by", "inputs", "uri"], rows))
    parts.append("</section>")
    return "".join(parts)


def render(data: Dict[str, Any], failure: Optional[Dict[str, Any]] = None) -> str:
    created = data.get("created")
    when = (datetime.datetime.fromtimestamp(created / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            if created else "")
    sections = [_verdict(data, failure), _dag(data), _training(data), _experts(data),
                _evaluation(data), _checks(data), _lineage(data)]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>deepseek-tfx run {esc(data.get('run_id', ''))}</title><style>{CSS}</style>"
            f"<script>{CHECK_IMAGES}</script></head><body>"
            f"<h1>deepseek-tfx run {esc(data.get('run_id', ''))}</h1>"
            f'<p class="meta">{esc(when)} &middot; ML Metadata: <code>{esc(data.get("metadata_path", ""))}</code></p>'
            + "".join(sections) + "</body></html>\n")


def default_path(run_dir: str, run_id: str) -> str:
    return os.path.join(run_dir, "reports", f"run-{run_id.replace(':', '')}.html")


def write_report(metadata_path: str, out: str, run_id: Optional[str] = None,
                 failure: Optional[Dict[str, Any]] = None) -> str:
    """Writes the page for `run_id` (default the newest run) to `out`
    (atomically) and returns its path. `failure` ({"component", "lines"})
    is the caller's account of a failure ML Metadata may not hold (a run
    that failed before any component ran has no record: its page says why)."""
    from report.gather import ReportError, gather

    try:
        data = gather(metadata_path, run_id)
    except ReportError:
        if failure is None:
            raise
        data = {"run_id": run_id or "", "metadata_path": metadata_path, "verdict": "FAILED", "failed": []}
    page = render(data, failure)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, out)
    return out
