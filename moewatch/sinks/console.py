"""A table a person can read at a glance: one row per layer, coloured by state. The ``NaN/inf`` and
``bad ids`` columns count broken router outputs (``LayerReport.nonfinite``, ``.invalid_ids``), shown in bold
red when not 0."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from moewatch.report import HealthState, LayerReport, WindowReport

__all__ = ["ConsoleSink", "render_table", "wide_console"]

STYLE = {
    HealthState.HEALTHY: "green",
    HealthState.WARNING: "yellow",
    HealthState.COLLAPSED: "bold red",
    HealthState.INSUFFICIENT_DATA: "dim",
}


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _fault(n: int) -> Text:
    return Text(str(n), style="bold red" if n else "")


def _rows(report: WindowReport, max_layers: int) -> list[LayerReport]:
    layers = report.layers
    if len(layers) <= max_layers:
        return layers
    worst_first = sorted(layers, key=lambda r: (-r.state.severity, -(r.load_cov or 0.0)))
    return sorted(worst_first[:max_layers], key=lambda r: r.index)


def render_table(report: WindowReport, max_layers: int = 64) -> Table:
    state = Text(report.state.value, style=STYLE[report.state])
    title = Text.assemble(
        f"moewatch {report.run}  steps {report.step_start}-{report.step_end}  ", "run: ", state
    )
    table = Table(title=title, title_justify="left", expand=False, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("module", overflow="ellipsis", no_wrap=True, max_width=24)
    table.add_column("state", no_wrap=True, min_width=9)
    for col in ("load CV", "dead", "top-2", "entropy", "eff. E", "NaN/inf", "bad ids", "tokens"):
        table.add_column(col, justify="right", no_wrap=True)
    shown = _rows(report, max_layers)
    for r in shown:
        style = STYLE[r.state]
        table.add_row(
            str(r.index),
            r.module,
            Text(r.state.value, style=style),
            _fmt(r.load_cov),
            f"{r.dead_experts}/{r.num_experts}",
            _fmt(r.top2_share, ".1%") if r.top2_share is not None else "-",
            _fmt(r.norm_entropy),
            _fmt(r.effective_experts, ".1f"),
            _fault(r.nonfinite),
            _fault(r.invalid_ids),
            str(r.tokens),
            style=None if r.state is HealthState.HEALTHY else style,
        )
    if len(shown) < len(report.layers):
        table.caption = f"{len(report.layers) - len(shown)} more layers not shown (worst first)"
    return table


def wide_console() -> Console:
    """A console for stdout; when stdout is not a terminal (logs, CI) rich would assume 80 columns, too
    narrow for the table, so use 120."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


class ConsoleSink:
    """Prints the table at every window end, or redraws one live table in place (``live=True``)."""

    name = "console"

    def __init__(self, live: bool = False, max_layers: int = 64, console: Console | None = None) -> None:
        self.console = console or wide_console()
        self.max_layers = max_layers
        self._live: Live | None = None
        if live:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()

    def emit(self, report: WindowReport) -> None:
        table = render_table(report, self.max_layers)
        if self._live is not None:
            self._live.update(table, refresh=True)
        else:
            self.console.print(table)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
            self.console.line()
