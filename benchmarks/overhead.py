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
inside moewatch's router hooks and its optimizer post-hook on every step that does not end a window (the
monitor is strict there, so a sync stops the run).

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reference_models import WORKLOADS, NaiveMonitor, Workload, build_workload  # noqa: E402

import moewatch  # noqa: E402

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
    # Ratio of the variants' 10th-percentile block times: interference on a shared machine only ever slows a
    # block down, so the fastest blocks of each variant are the least disturbed (steadier than the median).
    fast_ratio: dict[str, float]
    peak_extra_bytes: dict[str, int]  # peak memory of a step above plain's
    monitor_state_bytes: int  # device buffers moewatch holds
    hook_us_per_step: float  # time inside moewatch's hooks per step, measured directly
    ops_per_router_call: float  # on average over a sampling period
    ops_sampled_call: int  # a call that also reads the probabilities
    ops_count_call: int  # a count-only call
    probs_every: int
    window_steps: int
    window_ends: int
    sync_check: str
    extra: dict[str, Any] = field(default_factory=dict)


def _bootstrap_median_ci(xs: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n_boot))
    return meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]


def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (``q`` in [0, 1])."""
    ys = sorted(xs)
    pos = q * (len(ys) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


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


def _arm_sync_debug(watch: moewatch.Monitor, device: torch.device, armed: list[bool]) -> list[Any]:
    """Run moewatch's own code under ``torch.cuda.set_sync_debug_mode("error")`` when ``armed[0]`` (steps that
    do not end a window): every router hook (a forward hook that runs before moewatch's arms, one after it
    disarms) and the optimizer post-hook's ``_advance``. The models' own syncs (transformers' expert loops
    call ``nonzero``) stay outside. The monitor must be strict, or it would swallow the error."""
    if device.type != "cuda":
        return []

    def arm(*_: Any) -> None:
        if armed[0]:
            torch.cuda.set_sync_debug_mode("error")

    def disarm(*_: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")

    handles = []
    for spec in watch._specs:
        handles.append(spec.hook_module.register_forward_hook(arm, prepend=True))
        handles.append(spec.hook_module.register_forward_hook(disarm))
    advance = watch._advance

    def guarded_advance() -> Any:
        arm()
        try:
            return advance()
        finally:
            disarm()

    watch._advance = guarded_advance  # type: ignore[method-assign]  # the optimizer post-hook calls this
    return handles


def _peak_extra_bytes(step: Callable[[], None], device: torch.device) -> int:
    """CUDA: peak bytes allocated during one step above what was allocated when it started."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


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


class FloorCounter:
    """The cheapest exact, crash-safe count there is, the floor moewatch's hooks are measured against: one
    forward hook per router that reads the indices through the same adapter (``spec.extract``), then one
    ``bucketize`` (invalid ids to edge columns) and one ``index_add_`` into a device buffer. Nothing else: no
    eval/checkpoint checks, no error handling, no probabilities, no window ends."""

    def __init__(self, specs: list[Any]) -> None:
        self.handles = []
        for spec in specs:
            e = spec.num_experts
            device = next(spec.hook_module.parameters()).device
            counts = torch.zeros(e + 2, dtype=torch.int64, device=device)
            edges = torch.arange(e + 1, device=device)
            one = torch.ones((), dtype=torch.int64, device=device)

            def hook(module: Any, args: Any, output: Any, spec: Any = spec, counts: Any = counts,
                     edges: Any = edges, one: Any = one) -> None:
                with torch.no_grad():
                    idx = spec.extract(module, args, output).indices_TK
                    cols = torch.bucketize(idx, edges, right=True).view(-1)
                    counts.index_add_(0, cols, one.expand(cols.shape[0]))

            self.handles.append(spec.hook_module.register_forward_hook(hook))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _timed_hooks_per_step(w: Workload, specs: list[Any], steps: int, offset: int) -> float:
    """Thread time inside the forward hooks registered between two timing hooks on every router, per step
    (µs); the same measurement as moewatch's in-hook time, for the floor counter."""
    spent, t_start, handles = [0.0], [0.0], []
    for spec in specs:
        handles.append(spec.hook_module.register_forward_hook(
            lambda *_: t_start.__setitem__(0, time.thread_time()), prepend=True))
        handles.append(spec.hook_module.register_forward_hook(
            lambda *_: spent.__setitem__(0, spent[0] + time.thread_time() - t_start[0])))
    try:
        for i in range(steps):
            w.step(offset + i)
    finally:
        for h in handles:
            h.remove()
    return spent[0] / steps * 1e6


#: Per-model defaults: (window_steps, blocks per variant, warm-up steps). A block is one window long, so every
#: monitored block holds exactly one window end (its last step).
DEFAULTS = {"demo": (100, 30, 100), "qwen3moe": (10, 30, 10), "moe64": (2, 6, 1)}


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> ModelResult:
    window_steps, blocks, warmup = DEFAULTS[name]
    window_steps = args.window_steps or window_steps
    steps_per_block = args.steps_per_block or window_steps
    blocks = args.blocks or blocks
    warmup = args.warmup if args.warmup is not None else warmup
    # One model, one optimizer: what differs between blocks is only what is attached (copies of a model
    # differ by a few % in speed on the CPU from memory placement alone, more than the effect measured).
    w = build_workload(name, device, seed=args.seed, scale=args.scale)
    clock = Clock(device)
    counter = [0]
    armed = [False]

    def attach(window: int = window_steps) -> moewatch.Monitor:
        # strict on CUDA: a sync-debug error inside a hook must stop the run, not disable the router.
        return moewatch.attach(w.model, optimizer=w.optimizer, window_steps=window,
                               run_name=f"bench-{name}", strict=device.type == "cuda",
                               **({} if args.probs_every is None else {"probs_every": args.probs_every}), **SINKS_OFF)

    def run_block(v: str, n: int) -> tuple[float, float, int]:
        watch = attach() if v == "moewatch" else None
        naive = NaiveMonitor(w.model) if v == "naive" else None
        debug = _arm_sync_debug(watch, device, armed) if watch is not None else []
        c0, w0 = clock.now()
        for _ in range(n):
            if watch is not None:
                armed[0] = (watch.step_count + 1) % window_steps != 0  # not a window end
            w.step(counter[0])
            counter[0] += 1
        c1, w1 = clock.now()
        ends = 0
        for h in debug:
            h.remove()
        if watch is not None:
            ends = watch._window
            watch.close()
        if naive is not None:
            naive.close()
        return (c1 - c0) / n, (w1 - w0) / n, ends

    for v in VARIANTS:
        run_block(v, warmup)
    per_step: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    window_ends = 0
    gc.collect()
    gc.disable()
    try:
        for b in range(blocks):
            order = VARIANTS[b % 3:] + VARIANTS[: b % 3]
            for v in order:
                cpu, wall, ends = run_block(v, steps_per_block)
                per_step[v].append((cpu, wall))
                window_ends += ends
            if args.verbose:
                print(f"  {name} block {b}: " + " ".join(f"{v}={per_step[v][-1][0] * 1e3:.2f}ms" for v in order),
                      flush=True)
    finally:
        gc.enable()

    k = 1 if device.type == "cuda" else 0
    ratios = {
        f"{v}/plain": _summarise([a[k] / p[k] for a, p in zip(per_step[v], per_step["plain"], strict=False)])
        for v in ("moewatch", "naive")
    }
    wall = {
        f"{v}/plain": statistics.median([a[1] / p[1] for a, p in zip(per_step[v], per_step["plain"], strict=False)])
        for v in ("moewatch", "naive")
    }
    step_ms = {v: statistics.median(x[k] for x in per_step[v]) * 1e3 for v in VARIANTS}
    fast = {v: _quantile([x[k] for x in per_step[v]], 0.1) for v in VARIANTS}
    fast_ratio = {f"{v}/plain": fast[v] / fast["plain"] for v in ("moewatch", "naive")}

    # Direct attribution, outside the A/B timing: time inside the hooks, memory, ops per router call.
    peaks = {"plain": _peak_extra_bytes(lambda: w.step(0), device)} if device.type == "cuda" else {}
    if peaks:
        naive = NaiveMonitor(w.model)
        peaks["naive"] = _peak_extra_bytes(lambda: w.step(0), device)
        naive.close()
    watch = attach()
    w.step(0)
    if peaks:
        peaks["moewatch"] = _peak_extra_bytes(lambda: w.step(0), device)
    n_hook_steps = max(2, min(50, 3 * window_steps))
    specs = [s for s in watch._specs if s.family not in ("megatron", "deepspeed")]  # indices-based routers
    # moewatch and the floor alternate in rounds, so drift hits both alike; the medians are compared.
    hook_rounds: dict[str, list[float]] = {"moewatch": [], "floor": []}
    for _ in range(3):
        hook_rounds["moewatch"].append(_hook_time_per_step(w, watch, n_hook_steps, counter[0]))
        watch.close()
        floor = FloorCounter(specs)
        w.step(0)
        hook_rounds["floor"].append(_timed_hooks_per_step(w, specs, n_hook_steps, counter[0]))
        floor.close()
        watch = attach()
        w.step(0)
    hook_us = statistics.median(hook_rounds["moewatch"])
    floor_us = statistics.median(hook_rounds["floor"])
    state = watch._acc.state_bytes()
    watch.close()
    watch = attach(window=10**9)
    probs_every = watch.config.probs_every
    w.step(0)  # allocates the buffers
    watch._acc.take_host_counts()  # as at a window end: the next call of each router is sampled
    ops_sampled, ops_count, transient = _count_update_ops(watch, w)  # steps that are not window ends
    watch.close()
    sync_check = "not run (CPU; see tests/test_no_sync.py)"
    if device.type == "cuda":
        sync_check = (f"0 syncs from moewatch on {blocks * steps_per_block - window_ends} non-window-end steps "
                      "(hooks and optimizer.step under sync_debug_mode='error')")
    return ModelResult(
        model=name,
        description=w.description,
        step_ms=step_ms,
        ratio=ratios,
        wall_ratio=wall,
        fast_ratio=fast_ratio,
        peak_extra_bytes={v: peaks[v] - peaks["plain"] for v in ("moewatch", "naive")} if peaks else {},
        monitor_state_bytes=state,
        hook_us_per_step=hook_us,
        ops_per_router_call=ops_count + (ops_sampled - ops_count) / probs_every,
        ops_sampled_call=ops_sampled,
        ops_count_call=ops_count,
        probs_every=probs_every,
        window_steps=window_steps,
        window_ends=window_ends,
        sync_check=sync_check,
        extra={"floor_hook_us_per_step": floor_us, "hook_vs_floor": hook_us / floor_us,
               "transient_bytes_per_router_call": transient, "blocks": blocks, "steps_per_block": steps_per_block, "warmup": warmup},
    )


def _count_update_ops(watch: moewatch.Monitor, w: Workload) -> tuple[int, int, int]:
    """Per router call, on the window's first step (its calls sample the probability statistics) and on the
    next (count-only, unless probs_every is 1): non-view aten ops moewatch issues, and the bytes of the
    tensors they return (every one of them is freed when the hook returns: an upper bound of its transient
    memory). Returns (ops of a sampled call, ops of a count-only call, transient bytes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    pkg = os.path.dirname(moewatch.__file__) + os.sep
    demo = os.path.join(pkg, "demo") + os.sep
    n, nbytes = [0], [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                f = sys._getframe(1)
                while f is not None:
                    fn = f.f_code.co_filename
                    if fn.startswith(pkg) and not fn.startswith(demo):
                        n[0] += 1
                        if isinstance(out, torch.Tensor) and not func.overloadpacket.__name__.endswith("_"):
                            nbytes[0] += out.numel() * out.element_size()
                        break
                    f = f.f_back
            return out

    calls = [0]
    hs = [s.hook_module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for s in watch._specs]
    per_call = []
    try:
        for i in range(2):
            n[0] = calls[0] = 0
            with Count():
                w.step(i)
            per_call.append(round(n[0] / max(calls[0], 1)))
    finally:
        for h in hs:
            h.remove()
    return per_call[0], per_call[1], round(nbytes[0] / max(2 * calls[0], 1))


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
    p.add_argument("--steps-per-block", type=int, default=0, help="steps per block (0: one window)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant")
    p.add_argument("--window-steps", type=int, default=0,
                   help="moewatch window length in optimizer steps (0: per-model default: demo 100, qwen3moe 10, "
                   "moe64 2)")
    p.add_argument("--scale", type=float, default=1.0, help="scale tokens per step (smoke tests use < 1)")
    p.add_argument("--probs-every", type=int, default=None,
                   help="moewatch probs_every: probability statistics on every Nth router call of a window "
                   f"(default: moewatch's, {moewatch.MoEWatchConfig.model_fields['probs_every'].default})")
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
    print(f"# clock: {clock}; one model per row, moewatch / naive attached for a block, removed after it; "
          "moewatch sinks off (console, jsonl, prometheus, alerts), window ends on")
    results = []
    for name in names:
        t0 = time.perf_counter()
        r = run_model(name, args, device)
        results.append(r)
        print(f"\n## {name}: {r.description}  ({time.perf_counter() - t0:.0f} s)")
        print("   step ms (median): " + ", ".join(f"{v} {ms:.3f}" for v, ms in r.step_ms.items()))
        for v in ("moewatch", "naive"):
            key = f"{v}/plain"
            print(f"   {key:<15} {_fmt_ratio(r.ratio[key])}  wall {r.wall_ratio[key]:.4f}  "
                  f"fastest-10% blocks {r.fast_ratio[key]:.4f}")
        print(f"   moewatch hooks: {r.hook_us_per_step:.1f} us/step measured inside the hooks "
              f"({r.hook_us_per_step / (r.step_ms['plain'] * 1e3) * 100:.2f}% of a plain step), "
              f"{r.ops_count_call} aten ops per router call, {r.ops_sampled_call} on the calls that sample the "
              f"probabilities (probs_every {r.probs_every}): {r.ops_per_router_call:.2f} on average")
        print(f"   floor counter (bucketize + index_add_ only): {r.extra['floor_hook_us_per_step']:.1f} us/step "
              f"in its hooks; moewatch / floor in-hook: {r.extra['hook_vs_floor']:.2f}x")
        mem = (f"peak step memory above plain: moewatch {r.peak_extra_bytes['moewatch'] / 1024:.1f} KiB, naive "
               f"{r.peak_extra_bytes['naive'] / 1024:.1f} KiB; " if r.peak_extra_bytes else "")
        print(f"   memory: {mem}moewatch buffers {r.monitor_state_bytes} B (O(layers x experts)), temporaries "
              f"<= {r.extra['transient_bytes_per_router_call'] / 1024:.1f} KiB per router call, freed when its hook "
              f"returns; {r.window_ends} window ends timed")
        print(f"   window_steps {r.window_steps}, {r.extra['blocks']} blocks x {r.extra['steps_per_block']} steps per "
              f"variant; syncs: {r.sync_check}")
    print("\n| model | window | plain ms/step | moewatch / plain, median [IQR] (95% CI) | naive / plain | "
          "in-hook us/step | floor in-hook us/step (moewatch / floor) | ops per router call (+ on sampled calls) | "
          "monitor memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m, nv = r.ratio["moewatch/plain"], r.ratio["naive/plain"]
        mem = f"{r.monitor_state_bytes} B buffers + {r.extra['transient_bytes_per_router_call'] / 1024:.1f} KiB/call"
        if r.peak_extra_bytes:
            mem += f"; peak +{r.peak_extra_bytes['moewatch'] / 1024:.0f} KiB"
        print(f"| {r.model} | {r.window_steps} | {r.step_ms['plain']:.2f} | {m.median:.4f} [{m.q1:.4f}-{m.q3:.4f}] "
              f"({m.ci_lo:.4f}-{m.ci_hi:.4f}) | {nv.median:.3f} [{nv.q1:.3f}-{nv.q3:.3f}] | "
              f"{r.hook_us_per_step:.0f} | {r.extra['floor_hook_us_per_step']:.0f} ({r.extra['hook_vs_floor']:.2f}x) | "
              f"{r.ops_count_call} (+{r.ops_sampled_call - r.ops_count_call} every "
              f"{r.probs_every}) | {mem} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "device": str(device), "clock": clock,
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
