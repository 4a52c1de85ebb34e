"""The exceptions moewatch raises on purpose. Every one derives from :class:`MoEWatchError`, so
``except moewatch.MoEWatchError`` catches what the monitor decided to raise and nothing else; each also
derives from the built-in a caller would expect (``ValueError`` for bad input, ``RuntimeError`` for a run
that cannot continue), so existing ``except ValueError`` code keeps working."""

from __future__ import annotations

__all__ = ["ConfigError", "MoEWatchError", "UnreadableRouterError"]


class MoEWatchError(Exception):
    """Base of every exception moewatch raises on purpose."""


class ConfigError(MoEWatchError, ValueError):
    """A configuration value or attach argument is wrong; the message names the field and how to set it."""


class UnreadableRouterError(MoEWatchError, ValueError):
    """A router was found whose choice moewatch cannot read exactly; the message names the router, the
    framework version and the fix. Raised by ``attach`` rather than counting a wrong or empty choice."""
