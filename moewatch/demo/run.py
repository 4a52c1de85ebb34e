"""``moewatch demo``: train the demo MoE on the CPU with moewatch attached, and summarise what it saw."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import moewatch
from moewatch.config import MoEWatchConfig, build_config
from moewatch.demo.model import Balance, DemoMoE, SyntheticTokens
from moewatch.report import HealthState, WindowReport
from moewatch.sinks.base import Sink

__all__ = ["DemoOptions", "DemoResult", "run_demo"]

log = logging.getLogger(__name__)

#: Bias feedback rate per optimizer step for each balancing mode.
BIAS_RATE = {"none": 0.05, "bias": 0.1, "aux": 0.0}
AUX_WEIGHT = 0.5  # Switch aux loss weight, tuned for this toy regression loss scale


@dataclass
class DemoOptions:
    experts: int = 8
    top_k: int = 2
    layers: int = 2
    tokens_per_step: int = 64
    steps: int = 300
    #: Steps per window; ``None``: ``MOEWATCH_WINDOW_STEPS`` / the config file's ``window_steps``, else 10.
    window: int | None = 10
    balance: Balance = "none"
    seed: int = 0
    dim: int = 64
    jsonl: Path | None = None
    console: bool = True
    step_delay: float = 0.0
    linger: float = 0.0
    config_file: Path | None = None


@dataclass
class _Collector:
    """A sink that keeps every report, for the summary."""

    reports: list[WindowReport] = field(default_factory=list)

    def emit(self, report: WindowReport) -> None:
        self.reports.append(report)

    def close(self) -> None:
        pass


def window_line(report: WindowReport) -> str:
    """One plain line per window, for logs (stdout is not a terminal: no live table to redraw)."""
    parts = [f"window {report.window} steps {report.step_start}-{report.step_end} {report.state.value}"]
    for la in report.layers:
        cov = "-" if la.load_cov is None else f"{la.load_cov:.3f}"
        top2 = "-" if la.top2_share is None else f"{la.top2_share:.1%}"
        ent = "-" if la.norm_entropy is None else f"{la.norm_entropy:.3f}"
        proj = "" if la.projected_collapse_step is None else f" collapse@{la.projected_collapse_step}"
        parts.append(
            f"L{la.index} {la.state.value} cov {cov} top2 {top2} dead {la.dead_experts}/{la.num_experts} "
            f"entropy {ent}{proj}"
        )
    return " | ".join(parts)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _LineSink:
    def emit(self, report: WindowReport) -> None:
        print(window_line(report), flush=True)

    def close(self) -> None:
        pass


@dataclass
class DemoResult:
    reports: list[WindowReport]
    routers: list[moewatch.RouterInfo]
    seconds: float
    jsonl_path: Path | None
    urls: list[str]

    def first_collapse(self) -> WindowReport | None:
        return next((r for r in self.reports if r.state is HealthState.COLLAPSED), None)


def _config(opts: DemoOptions) -> MoEWatchConfig:
    if opts.config_file:
        base = MoEWatchConfig.from_file(opts.config_file)
    else:
        base = build_config(None, {}, source="the MOEWATCH_* environment")
    overrides: dict[str, object] = {}
    if opts.window is not None:
        overrides["window_steps"] = opts.window
    elif "MOEWATCH_WINDOW_STEPS" not in os.environ and "window_steps" not in base.model_fields_set:
        overrides["window_steps"] = 10
    if "MOEWATCH_RUN_NAME" not in os.environ and "run_name" not in base.model_fields_set:
        overrides["run_name"] = f"demo-{opts.balance}-seed{opts.seed}"
    jsonl = base.jsonl.model_copy()
    if opts.jsonl is not None:
        jsonl.path, jsonl.enabled = opts.jsonl, True
    overrides["jsonl"] = jsonl
    console = base.console.model_copy()
    # A live table redraws in place: only on a terminal. Elsewhere (CI logs, tee) one line per window.
    console.enabled, console.live = opts.console and sys.stdout.isatty(), True
    overrides["console"] = console
    return build_config(base, overrides, source="moewatch demo")


def run_demo(opts: DemoOptions) -> DemoResult:
    if opts.top_k > opts.experts:
        raise moewatch.ConfigError(f"--top-k {opts.top_k} must not exceed --experts {opts.experts}")
    torch.manual_seed(opts.seed)
    cfg = _config(opts)
    threads = torch.get_num_threads()
    # Tensors this small only lose to intra-op threading (about 10x slower on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        return _train(opts, cfg)
    finally:
        torch.set_num_threads(threads)


def _train(opts: DemoOptions, cfg: MoEWatchConfig) -> DemoResult:
    data = SyntheticTokens(opts.dim, seed=opts.seed)
    model = DemoMoE(opts.dim, opts.experts, opts.top_k, opts.layers)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    collector = _Collector()
    sinks: list[Sink] = [collector]
    if opts.console and not sys.stdout.isatty():
        sinks.append(_LineSink())
    if cfg.jsonl.enabled and cfg.jsonl_path.exists():
        # The demo is reproducible: a rerun under the same run name replaces its log instead of appending.
        _say(f"moewatch demo: replacing the previous log {cfg.jsonl_path} of run {cfg.run_name}")
        cfg.jsonl_path.unlink()
    start = time.perf_counter()
    with moewatch.attach(model, optimizer=opt, config=cfg, sinks=sinks) as watch:
        servers = [s for s in watch.sinks if isinstance(getattr(s, "url", None), str)]
        urls = [s.url for s in servers]
        for s in servers:
            bound = getattr(s, "bind_address", None) or "?"
            everywhere = bound.startswith(("0.0.0.0:", "[::]:"))
            _say(
                f"moewatch: metrics served at {s.url} (bound to {bound}{', all interfaces' if everywhere else ''})"
            )
        for _ in range(opts.steps):
            x_TD, y_TD = data.batch(opts.tokens_per_step)
            loss = torch.nn.functional.mse_loss(model(x_TD), y_TD)
            if opts.balance == "aux":
                loss = loss + AUX_WEIGHT * model.aux_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()  # moewatch counts the step here (optimizer post-hook)
            model.update_bias(opts.balance, BIAS_RATE[opts.balance])
            if opts.step_delay:
                time.sleep(opts.step_delay)
        seconds = time.perf_counter() - start
        if urls and opts.linger:
            _say(f"moewatch demo: training done; serving {', '.join(urls)} for {opts.linger:g} more s (--linger)")
            time.sleep(opts.linger)
        elif urls:
            _say("moewatch demo: training done; /metrics stops while moewatch closes (pass --linger SECONDS "
                      "to keep it up for a scrape)")
    jsonl_path = cfg.jsonl_path if cfg.jsonl.enabled else None
    return DemoResult(collector.reports, watch.routers, seconds, jsonl_path, urls)
