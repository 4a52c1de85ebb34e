"""The /metrics HTTP(S) server: prometheus-client's threaded WSGI server on a daemon thread."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

from moewatch.exporter.exposition import split_app
from moewatch.exporter.settings import PrometheusConfig

__all__ = ["MetricsServer", "start_metrics_server"]

log = logging.getLogger(__name__)

_HINT = (
    "set prometheus.port (MOEWATCH_PROMETHEUS__PORT) to a free port, 0 to pick any free port, "
    "or prometheus.enabled=false (MOEWATCH_PROMETHEUS__ENABLED=false); several monitoring processes on one "
    "host (process_group=False) each need their own port, e.g. 9405 + LOCAL_RANK"
)


@dataclass
class MetricsServer:
    httpd: WSGIServer
    thread: threading.Thread
    host: str
    port: int
    url: str

    def stop(self, timeout: float = 5.0) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout)


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def start_metrics_server(
    config: PrometheusConfig, registry: CollectorRegistry, static: Callable[[bool], bytes] | None = None
) -> MetricsServer:
    """Serve ``registry`` on ``config.host:config.port``; a busy port is a ``ConfigError`` naming the key."""
    from moewatch.config import ConfigError  # here, not at the top: moewatch.config imports this package

    for key, path in (("certfile", config.certfile), ("keyfile", config.keyfile)):
        if path is not None and not path.is_file():
            raise ConfigError(
                f"moewatch: prometheus.{key} {path} does not exist; set MOEWATCH_PROMETHEUS__{key.upper()} "
                "to a readable PEM file"
            )
    try:
        httpd, thread = start_http_server(
            config.port,
            addr=config.host,
            registry=registry,
            certfile=str(config.certfile) if config.certfile else None,
            keyfile=str(config.keyfile) if config.keyfile else None,
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"moewatch cannot serve Prometheus metrics: port {config.port} on {config.host} is already in use; "
                + _HINT
            ) from None
        raise ConfigError(
            f"moewatch cannot serve Prometheus metrics on {config.host}:{config.port}: {exc.strerror or exc}; "
            "check prometheus.host (MOEWATCH_PROMETHEUS__HOST), prometheus.certfile/keyfile, or " + _HINT
        ) from None
    if static is not None:
        # Requests look the app up per request, and nobody knows the port before we return.
        httpd.set_app(split_app(httpd.get_app(), static))
    port = int(httpd.server_address[1])
    scheme = "https" if config.certfile else "http"
    url = f"{scheme}://{_url_host(config.host)}:{port}/metrics"
    log.info("moewatch: serving Prometheus metrics at %s", url)
    return MetricsServer(httpd, thread, config.host, port, url)
