"""A small WSGI server for /metrics that no client can stall.

prometheus-client's server wraps its listening socket in TLS, so the handshake of every connection runs in
the accept loop without a timeout: one idle TCP client blocks every scrape and ``shutdown()``. Here the
accept loop only accepts; each connection gets a daemon thread (at most ``max_connections`` at once; when
all are taken the oldest connection is shut down to make room, so idle clients cannot lock scrapers out;
never more than twice that many threads) that does the TLS
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
        self._waiters = threading.BoundedSemaphore(max_connections)
        # id(accepted socket) -> [accepted at, the socket to shut down (the TLS one once wrapped), evicted]
        self._active: dict[int, list[Any]] = {}
        self._lock = threading.Lock()
        self.refused = 0  # connections closed at once because every slot was taken
        self.reaped = 0  # connections shut down at the deadline
        self.evicted = 0  # oldest connections shut down to make room for a new one
        super().__init__(address, handler)
        self.set_app(app)

    # --- the accept loop (serve_forever's thread) ----------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Every slot is taken (idle or hostile clients?): shut the oldest connection down, so holding
            # connections open cannot lock scrapers out, and let this one wait briefly for its slot in its
            # own thread. At most max_connections such waiters; beyond that a new connection is closed.
            if not self._waiters.acquire(blocking=False):
                self.refused += 1
                self.shutdown_request(request)
                return
            self._evict_oldest()
            threading.Thread(target=self._wait_then_handle, args=(request, client_address), daemon=True).start()
            return
        with self._lock:
            self._active[id(request)] = [time.monotonic(), request, False]
        threading.Thread(target=self._handle, args=(request, client_address), daemon=True).start()

    def _evict_oldest(self) -> None:
        with self._lock:
            live = [e for e in self._active.values() if not e[2]]
            oldest = min(live, key=lambda e: e[0], default=None)
            if oldest is not None:
                oldest[2] = True  # not chosen twice
        if oldest is not None:
            self.evicted += 1
            _shutdown(oldest[1])

    def _wait_then_handle(self, request: socket.socket, client_address: Any) -> None:
        end = time.monotonic() + self.handshake_timeout
        try:
            got = False
            while not got and time.monotonic() < end:
                got = self._slots.acquire(timeout=0.2)
                if not got:
                    self._evict_oldest()  # the last eviction did not free a slot (yet): take another
        finally:
            self._waiters.release()
        if not got:
            self.refused += 1
            self.shutdown_request(request)
            return
        with self._lock:
            self._active[id(request)] = [time.monotonic(), request, False]
        self._handle(request, client_address)

    def service_actions(self) -> None:
        """Called by serve_forever about every 0.5 s: shut down connections past their deadline."""
        now = time.monotonic()
        with self._lock:
            late = [e for e in self._active.values() if now - e[0] > self.connection_deadline and not e[2]]
            for e in late:
                e[2] = True
        for e in late:
            self.reaped += 1
            _shutdown(e[1])  # a blocked recv/handshake in the handler returns now

    # --- one connection (its own thread) -------------------------------------------------------------

    def _handle(self, request: socket.socket, client_address: Any) -> None:
        conn: socket.socket = request
        try:
            request.settimeout(self.handshake_timeout)
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
                with self._lock:  # wrapping detached ``request``: shut the TLS socket down from now on
                    entry = self._active.get(id(request))
                    if entry is not None:
                        entry[1] = conn
                    evicted = entry is None or entry[2]
                if evicted:
                    return
                conn.do_handshake()  # bounded by handshake_timeout
            self.finish_request(conn, client_address)
        except (OSError, ValueError) as exc:  # timeouts, resets, TLS errors: the client's problem
            log.debug("moewatch: exporter connection from %s ended: %s", client_address, type(exc).__name__)
        except Exception:  # noqa: BLE001 - a handler bug must not take the thread's slot for good
            log.exception("moewatch: exporter request from %s failed", client_address)
        finally:
            with self._lock:
                self._active.pop(id(request), None)
            self.shutdown_request(conn)
            self._slots.release()


def _shutdown(sock: socket.socket) -> None:
    try:
        # The plain socket's shutdown, also for a TLS socket (whose own shutdown() drops its SSL object
        # under the thread that is using it): a recv or handshake blocked on the descriptor returns.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


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
