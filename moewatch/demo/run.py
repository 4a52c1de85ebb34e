"""``moewatch demo``: train the demo MoE on the CPU with moewatch attached, and summarise what it saw."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

import moewatch
from moewatch.config import MoEWatchConfig, build_config
from moewatch.demo.model import Balance, DemoMoE, SyntheticTokens
from moewatch.report import HealthState, WindowReport

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
    window: int = 10
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
    overrides: dict[str, object] = {"window_steps": opts.window}
    if "MOEWATCH_RUN_NAME" not in os.environ and "run_name" not in base.model_fields_set:
        overrides["run_name"] = f"demo-{opts.balance}-seed{opts.seed}"
    jsonl = base.jsonl.model_copy()
    if opts.jsonl is not None:
        jsonl.path, jsonl.enabled = opts.jsonl, True
    overrides["jsonl"] = jsonl
    console = base.console.model_copy()
    console.enabled, console.live = opts.console, True
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
    start = time.perf_counter()
    with moewatch.attach(model, optimizer=opt, config=cfg, sinks=[collector]) as watch:
        servers = [s for s in watch.sinks if isinstance(getattr(s, "url", None), str)]
        urls = [s.url for s in servers]
        for s in servers:
            bound = getattr(s, "bind_address", None) or "?"
            everywhere = bound.startswith(("0.0.0.0:", "[::]:"))
            Console(stderr=True).print(
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
        if opts.linger:
            log.info("training done; serving metrics for %.0f more seconds", opts.linger)
            time.sleep(opts.linger)
    jsonl_path = cfg.jsonl_path if cfg.jsonl.enabled else None
    return DemoResult(collector.reports, watch.routers, seconds, jsonl_path, urls)
