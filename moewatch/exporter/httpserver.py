"""A small WSGI server for /metrics that no client can stall.

prometheus-client's server wraps its listening socket in TLS, so the handshake of every connection runs in
the accept loop without a timeout: one idle TCP client blocks every scrape and ``shutdown()``. Here the
accept loop only accepts; each connection gets a daemon thread (at most ``max_connections`` at once; beyond
that a new connection is closed at once and counted, never queued behind slow ones) that does the TLS
handshake with ``handshake_timeout`` and reads the request with a per-read ``request_timeout``; a
connection still open ``connection_deadline`` seconds after it was accepted (a slowloris trickling bytes)
is shut down by the accept loop. The listen backlog is ``backlog`` (prometheus-client's 5 made eight
concurrent scrapers wait). ``shutdown()`` never waits for a client.

Routes: ``/metrics`` the exposition, ``/`` a small landing page, anything else 404.
"""

from __future__ import annotations

import html
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

__all__ = ["GuardedWSGIServer", "landing_page", "route"]

log = logging.getLogger(__name__)

WSGIApp = Callable[..., Iterable[bytes]]


class _QuietHandler(WSGIRequestHandler):
    timeout: float | None = 10.0  # per read/write; StreamRequestHandler.setup applies it (set per server)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class GuardedWSGIServer(WSGIServer):
    """See the module docstring. ``ssl_context`` (server side) turns on TLS."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        app: WSGIApp,
        *,
        family: int = socket.AF_INET,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 32,
        handshake_timeout: float = 5.0,
        request_timeout: float = 10.0,
        connection_deadline: float = 30.0,
        backlog: int = 128,
    ) -> None:
        self.address_family = family
        self.request_queue_size = backlog
        handler = type("_Handler", (_QuietHandler,), {"timeout": request_timeout})
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.connection_deadline = connection_deadline
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._active: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self.refused = 0  # connections closed at once because every slot was taken
        self.reaped = 0  # connections shut down at the deadline
        super().__init__(address, handler)
        self.set_app(app)

    # --- the accept loop (serve_forever's thread) ----------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            log.debug("moewatch: exporter: %d connections open; closing a new one", self.max_connections)
            self.shutdown_request(request)
            return
        with self._lock:
            self._active[request] = time.monotonic()
        threading.Thread(target=self._handle, args=(request, client_address), daemon=True).start()

    def service_actions(self) -> None:
        """Called by serve_forever about every 0.5 s: shut down connections past their deadline."""
        now = time.monotonic()
        with self._lock:
            late = [s for s, t in self._active.items() if now - t > self.connection_deadline]
        for sock in late:
            self.reaped += 1
            try:
                sock.shutdown(socket.SHUT_RDWR)  # a blocked recv/handshake in the handler returns now
            except OSError:
                pass

    # --- one connection (its own thread) -------------------------------------------------------------

    def _handle(self, request: socket.socket, client_address: Any) -> None:
        conn: socket.socket = request
        try:
            request.settimeout(self.handshake_timeout)
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(request, server_side=True)  # handshake, bounded
            self.finish_request(conn, client_address)
        except (OSError, ValueError) as exc:  # timeouts, resets, TLS errors: the client's problem
            log.debug("moewatch: exporter connection from %s ended: %s", client_address, type(exc).__name__)
        except Exception:  # noqa: BLE001 - a handler bug must not take the thread's slot for good
            log.exception("moewatch: exporter request from %s failed", client_address)
        finally:
            with self._lock:
                self._active.pop(request, None)
            self.shutdown_request(conn)
            self._slots.release()


def landing_page(title: str, links: list[tuple[str, str]]) -> bytes:
    items = "".join(f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>' for href, text in links)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><ul>{items}</ul></body></html>\n"
    ).encode()


def route(metrics_app: WSGIApp, landing: bytes) -> WSGIApp:
    """``/metrics`` -> ``metrics_app``, ``/`` -> ``landing``, else 404."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/":
            body, status, ctype = landing, "200 OK", "text/html; charset=utf-8"
        else:
            body, status, ctype = b"404 page not found; metrics are at /metrics\n", "404 Not Found", "text/plain"
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return app
