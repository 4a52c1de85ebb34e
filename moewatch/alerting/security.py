"""Checks on notification URLs. Error messages name the config field, never the (secret) value."""

from __future__ import annotations

import ipaddress
import logging
import re
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

from moewatch.errors import ConfigError

__all__ = ["check_url", "is_loopback", "redact", "register_secrets"]


def _forms(secret: str) -> set[str]:
    """``secret`` as it may appear in text: as is, percent-encoded (any case), and for URLs their path with
    and without its leading slash, the path's long segments, the query and each query value."""
    out = {secret}
    if "://" in secret:
        parts = urlsplit(secret)
        path = parts.path.lstrip("/")
        if len(path) > 1:
            out.add("/" + path)
            if len(path) >= 8:
                out.add(path)
            out |= {seg for seg in path.split("/") if len(seg) >= 8 and not seg.isalpha()}
        if parts.query:
            out.add(parts.query)
            out |= {v for _, v in parse_qsl(parts.query, keep_blank_values=True) if len(v) >= 4}
        if parts.password:
            out.add(parts.password)
    for form in list(out):
        for enc in (quote(form, safe=""), quote(form), quote_plus(form)):
            if enc != form:
                out |= {enc, enc.lower(), _upper_hex(enc)}
    return {f for f in out if f}


def _upper_hex(text: str) -> str:
    return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group(0).upper(), text)


def redact(text: str, secrets: list[str]) -> str:
    """Replace every secret (``secrets`` and those given to :func:`register_secrets`) in ``text`` by
    ``<redacted>``, in any form it may take there (see ``_forms``):
    longest forms first, so a URL goes whole and its parts are caught where it was cut up."""
    every = set(secrets) | _FILTER.secrets  # also every registered secret: a service may echo another's
    forms = sorted({f for s in every if s for f in _forms(s)}, key=len, reverse=True)
    for form in forms:
        if form in text:
            text = text.replace(form, "<redacted>")
        elif "%" in form and form.lower() in text.lower():
            text = re.sub(re.escape(form), "<redacted>", text, flags=re.IGNORECASE)
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
