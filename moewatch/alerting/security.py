"""Checks on notification URLs. Error messages name the config field, never the (secret) value."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from moewatch.config import ConfigError

__all__ = ["check_url", "is_loopback"]


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(field: str, url: str, allow_insecure_http: bool) -> None:
    """Raise :class:`ConfigError` unless ``url`` is https, or http to loopback (or http is allowed)."""
    env = "MOEWATCH_" + field.upper().replace(".", "__")
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        parts, host = None, None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise ConfigError(
            f"{field} is not an http(s) URL with a host (value hidden: it is a secret); set {field} "
            f"(${env}) to the full https:// URL the service gave you"
        )
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback(host):
        raise ConfigError(
            f"{field} uses plain http:// to a non-loopback host, which would send the secret unencrypted; "
            f"use https://, or set alerts.allow_insecure_http=true (MOEWATCH_ALERTS__ALLOW_INSECURE_HTTP=true) "
            "to allow it"
        )
