"""Argument types shared by the command line's subcommands (a module of its own so that subcommand
modules such as :mod:`moewatch.scan` do not import :mod:`moewatch.cli`, which imports them)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["positive"]


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """argparse ``type=`` for a number above 0 (used by every subcommand)."""

    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse
