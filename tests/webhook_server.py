"""A real HTTP server on loopback for alerting tests, with scripted faults.

Each POST takes the next scripted behaviour (then ``default``):
``("status", code, headers, body)``, ``("close",)`` (drop the connection without answering) or
``("hang",)`` (never answer until the server stops).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Hit", "WebhookServer", "ok", "status"]

Behaviour = tuple[Any, ...]


def ok(body: str = "ok") -> Behaviour:
    return ("status", 200, {}, body)


def status(code: int, body: str = "", headers: dict[str, str] | None = None) -> Behaviour:
    return ("status", code, headers or {}, body)


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: Any
    time: float
    answer: str  # "200", "500", "close", "hang", ...


class WebhookServer:
    def __init__(
        self, script: list[Behaviour] | None = None, default: Behaviour | None = None, port: int = 0
    ) -> None:
        self.script = list(script or [])
        self.default = default or ok()
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                with outer._lock:
                    act = outer.script.pop(0) if outer.script else outer.default
                    hit = Hit(self.path, dict(self.headers), body, time.time(), "")
                    outer.hits.append(hit)
                kind = act[0]
                if kind == "close":
                    hit.answer = "close"
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if kind == "hang":
                    hit.answer = "hang"
                    outer._release.wait()
                    self.close_connection = True
                    return
                _, code, headers, text = act
                hit.answer = str(code)
                data = text.encode()
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)  # port: come back where a stopped one was
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> WebhookServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def answered(self, code: int = 200) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.answer == str(code)]

    def wait_for(self, n: int, code: int = 200, timeout: float = 10.0) -> list[Hit]:
        """Wait until ``n`` requests got ``code``; returns them (possibly fewer on timeout)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.answered(code)
            if len(got) >= n:
                return got
            time.sleep(0.02)
        return self.answered(code)


# --- window reports built by hand, for engine and notifier tests --------------------------------------

T0 = 1_700_000_000.0
_REASONS = {
    "collapsed": ["load_cov 1.8 > 1 (collapsed)", "norm_entropy 0.31 < 0.5 (collapsed)"],
    "warning": ["load_cov 0.52 >= 0.35 (warning)"],
}
_COV = {"collapsed": 1.8, "warning": 0.52, "healthy": 0.08, "insufficient_data": 2.5}


def make_layer(i: int, state: str = "healthy", dead: tuple[int, ...] = (), nonfinite: int = 0, experts: int = 8):
    from moewatch.report import HealthState, LayerReport

    return LayerReport(
        index=i, module=f"model.layers.{i}.mlp.gate", family="test", num_experts=experts, top_k=2,
        tokens=640, assignments=1280, loads=[160] * experts, fair_share=160.0, load_cov=_COV[state],
        dead_experts=len(dead), dead_expert_ids=list(dead), dead_ratio=len(dead) / experts,
        norm_entropy=0.31 if state == "collapsed" else 0.97, nonfinite=nonfinite,
        state=HealthState(state), reasons=list(_REASONS.get(state, [])),
    )


def make_report(window: int, layers: list, run: str = "run-a", window_s: float = 10.0):
    from moewatch.health import worst
    from moewatch.report import WindowReport

    return WindowReport(
        run=run, window=window, step_start=window * 10, step_end=window * 10 + 10,
        time_start=T0 + window * window_s, time_end=T0 + (window + 1) * window_s, tokens=640,
        layers=layers, state=worst(layer.state for layer in layers),
    )
