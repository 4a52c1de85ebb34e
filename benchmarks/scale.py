"""moewatch at DeepSeek-V3 scale: 60 MoE layers x 256 experts, top-8.

Measures, on routers that really ran (transformers-style TopKRouters fed random tokens):

* window close: ``watch.flush()`` = pack the device buffers, one copy to the host, metrics, health, the
  report, and the sinks' ``emit`` (Prometheus exporter on, per-expert series on; console/jsonl/alerts off);
* one Prometheus scrape of the full exposition over HTTP (``GET /metrics`` from the exporter's own server)
  and of the collector alone (``generate_latest`` on its registry), per-expert series on;
* memory the monitor holds: its device buffers (O(layers x experts), nothing per token).

    python benchmarks/scale.py
    python benchmarks/scale.py --layers 60 --experts 256 --top-k 8 --repeats 20
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import urllib.request

import torch
from torch import nn

import moewatch


class Router(nn.Module):
    """transformers-style TopKRouter: returns ``(logits, scores, indices)``."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.randn(num_experts, dim) * dim**-0.5)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = nn.functional.linear(x_TD, self.weight)
        top_TK, idx_TK = torch.topk(torch.softmax(logits_TE, dim=-1), self.top_k, dim=-1)
        return logits_TE, top_TK, idx_TK


class Routers(nn.Module):
    def __init__(self, layers: int, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Router(dim, num_experts, top_k) for _ in range(layers))

    def forward(self, x_TD: torch.Tensor) -> None:
        for r in self.layers:
            r(x_TD)


def _ms(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"median {statistics.median(xs) * 1e3:.2f} ms [IQR {q[0] * 1e3:.2f}-{q[2] * 1e3:.2f}], n={len(xs)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512, help="tokens per router call")
    p.add_argument("--steps", type=int, default=2, help="steps (forwards of every router) per window")
    p.add_argument("--repeats", type=int, default=20, help="windows closed / scrapes timed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Routers(args.layers, 32, args.experts, args.top_k).to(device).train()
    x_TD = torch.randn(args.tokens, 32, device=device)
    watch = moewatch.attach(
        model, window_steps=10**9, run_name="scale", console={"enabled": False}, jsonl={"enabled": False},
        alerts={"enabled": False}, prometheus={"enabled": True, "host": "127.0.0.1", "port": 0, "per_expert": True},
    )
    exporter = next(s for s in watch.sinks if hasattr(s, "collector"))
    print(f"# {args.layers} layers x {args.experts} experts, top-{args.top_k}, {args.tokens} tokens per router call, "
          f"{args.steps} steps per window, {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    def scrape() -> tuple[float, bytes]:
        t = time.perf_counter()
        with urllib.request.urlopen(exporter.url, timeout=30) as resp:
            body = resp.read()
        return time.perf_counter() - t, body

    # The exporter renders the per-window part of the exposition once, at the first scrape after a window:
    # "cold" scrapes pay that, "warm" ones (every later scrape in the window) serve the cached bytes.
    close_s: list[float] = []
    cold_s: list[float] = []
    warm_s: list[float] = []
    body = b""
    with torch.no_grad():
        for _i in range(args.repeats + 2):
            for _ in range(args.steps):
                model(x_TD)
                watch.step()
            gc.collect()
            t = time.perf_counter()
            report = watch.flush()
            close_s.append(time.perf_counter() - t)
            cold, body = scrape()
            cold_s.append(cold)
            warm_s.append(scrape()[0])
    close_s, cold_s, warm_s = close_s[2:], cold_s[2:], warm_s[2:]  # first windows pay one-time costs
    assert len(report.layers) == args.layers and report.layers[0].tokens == args.steps * args.tokens

    from prometheus_client.exposition import generate_latest

    collect_s = []
    for _ in range(min(args.repeats, 5)):
        t = time.perf_counter()
        text = generate_latest(exporter.registry)
        collect_s.append(time.perf_counter() - t)
    lines = body.decode().splitlines()
    series = sum(1 for line in lines if line and not line.startswith("#"))
    per_expert = sum(1 for line in lines if line.startswith("moewatch_expert"))

    state = watch._acc.state_bytes()
    print(f"window close (flush: pack, copy, metrics, health, report, Prometheus emit): {_ms(close_s)}")
    print(f"scrape, first after a window (renders + serves) GET {exporter.url}: {_ms(cold_s)}")
    print(f"scrape, later in the window (cached bytes): {_ms(warm_s)}; {len(body) / 1e6:.2f} MB, {series} series "
          f"({per_expert} per-expert)")
    print(f"for reference, prometheus_client.generate_latest(registry) without moewatch's per-window cache: "
          f"{_ms(collect_s)}; {len(text) / 1e6:.2f} MB")
    print(f"monitor device buffers: {state / 1024:.1f} KiB = {args.layers} x ({args.experts} + 2) int64 + "
          f"{args.layers} x ({args.experts} + 3) float64; no per-token state")
    watch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
