"""Training-step overhead of moewatch, measured A/B in one process.

For every reference model (see ``reference_models.py``) three identical copies are trained side by side on
the same batches: ``plain`` (nothing attached), ``moewatch`` (``moewatch.attach(model, optimizer=opt)``, every
sink off except the window ends themselves) and ``naive`` (the seed's four metrics every step with host
syncs). Blocks of ``--steps-per-block`` steps run in rotating order (P M N, M N P, N P M, ...) so that machine
drift hits every variant alike; each block pair gives one ratio and the table reports the median ratio with
its interquartile range and a bootstrap 95% confidence interval of the median.

CPU time (``time.thread_time``, one intra-op thread by default) is the primary clock on the CPU: on a shared
machine it does not count the time other processes hold the core. On CUDA the clock is wall time between
``torch.cuda.synchronize()`` calls at block edges, and ``torch.cuda.set_sync_debug_mode("error")`` is armed
inside moewatch's hooks and around ``optimizer.step()`` on every step that does not end a window.

    python benchmarks/overhead.py                       # all models, CPU
    python benchmarks/overhead.py --models demo --blocks 60
    python benchmarks/overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moewatch  # noqa: E402
from reference_models import WORKLOADS, NaiveMonitor, Workload, build_workload  # noqa: E402

SINKS_OFF: dict[str, Any] = {
    "console": {"enabled": False},
    "jsonl": {"enabled": False},
    "prometheus": {"enabled": False},
    "alerts": {"enabled": False},
}
VARIANTS = ("plain", "moewatch", "naive")


@dataclass
class Ratio:
    median: float
    q1: float
    q3: float
    ci_lo: float
    ci_hi: float
    n: int


@dataclass
class ModelResult:
    model: str
    description: str
    step_ms: dict[str, float]  # median ms per step, per variant
    ratio: dict[str, Ratio]  # moewatch/plain and naive/plain
    wall_ratio: dict[str, float]  # the same medians on wall-clock time
    peak_extra_bytes: dict[str, int]  # peak memory of a step above plain's
    monitor_state_bytes: int  # device buffers moewatch holds
    hook_us_per_step: float  # time inside moewatch's hooks per step, measured directly
    ops_per_router_call: int
    window_steps: int
    window_ends: int
    sync_check: str
    extra: dict[str, Any] = field(default_factory=dict)


def _bootstrap_median_ci(xs: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n_boot))
    return meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]


def _summarise(ratios: list[float]) -> Ratio:
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    lo, hi = _bootstrap_median_ci(ratios)
    return Ratio(statistics.median(ratios), q[0], q[2], lo, hi, len(ratios))


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()  # CPU-GPU sync: block edges only, outside the timed steps' own work
        return time.thread_time(), time.perf_counter()


@contextmanager
def _sync_debug(device: torch.device, on: bool) -> Iterator[None]:
    if device.type != "cuda" or not on:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _arm_sync_debug_in_hooks(watch: moewatch.Monitor, device: torch.device, armed: list[bool]) -> list[Any]:
    """Make every router call run moewatch's hook under sync-debug "error": a forward hook that runs before
    moewatch's arms it, one that runs after disarms it. ``armed[0]`` False (window-end steps) skips it."""
    if device.type != "cuda":
        return []
    handles = []
    for spec in watch._specs:
        def before(*_: Any) -> None:
            if armed[0]:
                torch.cuda.set_sync_debug_mode("error")

        def after(*_: Any) -> None:
            torch.cuda.set_sync_debug_mode("default")

        handles.append(spec.hook_module.register_forward_hook(before, prepend=True))
        handles.append(spec.hook_module.register_forward_hook(after))
    return handles


def _peak_extra_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during one step, above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Allocations are attributed to the ops that made them (self memory), frees after them to "[memory]".
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def _hook_time_per_step(w: Workload, watch: moewatch.Monitor, steps: int, offset: int) -> float:
    """Thread time spent in moewatch's router hooks (adapter + update) and its optimizer step hook, per step
    (µs): timing hooks run right before and right after moewatch's own on every router."""
    spent = [0.0]
    t_start = [0.0]
    handles = []
    for spec in watch._specs:
        handles.append(spec.hook_module.register_forward_hook(
            lambda *_: t_start.__setitem__(0, time.thread_time()), prepend=True))
        handles.append(spec.hook_module.register_forward_hook(
            lambda *_: spent.__setitem__(0, spent[0] + time.thread_time() - t_start[0])))
    orig_advance = type(watch)._advance

    def advance(self: Any) -> Any:
        t = time.thread_time()
        r = orig_advance(self)
        spent[0] += time.thread_time() - t
        return r

    type(watch)._advance = advance  # type: ignore[method-assign]
    try:
        for i in range(steps):
            w.step(offset + i)
    finally:
        type(watch)._advance = orig_advance  # type: ignore[method-assign]
        for h in handles:
            h.remove()
    return spent[0] / steps * 1e6


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> ModelResult:
    steps_per_block = args.steps_per_block or {"demo": 20, "qwen3moe": 4, "moe64": 1}[name]
    blocks = args.blocks or {"demo": 40, "qwen3moe": 24, "moe64": 8}[name]
    warmup = args.warmup if args.warmup is not None else {"demo": 30, "qwen3moe": 5, "moe64": 1}[name]
    wl = {v: build_workload(name, device, seed=args.seed, scale=args.scale) for v in VARIANTS}
    for v in VARIANTS[1:]:  # identical copies: same weights, same optimizer state, same batches
        wl[v].model.load_state_dict(wl["plain"].model.state_dict())
    watch = moewatch.attach(wl["moewatch"].model, optimizer=wl["moewatch"].optimizer,
                            window_steps=args.window_steps, run_name=f"bench-{name}", **SINKS_OFF)
    naive = NaiveMonitor(wl["naive"].model)
    armed = [True]
    debug_handles = _arm_sync_debug_in_hooks(watch, device, armed)
    clock = Clock(device)
    counter = {v: 0 for v in VARIANTS}

    def step(v: str) -> None:
        i = counter[v]
        counter[v] += 1
        if v == "moewatch" and device.type == "cuda":
            armed[0] = (watch.step_count + 1) % args.window_steps != 0  # not a window end
            with _sync_debug(device, armed[0]):
                wl[v].step(i)
        else:
            wl[v].step(i)

    for v in VARIANTS:
        for _ in range(warmup):
            step(v)
    per_step: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    gc.collect()
    gc.disable()
    try:
        for b in range(blocks):
            order = VARIANTS[b % 3:] + VARIANTS[: b % 3]
            for v in order:
                c0, w0 = clock.now()
                for _ in range(steps_per_block):
                    step(v)
                c1, w1 = clock.now()
                per_step[v].append(((c1 - c0) / steps_per_block, (w1 - w0) / steps_per_block))
            if args.verbose:
                print(f"  {name} block {b}: " + " ".join(f"{v}={per_step[v][-1][0] * 1e3:.2f}ms" for v in order),
                      flush=True)
    finally:
        gc.enable()
    window_ends = watch._window
    for h in debug_handles:
        h.remove()

    cpu_or_wall = 1 if device.type == "cuda" else 0
    ratios = {
        f"{v}/plain": _summarise([a[cpu_or_wall] / p[cpu_or_wall] for a, p in zip(per_step[v], per_step["plain"])])
        for v in ("moewatch", "naive")
    }
    wall = {
        f"{v}/plain": statistics.median([a[1] / p[1] for a, p in zip(per_step[v], per_step["plain"])])
        for v in ("moewatch", "naive")
    }
    step_ms = {v: statistics.median(x[cpu_or_wall] for x in per_step[v]) * 1e3 for v in VARIANTS}

    # Direct attribution: time inside the hooks, memory, ops per router call (not part of the A/B timing).
    hook_us = _hook_time_per_step(wl["moewatch"], watch, max(3, min(20, blocks)), counter["moewatch"])
    peaks = {v: _peak_extra_bytes(lambda v=v: wl[v].step(0), device) for v in VARIANTS}
    acc = watch._acc
    state = sum(b.counts_LE1.numel() * 8 + b.stats_LS.numel() * 8 + 8 for b in acc._bufs.values())
    ops = _count_update_ops(watch, wl["moewatch"])
    sync_check = "not run (CPU: see tests/test_no_sync.py)"
    if device.type == "cuda":
        sync_check = f"0 syncs from moewatch on {blocks * steps_per_block - window_ends} non-window-end steps " \
                     "(sync_debug_mode=error)"
    watch.close()
    naive.close()
    return ModelResult(
        model=name,
        description=wl["plain"].description,
        step_ms=step_ms,
        ratio=ratios,
        wall_ratio=wall,
        peak_extra_bytes={v: peaks[v] - peaks["plain"] for v in ("moewatch", "naive")},
        monitor_state_bytes=state,
        hook_us_per_step=hook_us,
        ops_per_router_call=ops,
        window_steps=args.window_steps,
        window_ends=window_ends,
        sync_check=sync_check,
        extra={"blocks": blocks, "steps_per_block": steps_per_block, "warmup": warmup},
    )


def _count_update_ops(watch: moewatch.Monitor, w: Workload) -> int:
    """Non-view aten ops moewatch issues per router call, counted on one training forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    pkg = os.path.dirname(moewatch.__file__) + os.sep
    demo = os.path.join(pkg, "demo") + os.sep
    n = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if not func.is_view:
                f = sys._getframe(1)
                while f is not None:
                    fn = f.f_code.co_filename
                    if fn.startswith(pkg) and not fn.startswith(demo):
                        n[0] += 1
                        break
                    f = f.f_back
            return func(*args, **(kwargs or {}))

    calls = [0]
    hs = [s.hook_module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for s in watch._specs]
    try:
        with Count():
            w.step(0)
    finally:
        for h in hs:
            h.remove()
    # The step's own optimizer post-hook issues no ops off window ends; all counted ops are router calls.
    return round(n[0] / max(calls[0], 1))


def _fmt_ratio(r: Ratio) -> str:
    return f"{r.median:.4f} [IQR {r.q1:.4f}-{r.q3:.4f}; 95% CI {r.ci_lo:.4f}-{r.ci_hi:.4f}]"


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,moe64,qwen3moe", help=f"comma list of {sorted(WORKLOADS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1)")
    p.add_argument("--blocks", type=int, default=0, help="A/B blocks per variant (0: per-model default)")
    p.add_argument("--steps-per-block", type=int, default=0, help="steps per block (0: per-model default)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant")
    p.add_argument("--window-steps", type=int, default=100, help="moewatch window length in optimizer steps "
                   "(100, the library default)")
    p.add_argument("--scale", type=float, default=1.0, help="scale tokens per step (smoke tests use < 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--verbose", action="store_true", help="print every block")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {sorted(WORKLOADS)}")

    machine = _machine(device)
    clock = "wall (CUDA-synchronised per block)" if device.type == "cuda" else "thread CPU time"
    print(f"# moewatch step overhead on {device}: {machine}")
    print(f"# clock: {clock}; window_steps={args.window_steps}; sinks off (console, jsonl, prometheus, alerts)")
    results = []
    for name in names:
        t0 = time.perf_counter()
        r = run_model(name, args, device)
        results.append(r)
        print(f"\n## {name}: {r.description}  ({time.perf_counter() - t0:.0f} s)")
        print(f"   step ms (median): " + ", ".join(f"{v} {ms:.3f}" for v, ms in r.step_ms.items()))
        print(f"   moewatch/plain  {_fmt_ratio(r.ratio['moewatch/plain'])}  wall {r.wall_ratio['moewatch/plain']:.4f}")
        print(f"   naive/plain     {_fmt_ratio(r.ratio['naive/plain'])}  wall {r.wall_ratio['naive/plain']:.4f}")
        print(f"   moewatch hooks: {r.hook_us_per_step:.1f} us/step measured inside the hooks "
              f"({r.hook_us_per_step / (r.step_ms['plain'] * 1e3) * 100:.2f}% of a plain step), "
              f"{r.ops_per_router_call} aten ops per router call")
        print(f"   peak memory above plain: moewatch {r.peak_extra_bytes['moewatch'] / 1024:.1f} KiB, naive "
              f"{r.peak_extra_bytes['naive'] / 1024:.1f} KiB; monitor buffers {r.monitor_state_bytes} B; "
              f"{r.window_ends} window ends")
        print(f"   syncs: {r.sync_check}")
    print("\n| model | plain ms/step | moewatch / plain (median [IQR]) | naive / plain | in-hook us/step | "
          "ops/router call | peak mem +moewatch | monitor buffers |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        m, nv = r.ratio["moewatch/plain"], r.ratio["naive/plain"]
        print(f"| {r.model} | {r.step_ms['plain']:.2f} | {m.median:.4f} [{m.q1:.4f}-{m.q3:.4f}] "
              f"(CI {m.ci_lo:.4f}-{m.ci_hi:.4f}) | {nv.median:.3f} [{nv.q1:.3f}-{nv.q3:.3f}] | "
              f"{r.hook_us_per_step:.0f} | {r.ops_per_router_call} | "
              f"{r.peak_extra_bytes['moewatch'] / 1024:.0f} KiB | {r.monitor_state_bytes} B |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "device": str(device), "clock": clock,
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
