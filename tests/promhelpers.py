"""Test helpers for the Prometheus tests: free ports, real Prometheus / Pushgateway processes, a toy MoE.

Binaries come from Debian's ``prometheus``, ``prometheus-pushgateway`` and ``prometheus-alertmanager``
packages. Under ``CI=true`` a missing binary fails the test; locally it skips with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import torch
import yaml
from torch import nn

from moewatch.report import HealthState, LayerReport, WindowReport
from tests.ci import missing

__all__ = [
    "ToyMoE",
    "free_port",
    "layer_report",
    "managed_process",
    "prom_query",
    "require_binary",
    "start_prometheus",
    "start_pushgateway",
    "wait_until",
    "window_report",
]

REPO = Path(__file__).resolve().parents[1]
_PUSHGATEWAY_NAMES = ("prometheus-pushgateway", "pushgateway")


def require_binary(
    *names: str, hint: str = "apt-get install prometheus prometheus-pushgateway prometheus-alertmanager"
) -> str:
    """The first of ``names`` on PATH, or :func:`tests.ci.missing` (skip locally, fail under CI=true)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    missing(f"{' / '.join(names)} not found on PATH ({hint}; .ci/run installs it)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retry until the deadline
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last_exc!r}" if last_exc else "")
    )


def _default_sigint() -> None:
    # A test suite started in the background (nohup, `&`) inherits SIGINT ignored, and Python then never
    # raises KeyboardInterrupt: children that a test stops with SIGINT get the default disposition back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def managed_process(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a process in its own process group; on exit terminate the group (kill after 10 s)."""
    log_fh = log_path.open("wb")
    proc = subprocess.Popen(
        list(argv), stdout=log_fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
        preexec_fn=_default_sigint,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            except ProcessLookupError:
                pass
        log_fh.close()


def _ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@contextmanager
def start_prometheus(
    tmp: Path,
    targets: Sequence[str],
    rule_files: Sequence[Path] = (),
    job: str = "moewatch",
    interval: str = "1s",
) -> Iterator[str]:
    """A real Prometheus on loopback scraping ``targets`` (host:port) every ``interval``; yields its URL."""
    binary = require_binary("prometheus")
    port = free_port()
    cfg = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    argv = [
        binary,
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]
    url = f"http://127.0.0.1:{port}"
    with managed_process(argv, tmp / "prometheus.log") as proc:
        wait_until(
            lambda: _ready(url + "/-/ready", proc, tmp / "prometheus.log"), 30, what="Prometheus ready"
        )
        yield url


@contextmanager
def start_pushgateway(tmp: Path) -> Iterator[str]:
    binary = require_binary(*_PUSHGATEWAY_NAMES)
    port = free_port()
    argv = [binary, f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    url = f"http://127.0.0.1:{port}"
    with managed_process(argv, tmp / "pushgateway.log") as proc:
        wait_until(
            lambda: _ready(url + "/-/ready", proc, tmp / "pushgateway.log"), 30, what="Pushgateway ready"
        )
        yield url


def prom_query(base: str, expr: str) -> list[dict[str, Any]]:
    r = requests.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
    body = r.json()
    assert body.get("status") == "success", f"query {expr!r} failed: {body}"
    return body["data"]["result"]


# --- reports and a toy MoE ------------------------------------------------------------------


def layer_report(
    index: int, loads: list[int], state: HealthState = HealthState.HEALTHY, **kw: Any
) -> LayerReport:
    e = len(loads)
    total = sum(loads)
    fields: dict[str, Any] = dict(
        index=index,
        module=f"model.layers.{index}.mlp.gate",
        family="toy",
        num_experts=e,
        top_k=2,
        tokens=total // 2,
        assignments=total,
        loads=loads,
        fair_share=total / e,
        state=state,
    )
    fields.update(kw)
    return LayerReport(**fields)


def window_report(
    layers: list[LayerReport], window: int = 0, run: str = "r1", steps: int = 10
) -> WindowReport:
    worst = max((layer.state for layer in layers), key=lambda s: s.severity)
    return WindowReport(
        run=run,
        window=window,
        step_start=window * steps,
        step_end=(window + 1) * steps,
        time_start=1000.0 + 10 * window,
        time_end=1010.0 + 10 * window,
        tokens=layers[0].tokens,
        layers=layers,
        state=worst,
    )


class ToyTopKRouter(nn.Module):
    """Shaped like a transformers 5.x ``*TopKRouter``: returns (logits, top-k scores, top-k indices)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.randn(num_experts, hidden) * 0.1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = x @ self.weight.t()
        scores, idx = torch.topk(logits.softmax(-1), self.top_k, dim=-1)
        return logits, scores, idx


class ToyMoE(nn.Module):
    def __init__(self, layers: int = 2, hidden: int = 16, num_experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.gates = nn.ModuleList(ToyTopKRouter(hidden, num_experts, top_k) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(())
        for gate in self.gates:
            _, scores, _ = gate(x)
            out = out + scores.sum()
        return out
