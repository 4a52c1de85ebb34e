"""Checks on notification URLs. Error messages name the config field, never the (secret) value."""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

from moewatch.config import ConfigError

__all__ = ["check_url", "is_loopback", "redact", "register_secrets"]


def redact(text: str, secrets: list[str]) -> str:
    """Replace every secret (and, for URLs, their path) in ``text`` by ``<redacted>``."""
    for s in secrets:
        if not s:
            continue
        text = text.replace(s, "<redacted>")
        if "://" in s:
            path = s.split("://", 1)[1].partition("/")[2]
            if len(path) > 1:
                text = text.replace("/" + path, "/<redacted>")
    return text


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


class _RedactSecrets(logging.Filter):
    """Redacts registered secrets from urllib3's own log records (its DEBUG lines name the request path,
    which for a Slack webhook is the secret)."""

    def __init__(self) -> None:
        super().__init__("moewatch-redact")
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            try:
                msg = record.getMessage()
            except Exception:  # noqa: BLE001 - a malformed record is not ours to fix
                return True
            clean = redact(msg, sorted(self.secrets))
            if clean != msg:
                record.msg, record.args = clean, ()
        return True


_FILTER = _RedactSecrets()
_URLLIB3_LOGGERS = ("urllib3.connectionpool", "urllib3.connection", "urllib3.poolmanager", "urllib3.util.retry")


def register_secrets(secrets: list[str]) -> None:
    """Keep ``secrets`` out of urllib3's log records from now on."""
    _FILTER.secrets.update(s for s in secrets if s)
    for name in _URLLIB3_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
