"""Prometheus exporter-toolkit style web config: TLS files and basic auth with bcrypt-hashed passwords.

The file (YAML), as for node_exporter's ``--web.config.file``::

    tls_server_config:
      cert_file: /etc/moewatch/cert.pem
      key_file: /etc/moewatch/key.pem
    basic_auth_users:
      prometheus: $2y$10$...          # htpasswd -nBC 10 "" | tr -d ':\\n'

Passwords are checked with bcrypt; a successful check is cached (hash of the header) so a scrape every few
seconds does not pay bcrypt's deliberate slowness each time. Failed checks get 401 with
``WWW-Authenticate: Basic``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moewatch.errors import ConfigError

__all__ = ["WebConfig", "load_web_config", "with_basic_auth"]


class TLSServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cert_file: Path
    key_file: Path


class WebConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    tls_server_config: TLSServerConfig | None = None
    basic_auth_users: dict[str, str] = Field(default_factory=dict, repr=False)


def load_web_config(path: Path) -> WebConfig:
    """Read and check ``path``; ConfigError names the file, the key and the fix (never a hash)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(
            f"prometheus.web_config_file {path}: cannot read it ({exc.strerror}); set "
            "MOEWATCH_PROMETHEUS__WEB_CONFIG_FILE to a readable YAML file"
        ) from None
    except yaml.YAMLError:
        raise ConfigError(f"prometheus.web_config_file {path} is not valid YAML") from None
    try:
        cfg = WebConfig.model_validate(raw)
    except ValidationError as exc:
        where = "; ".join(".".join(map(str, e["loc"])) + ": " + e["msg"] for e in exc.errors())
        raise ConfigError(
            f"prometheus.web_config_file {path}: {where}; expected tls_server_config.cert_file/key_file and "
            "basic_auth_users: {user: bcrypt hash}"
        ) from None
    for user, hashed in cfg.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(
                f"prometheus.web_config_file {path}: basic_auth_users.{user} is not a bcrypt hash (value hidden); "
                "make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'` or python -c \"import bcrypt; "
                "print(bcrypt.hashpw(b'PASSWORD', bcrypt.gensalt()).decode())\""
            )
    return cfg


WSGIApp = Callable[..., Iterable[bytes]]


def with_basic_auth(app: WSGIApp, users: dict[str, str]) -> WSGIApp:
    """``app`` behind HTTP basic auth against ``users`` (name -> bcrypt hash)."""
    try:
        import bcrypt
    except ImportError:
        raise ConfigError(
            "prometheus.web_config_file sets basic_auth_users, which needs the bcrypt package: "
            "pip install 'moewatch[web]' (or pip install bcrypt)"
        ) from None

    hashes = {u: h.encode() for u, h in users.items()}
    ok_cache: set[bytes] = set()
    lock = threading.Lock()

    def allowed(header: str) -> bool:
        if not header.startswith("Basic "):
            return False
        key = hashlib.sha256(header.encode()).digest()
        with lock:
            if key in ok_cache:
                return True
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = hashes.get(user)
        if hashed is None:
            if hashes:  # as slow as a wrong password, so user names cannot be probed by timing
                bcrypt.checkpw(password.encode(), next(iter(hashes.values())))
            return False
        try:
            good = bcrypt.checkpw(password.encode(), hashed)
        except ValueError:
            return False
        if good:
            with lock:
                if len(ok_cache) > 1000:
                    ok_cache.clear()
                ok_cache.add(key)
        return good

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if allowed(environ.get("HTTP_AUTHORIZATION", "")):
            return app(environ, start_response)
        body = b"401 Unauthorized\n"
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", 'Basic realm="moewatch"'), ("Content-Type", "text/plain"),
             ("Content-Length", str(len(body)))],
        )
        return [body]

    return guarded
