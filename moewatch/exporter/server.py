"""The /metrics HTTP(S) server: :class:`~moewatch.exporter.httpserver.GuardedWSGIServer` on a daemon thread
(TLS handshakes and requests off the accept loop, with timeouts; ``/metrics``, a landing page at ``/``, 404
elsewhere)."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from moewatch.errors import ConfigError
from moewatch.exporter.exposition import FastPath, split_app
from moewatch.exporter.httpserver import GuardedWSGIServer, landing_page, route
from moewatch.exporter.settings import PrometheusConfig

__all__ = ["MetricsServer", "start_metrics_server"]

log = logging.getLogger(__name__)

_HINT = (
    "set prometheus.port (MOEWATCH_PROMETHEUS__PORT) to a free port, 0 to pick any free port, "
    "or prometheus.enabled=false (MOEWATCH_PROMETHEUS__ENABLED=false); several monitoring processes on one "
    "host (process_group=False) each need their own port, e.g. 9405 + LOCAL_RANK"
)


_OWN_PORTS: set[int] = set()  # ports this process's exporters serve now


@dataclass
class MetricsServer:
    httpd: WSGIServer
    thread: threading.Thread
    host: str
    port: int
    url: str

    def stop(self, timeout: float = 5.0) -> None:
        _OWN_PORTS.discard(self.port)
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout)


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _family(host: str, port: int) -> tuple[int, tuple[str, int]]:
    """Address family and bind address for ``host`` (IPv6 literals and names resolving to IPv6 work)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = next(iter(infos))
    return family, (str(sockaddr[0]), int(sockaddr[1]))


def start_metrics_server(
    config: PrometheusConfig, registry: CollectorRegistry, fast: FastPath | None = None
) -> MetricsServer:
    """Serve ``registry`` on ``config.host:config.port``; a busy port is a ``ConfigError`` naming the port and
    the fix. A port that another monitor of this process serves (a notebook re-run, a second model) is not an
    error: this one is served on a free port instead, with a warning naming it."""
    for key, path in (("certfile", config.certfile), ("keyfile", config.keyfile)):
        if path is not None and not path.is_file():
            raise ConfigError(
                f"moewatch: prometheus.{key} {path} does not exist; set MOEWATCH_PROMETHEUS__{key.upper()} "
                "to a readable PEM file"
            )
    web = None
    if config.web_config_file is not None:
        from moewatch.exporter.webconfig import load_web_config

        web = load_web_config(config.web_config_file)
        if web.tls_server_config is not None:
            tls = web.tls_server_config
            for key, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
                if not path.is_file():
                    raise ConfigError(
                        f"moewatch: prometheus.web_config_file {config.web_config_file}: tls_server_config.{key} "
                        f"{path} does not exist; point it at a readable PEM file"
                    )
            config = config.model_copy(update={"certfile": tls.cert_file, "keyfile": tls.key_file})
    users = web.basic_auth_users if web is not None else {}
    try:
        return _start(config, registry, fast, users)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and config.port != 0 and config.port in _OWN_PORTS:
            server = _start(config.model_copy(update={"port": 0}), registry, fast, users)
            log.warning(
                "moewatch: port %d is already served by another moewatch monitor in this process (a notebook "
                "re-run or a second model?); serving this one at %s instead. Close the other monitor first, or "
                "set prometheus.port (MOEWATCH_PROMETHEUS__PORT) per monitor to choose",
                config.port, server.url,
            )
            return server
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"moewatch cannot serve Prometheus metrics: port {config.port} on {config.host} is already in use; "
                + _HINT
            ) from None
        raise ConfigError(
            f"moewatch cannot serve Prometheus metrics on {config.host}:{config.port}: {exc.strerror or exc}; "
            "check prometheus.host (MOEWATCH_PROMETHEUS__HOST), prometheus.certfile/keyfile, or " + _HINT
        ) from None


def _start(
    config: PrometheusConfig,
    registry: CollectorRegistry,
    fast: FastPath | None,
    users: dict[str, str] | None = None,
) -> MetricsServer:
    """Bind and serve; OSError (busy port, bad host, unreadable certificate) goes to the caller."""
    context = None
    if config.certfile and config.keyfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile=str(config.certfile), keyfile=str(config.keyfile))
    family, addr = _family(config.host, config.port)
    metrics_app = make_wsgi_app(registry) if fast is None else split_app(make_wsgi_app, registry, fast)
    page = landing_page("moewatch exporter", [("/metrics", "Metrics")])
    app = route(metrics_app, page)
    if users:
        from moewatch.exporter.webconfig import with_basic_auth

        app = with_basic_auth(app, users)
    httpd = GuardedWSGIServer(addr, app, family=family, ssl_context=context)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.1,), name="moewatch-metrics", daemon=True)
    thread.start()
    port = int(httpd.server_address[1])
    _OWN_PORTS.add(port)
    scheme = "https" if config.certfile else "http"
    url = f"{scheme}://{_url_host(config.host)}:{port}/metrics"
    bound = httpd.server_address[0]
    where = " (all interfaces: reachable from other hosts)" if bound in ("0.0.0.0", "::") else ""
    auth = ", basic auth" if users else ""
    log.info("moewatch: serving Prometheus metrics at %s, bound to %s:%d%s%s", url, bound, port, where, auth)
    return MetricsServer(httpd, thread, config.host, port, url)
