"""``moewatch report RUN_DIR_OR_JSONL``: a self-contained offline HTML report, PNGs, or a terminal summary.

The input is the JSONL log (one window report per line), or a run directory holding ``windows.jsonl``
(``moewatch-runs/<run>/``). Lines are read as plain JSON so that fields newer than this module (per-metric
noise floors, ``projected_collapse_step``, thresholds written into the line) are rendered when present and
ignored when not.

The HTML file has no external reference at all: the figures are SVG generated here, the style and the one
small script are inline, and a Content-Security-Policy ``default-src 'none'`` forbids the page any network
request. The script only marks the page as rendered (``data-moewatch-rendered``) and records script errors
into the page, which the tests read from headless Chromium.

Per layer it shows: the per-expert load over time as a heatmap (load / fair share, 0 = dark, 1 = fair,
>= 2 saturated), the four health metrics over time on their healthy / warning / collapsed bands (and the
noise floor where the line carries one), and a timeline of the layer's state with its state changes and
early warnings. A summary table opens the page. ``--png DIR`` draws the same figures with matplotlib (the
``report`` extra); ``--text`` prints the summary for a terminal.
"""

from __future__ import annotations

import argparse
import functools
import html
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydantic-settings loads only when a report is built, not for `moewatch --help`
    from moewatch.config import Thresholds

__all__ = ["LayerSeries", "RunData", "load_run", "register", "render_html", "render_png", "render_text"]

log = logging.getLogger(__name__)

STATE_COLOR = {"healthy": "#2e9e44", "warning": "#e0a800", "collapsed": "#d62728", "insufficient_data": "#9e9e9e"}
BAND_COLOR = {"healthy": "#e3f4e6", "warning": "#fdf3d1", "collapsed": "#fadcdc"}
def _severity(state: str) -> int:
    from moewatch.report import STATE_VALUES  # here, not at the top: `moewatch --help` loads this module

    return {s.value: n for s, n in STATE_VALUES.items()}.get(state, -1)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    warn: str  # Thresholds field names
    collapse: str
    higher_is_worse: bool = True


_LABELS = {"load_cov": "load CV", "dead_ratio": "dead ratio", "top2_excess": "top-2 excess", "norm_entropy": "norm. entropy"}


@functools.cache
def thresholded_metrics() -> tuple[Metric, ...]:
    """The thresholded metrics, from :data:`moewatch.health.BOUNDS` (imported on first use)."""
    from moewatch.health import BOUNDS

    return tuple(Metric(b.metric, _LABELS[b.metric], b.warning_field, b.collapsed_field, b.higher_is_worse) for b in BOUNDS)


@dataclass
class LayerSeries:
    """One layer's values over the run's windows (``None`` where a window lacks the value)."""

    index: int
    module: str
    num_experts: int
    steps: list[int] = field(default_factory=list)  # window end steps
    states: list[str] = field(default_factory=list)
    share_WE: list[list[float]] = field(default_factory=list)  # load / fair share per window and expert
    values: dict[str, list[float | None]] = field(default_factory=dict)
    noise: dict[str, list[float | None]] = field(default_factory=dict)
    projected: list[int | None] = field(default_factory=list)
    dead_ids: list[list[int]] = field(default_factory=list)
    reasons: list[list[str]] = field(default_factory=list)

    def changes(self) -> list[tuple[int, str, str]]:
        """(step, from, to) at every state change."""
        out = []
        for i in range(1, len(self.states)):
            if self.states[i] != self.states[i - 1]:
                out.append((self.steps[i], self.states[i - 1], self.states[i]))
        return out

    def first(self, state: str) -> int | None:
        return next((s for s, st in zip(self.steps, self.states, strict=True) if st == state), None)


@dataclass
class RunData:
    source: Path
    run: str
    windows: int
    step_first: int
    step_last: int
    tokens: int
    thresholds: Thresholds
    layers: list[LayerSeries]
    run_states: list[str]


def _noise_of(layer: dict[str, Any], key: str) -> float | None:
    for name in ("noise_floor", "noise_floors"):
        floors = layer.get(name)
        if isinstance(floors, dict):
            value = floors.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                return float(value)
            if isinstance(value, dict):  # e.g. {"value": ..., "threshold": ...}
                inner = value.get("value", value.get("floor"))
                return float(inner) if isinstance(inner, int | float) else None
    flat = layer.get(f"{key}_noise_floor")
    return float(flat) if isinstance(flat, int | float) else None


def _jsonl_path(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory; pass a run directory (moewatch-runs/<run>/) or its windows.jsonl")
    if path.is_dir():
        candidate = path / "windows.jsonl"
        if candidate.is_file():
            return candidate
        found = sorted(path.glob("*.jsonl"))
        if len(found) == 1:
            return found[0]
        raise ValueError(
            f"{path} holds no windows.jsonl ({len(found)} other .jsonl files); pass the JSONL log itself"
        )
    return path


def load_run(path: str | Path) -> RunData:
    """Read a JSONL log (or a run directory) into per-layer series. Raises ``ValueError`` on bad input."""
    src = _jsonl_path(Path(path))
    lines = []
    with src.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{src}:{n} is not JSON ({exc.msg}); is this a moewatch JSONL log?") from None
            if not isinstance(obj, dict) or "layers" not in obj or "step_end" not in obj:
                raise ValueError(f"{src}:{n} is not a moewatch window report (no 'layers'/'step_end')")
            lines.append(obj)
    if not lines:
        raise ValueError(f"{src} holds no window reports yet; run training (or moewatch demo) first")
    if len({line.get("run") for line in lines}) > 1:
        last_run = lines[-1].get("run")
        log.warning("%s holds several runs; reporting the last one, %r", src, last_run)
        lines = [line for line in lines if line.get("run") == last_run]
    from moewatch.config import Thresholds

    raw_t = lines[-1].get("thresholds")
    thresholds = Thresholds(**{k: v for k, v in raw_t.items() if k in Thresholds.model_fields}) if isinstance(
        raw_t, dict
    ) else Thresholds()
    layers: dict[int, LayerSeries] = {}
    for obj in lines:
        for lay in obj["layers"]:
            s = layers.get(lay["index"])
            if s is None:
                s = layers[lay["index"]] = LayerSeries(lay["index"], lay.get("module", ""), lay["num_experts"])
            s.steps.append(int(obj["step_end"]))
            s.states.append(str(lay.get("state", "insufficient_data")))
            fair = float(lay.get("fair_share") or 0.0)
            s.share_WE.append([(v / fair) if fair > 0 else 0.0 for v in lay.get("loads", [])])
            for m in thresholded_metrics():
                v = lay.get(m.key)
                s.values.setdefault(m.key, []).append(float(v) if isinstance(v, int | float) else None)
                s.noise.setdefault(m.key, []).append(_noise_of(lay, m.key))
            p = lay.get("projected_collapse_step")
            s.projected.append(int(p) if isinstance(p, int | float) else None)
            s.dead_ids.append(list(lay.get("dead_expert_ids", [])))
            s.reasons.append(list(lay.get("reasons", [])))
    return RunData(
        source=src,
        run=str(lines[-1].get("run", "")),
        windows=len(lines),
        step_first=int(lines[0].get("step_start", 0)),
        step_last=int(lines[-1]["step_end"]),
        tokens=sum(int(obj.get("tokens", 0)) for obj in lines),
        thresholds=thresholds,
        layers=[layers[i] for i in sorted(layers)],
        run_states=[str(obj.get("state", "insufficient_data")) for obj in lines],
    )


# --- summary (shared by HTML and text) ---------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def summary_rows(run: RunData) -> list[dict[str, str]]:
    rows = []
    for s in run.layers:
        cov = [v for v in s.values["load_cov"] if v is not None]
        ent = [v for v in s.values["norm_entropy"] if v is not None]
        warn, coll = s.first("warning"), s.first("collapsed")
        proj = next((p for p in reversed(s.projected) if p is not None), None)
        rows.append(
            {
                "layer": str(s.index),
                "module": s.module,
                "final state": s.states[-1],
                "first warning": f"step {warn}" if warn is not None else "never",
                "first collapsed": f"step {coll}" if coll is not None else "never",
                "max load CV": _fmt(max(cov) if cov else None),
                "min entropy": _fmt(min(ent) if ent else None),
                "dead at end": ",".join(map(str, s.dead_ids[-1])) or "-",
                "projected collapse": f"step {proj}" if proj is not None else "-",
                "state changes": str(len(s.changes())),
            }
        )
    return rows


# --- terminal -----------------------------------------------------------------------------------------

_SPARK = " ▁▂▃▄▅▆▇█"


def _spark(values: Sequence[float | None], width: int = 40) -> str:
    if not values:
        return ""
    step = max(1, math.ceil(len(values) / width))
    picked = [values[i] for i in range(0, len(values), step)]
    real = [v for v in picked if v is not None]
    hi = max(real) if real else 0.0
    lo = min(real) if real else 0.0
    span = (hi - lo) or 1.0
    return "".join(" " if v is None else _SPARK[1 + round((v - lo) / span * 7)] for v in picked)


def render_text(run: RunData) -> str:
    worst = max(run.run_states, key=_severity)
    out = [
        f"moewatch report: run {run.run!r}, {run.windows} windows, steps {run.step_first}-{run.step_last}, "
        f"{run.tokens} tokens; final state {run.run_states[-1]}, worst {worst}",
        f"source: {run.source}",
        "",
    ]
    rows = summary_rows(run)
    cols = [c for c in rows[0] if c != "module"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    out.append("  ".join(c.ljust(widths[c]) for c in cols))
    out.append("  ".join("-" * widths[c] for c in cols))
    out.extend("  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows)
    out.append("")
    for s in run.layers:
        out.append(f"layer {s.index} {s.module}")
        out.append(f"  load CV  {_spark(s.values['load_cov'])}")
        out.append(f"  entropy  {_spark(s.values['norm_entropy'])}")
        for step, a, b in s.changes():
            out.append(f"  step {step}: {a} -> {b}")
    return "\n".join(out) + "\n"


# --- SVG ----------------------------------------------------------------------------------------------

W, PAD_L, PAD_R = 720, 56, 12


def _x(steps: list[int], i: int, width: float) -> float:
    # Window-centred, like the heatmap's and the timeline's columns, so every figure of a layer lines up.
    return PAD_L + (width - PAD_L - PAD_R) * (i + 0.5) / len(steps)


def _share_color(v: float) -> str:
    # 0 (dead) -> near-black purple, 1 (fair) -> teal, >= 2 -> yellow (viridis-like, 3 anchors).
    anchors = [(0.0, (40, 11, 84)), (1.0, (33, 145, 140)), (2.0, (253, 231, 37))]
    v = max(0.0, min(2.0, v))
    for (a, ca), (b, cb) in zip(anchors, anchors[1:], strict=False):
        if v <= b:
            t = (v - a) / (b - a)
            r, g, bl = (round(ca[j] + (cb[j] - ca[j]) * t) for j in range(3))
            return f"#{r:02x}{g:02x}{bl:02x}"
    return "#fde725"


def _svg_open(h: int, kind: str, layer: int, label: str) -> str:
    return (
        f'<svg class="fig" data-fig="{kind}" data-layer="{layer}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{W}" height="{h}" viewBox="0 0 {W} {h}" role="img" aria-label="{html.escape(label)}">'
    )


def svg_heatmap(s: LayerSeries) -> str:
    n, e = len(s.steps), s.num_experts
    cell_h = max(4, min(16, 320 // max(1, e)))
    h = cell_h * e + 34
    cw = (W - PAD_L - PAD_R) / n
    parts = [_svg_open(h, "heatmap", s.index, f"layer {s.index} per-expert load over time")]
    parts.append('<text x="4" y="12" class="ax">expert</text>')
    for w in range(n):
        for x in range(min(e, len(s.share_WE[w]))):
            v = s.share_WE[w][x]
            parts.append(
                f'<rect shape-rendering="crispEdges" x="{PAD_L + w * cw:.2f}" y="{16 + x * cell_h}" width="{cw + 0.3:.2f}" height="{cell_h}" '
                f'fill="{_share_color(v)}"><title>step {s.steps[w]} expert {x}: {v:.2f}x fair share</title></rect>'
            )
    for x in range(0, e, max(1, e // 8)):
        parts.append(f'<text x="{PAD_L - 4}" y="{16 + x * cell_h + cell_h * 0.8:.1f}" class="ax" text-anchor="end">{x}</text>')
    parts.append(f'<text x="{PAD_L}" y="{h - 4}" class="ax">step {s.steps[0]}</text>')
    parts.append(f'<text x="{W - PAD_R}" y="{h - 4}" class="ax" text-anchor="end">step {s.steps[-1]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bands(m: Metric, t: Thresholds, top: float) -> list[tuple[float, float, str]]:
    warn, coll = getattr(t, m.warn), getattr(t, m.collapse)
    if m.higher_is_worse:
        return [(0.0, warn, "healthy"), (warn, coll, "warning"), (coll, top, "collapsed")]
    return [(warn, top, "healthy"), (coll, warn, "warning"), (0.0, coll, "collapsed")]


def svg_metric(s: LayerSeries, m: Metric, t: Thresholds) -> str:
    h, top_pad, bot = 110, 16, 18
    vals = s.values[m.key]
    noise = s.noise[m.key]
    real = [v for v in vals + noise if v is not None]
    top = 1.0 if m.key != "load_cov" else max(1.0, getattr(t, m.collapse)) * 1.25
    top = max(top, *(real or [0.0])) * (1.06 if real and max(real) >= top else 1.0)
    plot_h = h - top_pad - bot

    def y(v: float) -> float:
        return top_pad + plot_h * (1 - max(0.0, min(v, top)) / top)

    parts = [_svg_open(h, "metric", s.index, f"layer {s.index} {m.label}")]
    parts[0] = parts[0].replace('data-fig="metric"', f'data-fig="metric" data-metric="{m.key}"')
    for lo, hi, state in _bands(m, t, top):
        if hi > lo:
            parts.append(
                f'<rect x="{PAD_L}" y="{y(hi):.1f}" width="{W - PAD_L - PAD_R}" height="{y(lo) - y(hi):.1f}" '
                f'fill="{BAND_COLOR[state]}"><title>{state}</title></rect>'
            )
    for v in (getattr(t, m.warn), getattr(t, m.collapse)):
        parts.append(f'<text x="{PAD_L - 4}" y="{y(v) + 3:.1f}" class="ax" text-anchor="end">{v:g}</text>')
    parts.append(f'<text x="{PAD_L}" y="11" class="ttl">{html.escape(m.label)}</text>')

    def path(series: list[float | None]) -> str:
        d, pen = [], "M"
        for i, v in enumerate(series):
            if v is None:
                pen = "M"
                continue
            d.append(f"{pen}{_x(s.steps, i, W):.1f},{y(v):.1f}")
            pen = "L"
        return " ".join(d)

    if any(v is not None for v in noise):
        parts.append(f'<path class="noise" d="{path(noise)}" fill="none" stroke="#555" stroke-dasharray="4 3"><title>noise floor</title></path>')
    parts.append(f'<path class="line" d="{path(vals)}" fill="none" stroke="#1f3b73" stroke-width="1.6"/>')
    for i, v in enumerate(vals):
        if v is not None:
            parts.append(
                f'<circle cx="{_x(s.steps, i, W):.1f}" cy="{y(v):.1f}" r="2" fill="{STATE_COLOR.get(s.states[i], "#000")}">'
                f"<title>step {s.steps[i]}: {m.label} {v:.4g} ({s.states[i]})</title></circle>"
            )
    parts.append(f'<text x="{PAD_L}" y="{h - 4}" class="ax">step {s.steps[0]}</text>')
    parts.append(f'<text x="{W - PAD_R}" y="{h - 4}" class="ax" text-anchor="end">step {s.steps[-1]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_timeline(s: LayerSeries) -> str:
    h = 58
    n = len(s.steps)
    cw = (W - PAD_L - PAD_R) / n
    parts = [_svg_open(h, "timeline", s.index, f"layer {s.index} state timeline")]
    parts.append('<text x="4" y="24" class="ax">state</text>')
    for i, st in enumerate(s.states):
        parts.append(
            f'<rect shape-rendering="crispEdges" x="{PAD_L + i * cw:.2f}" y="14" width="{cw + 0.3:.2f}" height="16" fill="{STATE_COLOR.get(st, "#000")}">'
            f"<title>step {s.steps[i]}: {st}</title></rect>"
        )
    for step, a, b in s.changes():
        i = s.steps.index(step)
        x = PAD_L + i * cw
        parts.append(
            f'<g class="change"><line x1="{x:.1f}" x2="{x:.1f}" y1="8" y2="36" stroke="#000" stroke-width="1.5"/>'
            f'<title>step {step}: {a} -> {b}</title></g>'
        )
    for i, p in enumerate(s.projected):
        if p is not None:
            x = PAD_L + (i + 0.5) * cw
            parts.append(
                f'<path class="early" d="M{x - 4:.1f},46 L{x + 4:.1f},46 L{x:.1f},38 Z" fill="#ff7f0e">'
                f"<title>step {s.steps[i]}: early warning, projected collapse at step {p}</title></path>"
            )
    parts.append(f'<text x="{PAD_L}" y="{h - 2}" class="ax">step {s.steps[0]}</text>')
    parts.append(f'<text x="{W - PAD_R}" y="{h - 2}" class="ax" text-anchor="end">step {s.steps[-1]}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --- HTML ---------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#222;max-width:1500px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 4px}
table{border-collapse:collapse;margin:8px 0} th,td{border-bottom:1px solid #ddd;padding:3px 10px;text-align:left}
th{background:#f3f3f3} .st{font-weight:600} .layer{display:grid;grid-template-columns:760px 760px;gap:4px 12px}
.ax{font-size:10px;fill:#555} .ttl{font-size:11px;fill:#222;font-weight:600} .muted{color:#666}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
ul.ev{margin:4px 0;padding-left:18px;font-size:13px}
"""

_JS = """
window.__moewatchErrors = [];
function moewatchRecord(msg){window.__moewatchErrors.push(String(msg));
  document.documentElement.setAttribute('data-moewatch-errors', JSON.stringify(window.__moewatchErrors));}
window.addEventListener('error', function(e){moewatchRecord('error: ' + e.message);});
window.addEventListener('unhandledrejection', function(e){moewatchRecord('rejection: ' + e.reason);});
document.addEventListener('securitypolicyviolation', function(e){moewatchRecord('blocked: ' + e.blockedURI);});
var origError = console.error;
console.error = function(){moewatchRecord('console: ' + Array.prototype.join.call(arguments, ' '));
  origError.apply(console, arguments);};
window.addEventListener('load', function(){
  var figs = document.querySelectorAll('svg.fig');
  var ok = 0; figs.forEach(function(f){ if (f.getBBox && f.childElementCount > 0) ok++; });
  document.documentElement.setAttribute('data-moewatch-rendered', String(ok));
});
"""


def _summary_table(run: RunData) -> str:
    rows = summary_rows(run)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = []
    for r in rows:
        cells = []
        for c, v in r.items():
            style = f' class="st" style="color:{STATE_COLOR[v]}"' if c == "final state" and v in STATE_COLOR else ""
            cells.append(f"<td{style}>{html.escape(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="summary"><tr>{head}</tr>{"".join(body)}</table>'


def _events(s: LayerSeries) -> str:
    items = [f"step {step}: {html.escape(a)} &rarr; <b>{html.escape(b)}</b>" for step, a, b in s.changes()]
    first_early = next(((st, p) for st, p in zip(s.steps, s.projected, strict=True) if p is not None), None)
    if first_early is not None:
        items.append(f"step {first_early[0]}: first early warning, projected collapse at step {first_early[1]}")
    if s.dead_ids[-1]:
        items.append(f"dead at the end: experts {', '.join(map(str, s.dead_ids[-1]))}")
    last_reasons = s.reasons[-1]
    if last_reasons:
        items.append("last window: " + html.escape("; ".join(last_reasons)))
    if not items:
        return '<p class="muted">no state changes</p>'
    return '<ul class="ev">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def render_html(run: RunData) -> str:
    from moewatch import __version__ as version  # type: ignore[attr-defined]

    legend = "".join(f'<span style="background:{c}"></span>{k}' for k, c in STATE_COLOR.items())
    worst = max(run.run_states, key=_severity)
    sections = []
    for s in run.layers:
        metrics = "".join(svg_metric(s, m, run.thresholds) for m in thresholded_metrics())
        sections.append(
            f'<section class="layer-section" id="layer-{s.index}"><h2>layer {s.index} '
            f'<span class="muted">{html.escape(s.module)}, {s.num_experts} experts</span> &mdash; '
            f'<span style="color:{STATE_COLOR.get(s.states[-1], "#000")}">{s.states[-1]}</span></h2>'
            f'<div class="layer"><div>{svg_timeline(s)}{svg_heatmap(s)}'
            f'<div class="muted">heatmap: load / fair share per expert and window (dark = dead, teal = fair, '
            f"yellow = 2x or more)</div>{_events(s)}</div><div>{metrics}</div></div></section>"
        )
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; img-src data:\">"
        f"<title>moewatch report: {html.escape(run.run)}</title><style>{_CSS}</style>"
        f"<script>{_JS}</script></head><body>"
        f"<h1>moewatch report: {html.escape(run.run)}</h1>"
        f'<p class="muted">{run.windows} windows, steps {run.step_first}-{run.step_last}, {run.tokens} tokens; '
        f"final run state <b>{run.run_states[-1]}</b>, worst <b>{worst}</b>. Source {html.escape(str(run.source))}; "
        f"moewatch {html.escape(str(version))}.</p>"
        f'<div class="legend">states:{legend}<span style="background:#ff7f0e"></span>early warning</div>'
        f"{_summary_table(run)}{''.join(sections)}</body></html>\n"
    )


# --- PNG ----------------------------------------------------------------------------------------------


def render_png(run: RunData, out_dir: Path) -> list[Path]:
    """One PNG per layer (timeline, heatmap, the four metrics); needs matplotlib (``pip install
    'moewatch[report]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        raise ValueError(
            "moewatch report --png needs matplotlib: pip install 'moewatch[report]' (or pip install matplotlib)"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    cmap = LinearSegmentedColormap.from_list("share", [_share_color(v) for v in (0.0, 0.5, 1.0, 1.5, 2.0)])
    paths = []
    for s in run.layers:
        fig = plt.figure(figsize=(11, 7.5), dpi=100)
        grid = fig.add_gridspec(5, 2, height_ratios=[0.45, 1, 1, 1, 1], width_ratios=[3, 2])
        n = len(s.steps)
        xs = [i + 0.5 for i in range(n)]  # window-centred, as in the HTML

        def _step_ticks(ax: Any, steps: list[int] = s.steps) -> None:
            ticks = sorted({0, *range(0, len(steps), max(1, len(steps) // 6)), len(steps) - 1})
            ax.set_xticks([t + 0.5 for t in ticks], [str(steps[t]) for t in ticks])

        ax_t = fig.add_subplot(grid[0, :])
        for i, st in enumerate(s.states):
            ax_t.axvspan(i, i + 1, color=STATE_COLOR.get(st, "#000"))
        for i, p in enumerate(s.projected):
            if p is not None:
                ax_t.plot(i + 0.5, 0.5, marker="^", color="#ff7f0e")
        ax_t.set_xlim(0, len(s.states))
        ax_t.set_yticks([])
        ax_t.set_xticks([])
        ax_t.set_title(f"layer {s.index} {s.module}: state over {len(s.states)} windows (final {s.states[-1]})")
        ax_h = fig.add_subplot(grid[1:, 0])
        im = ax_h.imshow(
            [list(col) for col in zip(*s.share_WE, strict=False)], aspect="auto", cmap=cmap, vmin=0, vmax=2,
            origin="lower", extent=(0, n, -0.5, s.num_experts - 0.5), interpolation="nearest",
        )
        _step_ticks(ax_h)
        ax_h.set_ylabel("expert")
        ax_h.set_xlabel("window end step")
        fig.colorbar(im, ax=ax_h, label="load / fair share")
        for row, m in enumerate(thresholded_metrics(), start=1):
            ax = fig.add_subplot(grid[row, 1])
            vals = [math.nan if v is None else v for v in s.values[m.key]]
            real = [v for v in vals if not math.isnan(v)]
            top = max([1.0 if m.key != "load_cov" else 1.25 * run.thresholds.load_cov_collapsed, *real]) * 1.06
            for lo, hi, state in _bands(m, run.thresholds, top):
                if hi > lo:
                    ax.axhspan(lo, hi, color=BAND_COLOR[state])
            noise = [math.nan if v is None else v for v in s.noise[m.key]]
            if any(not math.isnan(v) for v in noise):
                ax.plot(xs, noise, "--", color="#555", lw=1, label="noise floor")
            ax.plot(xs, vals, color="#1f3b73", lw=1.4, marker="." if n < 3 else None)
            ax.set_ylim(0, top)
            ax.set_xlim(0, n)
            _step_ticks(ax)
            ax.set_ylabel(m.label, fontsize=8)
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        path = out_dir / f"layer-{s.index:03d}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# --- CLI ----------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    run = load_run(args.path)
    if args.text:
        sys.stdout.write(render_text(run))
    if args.png is not None:
        for p in render_png(run, args.png):
            print(f"wrote {p}")
    if not args.text or args.output is not None:
        out = args.output or (run.source.parent / "report.html")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_html(run), encoding="utf-8")
        print(f"wrote {out} ({len(run.layers)} layers, {run.windows} windows)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="offline HTML report (or PNGs, or a terminal summary) of a run's JSONL log",
        description="Render a run's JSONL log as one self-contained HTML file that opens offline (no network: "
        "inline SVG, style and script), with --png DIR the same figures as PNG files, with --text a "
        "plain-terminal summary.",
    )
    p.add_argument("path", type=Path, help="run directory (moewatch-runs/<run>/) or a windows.jsonl log")
    p.add_argument("-o", "--output", type=Path, default=None, help="HTML file (default <run dir>/report.html)")
    p.add_argument("--png", type=Path, default=None, metavar="DIR", help="also write one PNG per layer to DIR")
    p.add_argument("--text", action="store_true", help="print a terminal summary (no HTML unless -o is given)")
    p.set_defaults(func=_run)
