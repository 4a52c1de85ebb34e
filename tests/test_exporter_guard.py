"""The exporter against idle, slow and concurrent clients on real sockets, with TLS on; and its routes."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

import moewatch
from moewatch.exporter import PrometheusConfig, PrometheusExporter
from tests.promhelpers import ToyMoE


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def _idle(port: int, n: int = 1) -> list[socket.socket]:
    """``n`` clients that connect and send nothing (no TLS ClientHello, no request)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def test_idle_tcp_client_blocks_neither_scrapes_nor_close_with_tls(cert: tuple[Path, Path]) -> None:
    c, k = cert
    ex = PrometheusExporter("guard", PrometheusConfig(host="127.0.0.1", port=0, certfile=c, keyfile=k))
    idle = _idle(ex.port, 3)
    try:
        time.sleep(0.3)  # the accept loop has taken them
        for _ in range(3):
            r = requests.get(ex.url, verify=str(c), timeout=3)  # prometheus-client's server: ReadTimeout here
            assert r.status_code == 200 and "moewatch_windows_total" in r.text
    finally:
        t0 = time.monotonic()
        ex.close()
        took = time.monotonic() - t0
        for s in idle:
            s.close()
    assert took < 2.0, f"close() took {took:.1f}s with idle clients connected"


def test_monitor_close_with_idle_tls_client(cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    c, k = cert
    for name, val in {
        "MOEWATCH_PROMETHEUS__PORT": "0", "MOEWATCH_PROMETHEUS__HOST": "127.0.0.1",
        "MOEWATCH_PROMETHEUS__CERTFILE": str(c), "MOEWATCH_PROMETHEUS__KEYFILE": str(k),
        "MOEWATCH_ALERTS__ENABLED": "false",
    }.items():
        monkeypatch.setenv(name, val)
    model = ToyMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = moewatch.attach(model, optimizer=opt, run_name="idle", window_steps=1, console={"enabled": False},
                            jsonl={"enabled": False})
    ex = watch.find_sink(PrometheusExporter)
    idle = _idle(ex.port)
    try:
        for _ in range(2):  # training goes on
            opt.zero_grad()
            model(torch.randn(32, 16)).backward()
            opt.step()
        r = requests.get(ex.url, verify=str(c), timeout=3)
        assert 'moewatch_windows_total{run="idle"} 2.0' in r.text
        t0 = time.monotonic()
        watch.close()
        took = time.monotonic() - t0
    finally:
        idle[0].close()
    assert took < 2.0, f"Monitor.close() took {took:.1f}s with an idle client connected"


def test_slow_client_is_cut_at_the_deadline(cert: tuple[Path, Path]) -> None:
    from moewatch.exporter.httpserver import GuardedWSGIServer

    ex = PrometheusExporter("slow", PrometheusConfig(host="127.0.0.1", port=0))
    httpd = ex._server.httpd
    assert isinstance(httpd, GuardedWSGIServer)
    httpd.connection_deadline = 1.0  # a slowloris trickling a byte at a time is shut down after this
    s = socket.create_connection(("127.0.0.1", ex.port), timeout=5)
    try:
        t0 = time.monotonic()
        closed = False
        for ch in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([ch]))
                time.sleep(0.1)
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        closed = True
                        break
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
            except OSError:
                closed = True
                break
        assert closed and time.monotonic() - t0 < 4
        assert httpd.reaped >= 1
    finally:
        s.close()
        ex.close()


def test_concurrent_scrapers_with_idle_clients(cert: tuple[Path, Path]) -> None:
    c, k = cert
    ex = PrometheusExporter("many", PrometheusConfig(host="127.0.0.1", port=0, certfile=c, keyfile=k))
    idle = _idle(ex.port, 8)
    codes: list[int] = []
    lock = threading.Lock()

    def scrape() -> None:
        for _ in range(3):
            try:
                code = requests.get(ex.url, verify=str(c), timeout=5).status_code
            except requests.RequestException:
                code = -1
            with lock:
                codes.append(code)

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for s in idle:
            s.close()
        ex.close()
    assert codes == [200] * 24


def test_routes() -> None:
    ex = PrometheusExporter("routes", PrometheusConfig(host="127.0.0.1", port=0))
    base = ex.url.rsplit("/", 1)[0]
    try:
        r = requests.get(base + "/metrics", timeout=5)
        assert r.status_code == 200 and "moewatch_windows_total" in r.text
        r = requests.get(base + "/", timeout=5)
        assert r.status_code == 200 and 'href="/metrics"' in r.text and "moewatch_windows_total" not in r.text
        for path in ("/healthz", "/metrics/x", "/foo"):
            r = requests.get(base + path, timeout=5)
            assert r.status_code == 404 and "moewatch_windows_total" not in r.text, path
    finally:
        ex.close()


def test_more_idle_clients_than_connection_slots_cannot_lock_scrapers_out(cert: tuple[Path, Path]) -> None:
    c, k = cert
    ex = PrometheusExporter("flood", PrometheusConfig(host="127.0.0.1", port=0, certfile=c, keyfile=k))
    slots = ex._server.httpd.max_connections
    idle = _idle(ex.port, slots + 8)  # every slot held, and more waiting
    try:
        time.sleep(0.5)
        for _ in range(3):
            r = requests.get(ex.url, verify=str(c), timeout=3)  # the oldest idle connection makes room
            assert r.status_code == 200
        assert ex._server.httpd.evicted >= 8
    finally:
        for s in idle:
            s.close()
        ex.close()
