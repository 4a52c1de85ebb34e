"""The ``moewatch`` command: ``moewatch demo`` and the subcommands other modules register.

Building the parser imports nothing heavy (no torch, pydantic or rich): each command imports what it
needs when it runs, so ``moewatch --help`` and ``moewatch --version`` answer at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moewatch._version import __version__
from moewatch.cliargs import positive

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["build_parser", "main"]



def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small MoE on the CPU with moewatch attached",
        description="Train a small real PyTorch MoE on synthetic data with moewatch attached. --balance none "
        "reproduces router collapse (the winners' feedback loop starves the other experts); bias and aux keep "
        "it balanced.",
    )
    p.add_argument("--experts", type=positive(int), default=8, help="experts per layer (default 8)")
    p.add_argument("--top-k", type=positive(int), default=2, help="experts per token (default 2)")
    p.add_argument("--layers", type=positive(int), default=2, help="MoE layers (default 2)")
    p.add_argument("--tokens-per-step", type=positive(int), default=64, help="tokens per step (default 64)")
    p.add_argument("--steps", type=positive(int), default=300, help="optimizer steps (default 300)")
    p.add_argument(
        "--window",
        type=positive(int),
        default=None,
        help="steps per moewatch window (default: MOEWATCH_WINDOW_STEPS or the config file's window_steps, else 10)",
    )
    p.add_argument(
        "--balance",
        choices=("none", "bias", "aux"),
        default="none",
        help="none: winners pushed up (collapse); bias: the sign flipped (aux-loss-free); aux: Switch aux loss",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--jsonl", type=Path, default=None, help="JSONL log path (default ./moewatch-runs/<run>/)")
    p.add_argument("--no-console", action="store_true", help="no live table")
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep this many seconds after each step")
    p.add_argument(
        "--linger", type=float, default=0.0, help="keep serving /metrics this many seconds after training (default 0)"
    )
    p.add_argument("--config", type=Path, default=None, help="moewatch config file (TOML or YAML)")
    p.set_defaults(func=_run_demo)


def _summary(result: object, balance: str, out: Console) -> None:
    from rich import box
    from rich.table import Table

    from moewatch.demo.run import DemoResult
    from moewatch.report import HealthState
    from moewatch.sinks.console import STYLE

    assert isinstance(result, DemoResult)
    last = result.reports[-1] if result.reports else None
    if last is None:
        out.print("no window completed")
        return
    table = Table(
        title=f"moewatch demo summary (--balance {balance}, {len(result.reports)} windows)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("layer", "final state", "load CV", "top-2", "dead", "dead ids", "entropy", "collapsed since"):
        table.add_column(col, no_wrap=col != "dead ids")
    for layer in last.layers:
        first = next(
            (r.step_end for r in result.reports if r.layers[layer.index].state is HealthState.COLLAPSED), None
        )
        table.add_row(
            str(layer.index),
            f"[{STYLE[layer.state]}]{layer.state.value}[/]",
            f"{layer.load_cov:.3f}" if layer.load_cov is not None else "-",
            f"{layer.top2_share:.1%}" if layer.top2_share is not None else "-",
            f"{layer.dead_experts}/{layer.num_experts}",
            ",".join(map(str, layer.dead_expert_ids)) or "-",
            f"{layer.norm_entropy:.3f}" if layer.norm_entropy is not None else "-",
            f"step {first}" if first is not None else "never",
        )
    out.print(table)
    worst_cov = max((layer.load_cov or 0.0) for r in result.reports[1:] for layer in r.layers) if len(
        result.reports
    ) > 1 else 0.0
    states = ", ".join(f"{s.value}={sum(r.state is s for r in result.reports)}" for s in HealthState)
    out.print(f"windows by run state: {states}")
    out.print(f"worst load CV after the first window: {worst_cov:.3f}")
    out.print(f"trained {result.reports[-1].step_end} steps in {result.seconds:.1f} s")
    if result.jsonl_path:
        out.print(f"JSONL log: {result.jsonl_path}")


def _run_demo(args: argparse.Namespace) -> int:
    from moewatch.demo.run import DemoOptions, run_demo

    opts = DemoOptions(
        experts=args.experts,
        top_k=args.top_k,
        layers=args.layers,
        tokens_per_step=args.tokens_per_step,
        steps=args.steps,
        window=args.window,
        balance=args.balance,
        seed=args.seed,
        jsonl=args.jsonl,
        console=not args.no_console,
        step_delay=args.step_delay,
        linger=args.linger,
        config_file=args.config,
    )
    from moewatch.sinks.console import wide_console

    result = run_demo(opts)
    _summary(result, args.balance, wide_console())
    return 0


def _register_plugins(sub: argparse._SubParsersAction) -> None:
    from moewatch import offline_report, scan
    from moewatch.alerting import cli as alerting_cli

    scan.register(sub)
    offline_report.register(sub)
    alerting_cli.register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moewatch", description="Router-health monitoring for MoE training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"moewatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _register_plugins(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:  # `moewatch` alone: say what there is
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except ValueError as exc:  # moewatch.ConfigError included
        print(f"moewatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
