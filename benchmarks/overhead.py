"""Training-step overhead of moewatch, measured A/B in one process.

For every reference model (see ``reference_models.py``) one model and one optimizer are trained in blocks of
``--steps-per-block`` steps (one moewatch window by default), each block with one variant attached:
``plain`` (nothing), ``moewatch`` (``moewatch.attach(model, optimizer=opt)``, every sink off except the window
ends themselves) and ``naive`` (the seed's four metrics every step with host syncs). With ``--compile``
two more: ``compiled`` (``torch.compile(model)``, nothing attached) and ``compiled+moewatch`` (moewatch
attached before compiling, so its hooks are traced into the graph). Blocks run in rotating order
(P M N, M N P, N P M, ...) so that machine drift hits every variant alike; each round of blocks gives one
ratio per variant pair and the table reports the median ratio with its interquartile range and a bootstrap
95% confidence interval of the median.

CPU time (``time.thread_time``, one intra-op thread by default) is the primary clock on the CPU: on a shared
machine it does not count the time other processes hold the core. On CUDA the clock is wall time between
``torch.cuda.synchronize()`` calls at block edges, and ``torch.cuda.set_sync_debug_mode("error")`` is armed
inside moewatch's eager router hooks and its optimizer post-hook on every step that does not end a window
(the monitor is strict there, so a sync stops the run; compiled router hooks are part of the graph, where
``tests/test_no_sync.py`` checks them).

Besides the A/B blocks, the time inside the router hooks is measured directly, on the same router calls as a
floor counter's (``FloorCounter``: the same count kernels and nothing else; the two hooks swap places every
step), for count-only calls and for calls that sample the probability statistics, and combined at moewatch's
default sampling, as the median over processes (this one and ``--hook-processes`` - 1 fresh ones: one
process's figure moves with its memory layout); window ends are timed apart. With ``--compile``, moewatch's
cost inside the compiled graph is timed per router (``_router_graph_rounds``: each router module compiled
alone on its own inputs, with and without the hooks) and, as a cross-check, in whole compiled forwards
(``_in_graph_rounds``; two compilations of a model can differ in speed by more than moewatch adds), and the
compiled ratio is modeled from the parts.

    python benchmarks/overhead.py                       # all models, eager, CPU (about 6 min on 2 cores)
    python benchmarks/overhead.py --compile             # + compiled variants (inductor; about 14 min)
    python benchmarks/overhead.py --models demo --blocks 60
    python benchmarks/overhead.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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
from moewatch.accumulator import _CLAMP_FROM  # noqa: E402
from moewatch.monitor import _ATTACHED  # noqa: E402

SINKS_OFF: dict[str, Any] = {
    "console": {"enabled": False},
    "jsonl": {"enabled": False},
    "prometheus": {"enabled": False},
    "alerts": {"enabled": False},
}
VARIANTS = ("plain", "moewatch", "naive")
COMPILED = ("compiled", "compiled+moewatch")
#: (variant, baseline) pairs whose per-round block ratios are reported.
PAIRS = (("moewatch", "plain"), ("naive", "plain"), ("compiled+moewatch", "compiled"))
DEFAULT_WINDOW = moewatch.MoEWatchConfig.model_fields["window_steps"].default
DEFAULT_PROBS_EVERY = moewatch.MoEWatchConfig.model_fields["probs_every"].default


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
    ratio: dict[str, Ratio]  # moewatch/plain, naive/plain (and compiled+moewatch/compiled)
    wall_ratio: dict[str, float]  # the same medians on wall-clock time
    # Ratio of the variants' 10th-percentile block times: interference on a shared machine only ever slows a
    # block down, so the fastest blocks of each variant are the least disturbed (steadier than the median).
    fast_ratio: dict[str, float]
    peak_extra_bytes: dict[str, int]  # peak memory of a step above plain's
    monitor_state_bytes: int  # device buffers moewatch holds
    # Time inside moewatch's router hooks per step (µs) at moewatch's default sampling (window 100 steps,
    # probabilities on every probs_every-th call of a window from its first), window ends excluded: count-only
    # calls plus the sampled share of the extra cost of a sampled call (both measured, see extra).
    hook_us_per_step: float
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


def _arm_sync_debug(
    watch: moewatch.Monitor, device: torch.device, armed: list[bool], router_hooks: bool = True
) -> Callable[[], None]:
    """Run moewatch's own code under ``torch.cuda.set_sync_debug_mode("error")`` when ``armed[0]`` (steps that
    do not end a window): every router hook (a forward hook that runs before moewatch's arms, one after it
    disarms; not under torch.compile, where they would be traced) and the optimizer post-hook's ``_advance``.
    The models' own syncs (transformers' expert loops call ``nonzero``) stay outside. The monitor must be
    strict, or it would swallow the error. Returns the function that takes it all off again."""
    if device.type != "cuda":
        return lambda: None

    def arm(*_: Any) -> None:
        if armed[0]:
            torch.cuda.set_sync_debug_mode("error")

    def disarm(*_: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")

    handles = []
    for spec in watch._specs if router_hooks else []:
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

    def remove() -> None:
        for h in handles:
            h.remove()
        del watch._advance  # back to the method

    return remove


def _peak_extra_bytes(step: Callable[[], None], device: torch.device) -> int:
    """CUDA: peak bytes allocated during one step above what was allocated when it started."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class FloorCounter:
    """The cheapest exact, crash-safe count there is, the floor moewatch's hooks are measured against: one
    forward hook per router that reads the indices through the same adapter (``spec.extract``), maps them to
    columns with invalid ids in the edge columns and adds them into a device buffer, with the kernels
    moewatch's eager count uses (``bucketize`` + ``index_add_``; on the CPU from ``_CLAMP_FROM`` ids on
    ``add`` + ``clamp_`` + ``index_add_``, where CPU ``bucketize`` costs 15-30 ns per id) and its cheapest
    host side (grad mode switched without a context manager, the ``index_add_`` source view made once per
    size). Nothing else: no eval/checkpoint checks, no error handling, no probabilities, no window ends."""

    def __init__(self, specs: list[Any]) -> None:
        self.handles = []
        set_grad_enabled, is_grad_enabled = torch._C._set_grad_enabled, torch.is_grad_enabled
        for spec in specs:
            e = spec.num_experts
            device = next(spec.hook_module.parameters()).device
            counts = torch.zeros(e + 2, dtype=torch.int64, device=device)
            edges = torch.arange(e + 1, device=device)
            one = torch.ones((), dtype=torch.int64, device=device)
            ones: dict[int, torch.Tensor] = {}
            clamp = device.type == "cpu"

            def hook(module: Any, args: Any, output: Any, spec: Any = spec, counts: Any = counts,
                     edges: Any = edges, one: Any = one, ones: Any = ones, e: int = e, clamp: bool = clamp) -> None:
                grad = is_grad_enabled()
                set_grad_enabled(False)
                idx = spec.extract(module, args, output).indices_TK
                n = idx.numel()
                if n < _CLAMP_FROM or not clamp:
                    cols = torch.bucketize(idx, edges, right=True).view(-1)
                else:
                    cols = torch.add(idx, 1).clamp_(0, e + 1).view(-1)
                src = ones.get(n)
                if src is None:
                    src = ones[n] = one.expand(n)
                counts.index_add_(0, cols, src)
                set_grad_enabled(grad)

            self.handles.append(spec.hook_module.register_forward_hook(hook))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class SuspendableMonitor:
    """The ``compiled+moewatch`` variant: one monitor, attached before compiling and kept for the whole run,
    taken off between its blocks without being closed. Its hook entries are popped from the modules' and the
    optimizer's hook dicts and put back under the same keys, so that with
    ``torch._dynamo.config.skip_nnmodule_hook_guards = False`` the graph compiled with moewatch's hooks
    (guarded on those entries) is found again in its next block instead of recompiled, and the graph of the
    ``compiled`` variant (guarded on empty hook dicts) never runs them. With the default (True) dynamo does
    not guard on hooks at all and would run whichever graph it compiled first for both variants."""

    def __init__(self, watch: moewatch.Monitor, model: torch.nn.Module) -> None:
        self.watch, self.model = watch, model
        self._stash: list[tuple[Any, int, Any]] = []

    def suspend(self) -> None:
        for h in self.watch._handles:
            d = h.hooks_dict_ref()
            if d is not None and h.id in d:
                self._stash.append((d, h.id, d.pop(h.id)))
        _ATTACHED.pop(self.model, None)  # the eager moewatch variant attaches its own monitor meanwhile

    def resume(self) -> None:
        for d, key, fn in self._stash:
            d[key] = fn
        self._stash.clear()
        _ATTACHED[self.model] = self.watch

    def flush(self) -> Any:
        """Close the window with the hooks back for the moment (what the suspended monitor counted so far),
        and return its report."""
        self.resume()
        report = self.watch.flush()
        self.suspend()
        return report

    def close(self) -> None:
        self.resume()
        self.watch.close()


def _compile_stats() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


#: Per-model defaults: (window_steps, blocks per variant, warm-up steps, steps per in-hook measurement, steps of
#: the window-end measurement). A block is one window long, so every monitored block holds exactly one window
#: end (its last step).
DEFAULTS = {"demo": (100, 30, 100, 50, 24), "qwen3moe": (10, 30, 10, 20, 24), "moe64": (2, 6, 1, 2, 4)}
#: Per-model rounds of the in-graph measurement (each round: the in-hook steps' count of compiled forwards with
#: moewatch's graph and as many with the plain one).
GRAPH_ROUNDS = {"demo": 40, "qwen3moe": 40, "moe64": 8}
#: Rounds of the router-level in-graph measurement, and calls of every router each way per round.
ROUTER_ROUNDS = 40
ROUTER_CALLS = {"demo": 100, "qwen3moe": 50, "moe64": 10}


#: Per-model processes of the in-hook measurement. One process's figure moves by a few % with where its code
#: and buffers landed in memory (the same code differs by up to 0.1x the floor from one process to the next),
#: so it is the median over fresh processes; moe64's calls are kernel-bound, one process is enough.
HOOK_PROCESSES = {"demo": 5, "qwen3moe": 3, "moe64": 1}


def _attacher(w: Workload, name: str, window_steps: int, args: argparse.Namespace,
              device: torch.device) -> Callable[..., moewatch.Monitor]:
    def attach(window: int = window_steps, probs_every: int | None = args.probs_every) -> moewatch.Monitor:
        # strict on CUDA: a sync-debug error inside a hook must stop the run, not disable the router.
        return moewatch.attach(w.model, optimizer=w.optimizer, window_steps=window,
                               run_name=f"bench-{name}", strict=device.type == "cuda",
                               **({} if probs_every is None else {"probs_every": probs_every}), **SINKS_OFF)

    return attach


def _hook_specs(w: Workload, attach: Callable[..., moewatch.Monitor]) -> tuple[list[Any], int, int]:
    """The routers whose hooks the in-hook measurement times (indices-based ones), moewatch's probs_every and
    its buffers' bytes, from a monitor attached for one step."""
    watch = attach()
    w.step(0)
    specs = [s for s in watch._specs if s.family not in ("megatron", "deepspeed")]
    probs_every, state = watch.config.probs_every, watch._acc.state_bytes()
    watch.close()
    return specs, probs_every, state


def _hook_only(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``--hook-only``: the in-hook measurement alone, in this (fresh) process, after the model's warm-up."""
    window_steps, _, warmup, hook_steps, _ = _settings(name, args)
    w = build_workload(name, device, seed=args.seed, scale=args.scale)
    attach = _attacher(w, name, window_steps, args, device)
    for i in range(warmup):
        w.step(i)
    specs, _, _ = _hook_specs(w, attach)
    return _in_hook_rounds(w, specs, attach, hook_steps, warmup + 1, rounds=args.hook_rounds)


def _hook_in_fresh_process(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "hook.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--hook-only", "--models", name, "--json", out,
               "--device", args.device, "--threads", str(args.threads), "--seed", str(args.seed),
               "--scale", str(args.scale), "--hook-steps", str(args.hook_steps),
               "--hook-rounds", str(args.hook_rounds), "--window-steps", str(args.window_steps)]
        cmd += [] if args.warmup is None else ["--warmup", str(args.warmup)]
        cmd += [] if args.probs_every is None else ["--probs-every", str(args.probs_every)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


def _settings(name: str, args: argparse.Namespace) -> tuple[int, int, int, int, int]:
    """The model's DEFAULTS with the command line's overrides: (window_steps, blocks, warm-up steps, steps per
    in-hook measurement, steps of the window-end measurement)."""
    window_steps, blocks, warmup, hook_steps, window_end_steps = DEFAULTS[name]
    hook_steps = args.hook_steps or hook_steps
    window_end_steps = max(2, min(window_end_steps, hook_steps * 2)) if args.hook_steps else window_end_steps
    return (args.window_steps or window_steps, args.blocks or blocks,
            args.warmup if args.warmup is not None else warmup, hook_steps, window_end_steps)


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> ModelResult:
    window_steps, blocks, warmup, hook_steps, window_end_steps = _settings(name, args)
    steps_per_block = args.steps_per_block or window_steps
    # One model, one optimizer: what differs between blocks is only what is attached (copies of a model
    # differ by a few % in speed on the CPU from memory placement alone, more than the effect measured).
    w = build_workload(name, device, seed=args.seed, scale=args.scale)
    clock = Clock(device)
    counter = [0]
    armed = [False]
    variants = VARIANTS + (COMPILED if args.compile else ())

    attach = _attacher(w, name, window_steps, args, device)

    compiled_step: Callable[[int], None] | None = None
    compiled_forward: Callable[[int], torch.Tensor] | None = None
    suspended: SuspendableMonitor | None = None
    compile_info: dict[str, Any] = {}
    if args.compile:
        step_hook_us = _step_hook_us(attach, w.optimizer)  # before the compiled calls: attach would reset them
        # Guard on hooks (see SuspendableMonitor); the compiled plain graph then also checks that the hook
        # dicts are empty on every call, a few µs, in both compiled variants alike.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()
        compiled_model = torch.compile(w.model, backend=args.compile_backend)
        compiled_step, compiled_forward = w.make_step(compiled_model), w.make_forward(compiled_model)
        suspended = SuspendableMonitor(attach(), w.model)  # attached before the first compiled call
        suspended.suspend()

    k = 1 if device.type == "cuda" else 0  # the clock read: thread CPU time, or wall time on CUDA

    def run_block(v: str, n: int) -> tuple[float, float, int]:
        step = compiled_step if v in COMPILED else w.step
        assert step is not None
        watch: moewatch.Monitor | None = None
        if v == "moewatch":
            watch = attach()
        elif v == "compiled+moewatch":
            assert suspended is not None
            suspended.resume()
            watch = suspended.watch
        naive = NaiveMonitor(w.model) if v == "naive" else None
        disarm = (_arm_sync_debug(watch, device, armed, router_hooks=v == "moewatch")
                  if watch is not None else (lambda: None))
        windows0 = watch._window if watch is not None else 0
        c0, w0 = clock.now()
        for _ in range(n):
            if watch is not None:
                armed[0] = (watch.step_count - watch._window_start_step + 1) % window_steps != 0  # not a window end
            step(counter[0])
            counter[0] += 1
        c1, w1 = clock.now()
        disarm()
        ends = 0
        if watch is not None:
            ends = watch._window - windows0
            if v == "moewatch":
                watch.close()
            else:
                assert suspended is not None
                suspended.suspend()
        if naive is not None:
            naive.close()
        return (c1 - c0) / n, (w1 - w0) / n, ends

    for v in variants:
        if v in COMPILED:
            # Compiles forward and backward on the first call; a second shape may recompile once with dynamic
            # shapes (moe64's experts), so at least 3 steps.
            g0, b0 = _compile_stats()
            t0 = time.perf_counter()
            run_block(v, max(warmup, 3))
            g1, b1 = _compile_stats()
            compile_info[v] = {"graphs": g1 - g0, "graph_breaks": b1 - b0, "warmup_s": time.perf_counter() - t0}
            if v == "compiled+moewatch":
                assert suspended is not None
                suspended.flush()  # the timed blocks start at a window start, as the eager variant's
        else:
            run_block(v, warmup)
    graphs_before = _compile_stats()[0] if args.compile else 0
    per_step: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    window_ends = 0
    gc.collect()
    gc.disable()
    try:
        for b in range(blocks):
            rot = b % len(variants)
            order = variants[rot:] + variants[:rot]
            for v in order:
                cpu, wall, ends = run_block(v, steps_per_block)
                per_step[v].append((cpu, wall))
                window_ends += ends
            if args.verbose:
                print(f"  {name} block {b}: " + " ".join(f"{v}={per_step[v][-1][0] * 1e3:.2f}ms" for v in order),
                      flush=True)
    finally:
        gc.enable()
    if suspended is not None:
        compile_info["graphs_compiled_in_timed_blocks"] = _compile_stats()[0] - graphs_before
        latest = suspended.watch.latest  # the compiled graph counted: its last window's tokens per router
        compile_info["last_window_tokens"] = [layer.tokens for layer in latest.layers] if latest else []
        assert compiled_forward is not None
        g0 = _compile_stats()[0]
        compile_info["in_graph"] = _in_graph_rounds(compiled_forward, suspended, hook_steps,
                                                    args.graph_rounds or GRAPH_ROUNDS[name],
                                                    clock, k, w.tokens_per_step)
        compile_info["graphs_compiled_in_graph_rounds"] = _compile_stats()[0] - g0
        compile_info["router_graphs"] = _router_graph_rounds(w, suspended, args.compile_backend,
                                                             args.hook_steps or ROUTER_CALLS[name],
                                                             args.graph_rounds or ROUTER_ROUNDS,
                                                             clock, k)
        suspended.close()
        torch._dynamo.config.skip_nnmodule_hook_guards = True

    pairs = [(a, b) for a, b in PAIRS if a in variants]
    ratios = {f"{a}/{b}": _summarise([x[k] / y[k] for x, y in zip(per_step[a], per_step[b], strict=True)])
              for a, b in pairs}
    wall = {f"{a}/{b}": statistics.median([x[1] / y[1] for x, y in zip(per_step[a], per_step[b], strict=True)])
            for a, b in pairs}
    step_ms = {v: statistics.median(x[k] for x in per_step[v]) * 1e3 for v in variants}
    fast = {v: _quantile([x[k] for x in per_step[v]], 0.1) for v in variants}
    fast_ratio = {f"{a}/{b}": fast[a] / fast[b] for a, b in pairs}

    # Direct attribution, outside the A/B timing: time inside the hooks, memory, ops per router call.
    peaks = {"plain": _peak_extra_bytes(lambda: w.step(0), device)} if device.type == "cuda" else {}
    if peaks:
        naive = NaiveMonitor(w.model)
        peaks["naive"] = _peak_extra_bytes(lambda: w.step(0), device)
        naive.close()
    if peaks:
        watch = attach()
        w.step(0)
        peaks["moewatch"] = _peak_extra_bytes(lambda: w.step(0), device)
        watch.close()
    specs, probs_every, state = _hook_specs(w, attach)
    hook = _in_hook_rounds(w, specs, attach, hook_steps, counter[0], rounds=args.hook_rounds)
    n_procs = args.hook_processes or HOOK_PROCESSES[name]
    per_process = [dict(hook)] + [_hook_in_fresh_process(name, args) for _ in range(n_procs - 1)]
    hook["window_end_ms"] = _window_end_ms(w, attach, window_end_steps, counter[0])
    if args.compile:
        # The compiled variant's cost per step, from parts each timed below the blocks' noise: the traced
        # hooks in the forward (router-level graphs; the whole forward as a cross-check), the post-hook of
        # every step, and a window end per DEFAULT_WINDOW steps.
        compile_info["in_graph"]["step_hook_us"] = step_hook_us
        host_us = step_hook_us + hook["window_end_ms"] * 1e3 / DEFAULT_WINDOW
        compiled_us = step_ms["compiled"] * 1e3
        for g in (compile_info["in_graph"], compile_info["router_graphs"]):
            g["modeled_ratio"] = 1 + (g["us_per_forward"] + host_us) / compiled_us
            g["modeled_ratio_ci"] = [1 + (g["ci"][j] + host_us) / compiled_us for j in (0, 1)]
    # moewatch's defaults: a window of DEFAULT_WINDOW steps samples ceil(calls / probs_every) of its calls.
    calls = DEFAULT_WINDOW * hook["calls_per_router_step"]
    share = math.ceil(calls / probs_every) / calls
    # Each process's figures, then their medians over the processes (the first is this one).
    for h in per_process:
        h["at_defaults"] = h["count"] + share * (h["sampled"] - h["count"])
        h["vs_floor"], h["count_vs_floor"] = h["at_defaults"] / h["floor"], h["count"] / h["floor"]
    for key in ("count", "sampled", "floor", "at_defaults", "vs_floor", "count_vs_floor"):
        hook[key] = statistics.median(h[key] for h in per_process)
    hook_us = hook["at_defaults"]

    watch = attach(window=10**9)
    w.step(0)  # allocates the buffers
    watch._acc.take_host_counts()  # as at a window end: the next call of each router is sampled
    ops_sampled, ops_count, transient = _count_update_ops(watch, w)  # steps that are not window ends
    watch.close()
    sync_check = "not run (CPU; see tests/test_no_sync.py)"
    if device.type == "cuda":
        sync_check = (f"0 syncs from moewatch on {blocks * steps_per_block - window_ends} non-window-end steps "
                      "(eager hooks and optimizer.step under sync_debug_mode='error')")
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
        extra={
            "floor_hook_us_per_step": hook["floor"], "hook_vs_floor": hook["vs_floor"],
            "count_vs_floor": hook["count_vs_floor"], "hook_processes": len(per_process),
            "hook_vs_floor_per_process": [h["vs_floor"] for h in per_process],
            "count_hook_us_per_step": hook["count"], "sampled_hook_us_per_step": hook["sampled"],
            "sampled_share": share, "calls_per_router_step": hook["calls_per_router_step"],
            "hook_rounds": hook["rounds"], "hook_steps": hook_steps,
            "window_end_ms": hook["window_end_ms"],
            "window_end_us_per_step_default": hook["window_end_ms"] * 1e3 / DEFAULT_WINDOW,
            "compile": compile_info,
            "transient_bytes_per_router_call": transient, "blocks": blocks, "steps_per_block": steps_per_block,
            "warmup": warmup,
        },
    )


def _alternating(
    suspended: SuspendableMonitor, run: Callable[[int], None], n: int, rounds: int, clock: Clock, k: int,
) -> tuple[float, list[float], float]:
    """``rounds`` rounds of ``n`` calls of ``run(i)`` with moewatch's hooks in (``suspended`` resumed) and ``n``
    without, the order swapped every round, garbage collection off. Returns the median paired difference per
    call in µs, its bootstrap 95% CI and the plain calls' median time in µs."""

    def timed(with_moewatch: bool) -> float:
        (suspended.resume if with_moewatch else suspended.suspend)()
        c0 = clock.now()[k]
        for i in range(n):
            run(i)
        t = (clock.now()[k] - c0) / n
        if with_moewatch:
            suspended.suspend()
        return t

    diffs: list[float] = []
    plain: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            first = r % 2 == 0
            a = timed(first)
            b = timed(not first)
            mw, pl = (a, b) if first else (b, a)
            diffs.append((mw - pl) * 1e6)
            plain.append(pl * 1e6)
    finally:
        gc.enable()
    lo, hi = _bootstrap_median_ci(diffs)
    return statistics.median(diffs), [lo, hi], statistics.median(plain)


def _in_graph_rounds(
    forward: Callable[[int], torch.Tensor], suspended: SuspendableMonitor, n: int, rounds: int, clock: Clock, k: int,
    tokens_per_forward: int,
) -> dict[str, Any]:
    """What moewatch adds inside the compiled graph, resolved below the A/B blocks' noise: the compiled
    forward alone (moewatch's traced hooks run there and nowhere else: they add nothing to the backward
    graph, and the optimizer post-hook and window ends are timed apart), ``n`` calls with moewatch's graph and
    ``n`` with the plain one, alternating in ``rounds`` rounds (order swapped every round). Returns the median
    paired difference in µs per forward with a bootstrap 95% CI, the plain forward's time, and the tokens
    moewatch counted per router over the rounds (``rounds * n * tokens_per_forward`` when its graph ran in
    exactly its halves)."""
    suspended.flush()  # whatever an earlier block left: the rounds' counts start from zero
    diff, ci, plain = _alternating(suspended, forward, n, rounds, clock, k)
    report = suspended.flush()
    return {"us_per_forward": diff, "ci": ci, "plain_forward_us": plain,
            "rounds": rounds, "calls_per_round": n, "expected_tokens": rounds * n * tokens_per_forward,
            "counted_tokens": [layer.tokens for layer in report.layers] if report is not None else []}


def _router_graph_rounds(
    w: Workload, suspended: SuspendableMonitor, backend: str, n: int, rounds: int, clock: Clock, k: int,
) -> dict[str, Any]:
    """moewatch's in-graph cost per router call, resolved where the whole forward is too noisy (moe64's
    forward of over a second varies by more than moewatch's 2 ms in it): each router module of the model, called on the
    inputs it saw in one forward, compiled alone (the same compiled function with moewatch's hooks and without:
    dynamo guards on the hook dicts here, see SuspendableMonitor), ``n`` calls of every router each way,
    alternating in ``rounds`` rounds. The tokens moewatch counted per router are returned with the count
    expected if its graph ran in exactly its halves (and the warm-up), for models whose routers run once per
    forward. Returns the median paired difference per forward (every router's calls
    of one forward) with a bootstrap 95% CI, and the plain routers' time per forward. The guards of each
    router's hooks are evaluated once per router call here, as in the model's graph; only the graph-wide
    check that hooks sharing state still share it is not in it (a few µs per forward)."""
    watch = suspended.watch
    calls: list[tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]] = []

    def detached(x: Any) -> Any:
        return x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x

    def capture(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((module, tuple(map(detached, args)), {key: detached(v) for key, v in kwargs.items()}))

    modules = list(dict.fromkeys(spec.hook_module for spec in watch._specs))
    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in modules]
    try:
        w.make_forward(w.model)(0)  # eager, moewatch suspended: the routers' inputs of one forward
    finally:
        for h in handles:
            h.remove()

    def call(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return module(*args, **kwargs)

    # One compiled function; each router module and each hook state is its own cache entry.
    limit = max(torch._dynamo.config.recompile_limit, 4 * len(calls) + 8)
    with torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=max(limit, 256)):
        compiled = torch.compile(call, backend=backend)

        def forward(_: int) -> None:  # every router's calls of one forward
            for module, args, kwargs in calls:
                compiled(module, args, kwargs)

        suspended.flush()  # whatever an earlier block left: what the rounds count starts from zero
        _alternating(suspended, forward, n, 1, clock, k)  # compiles both (one round, not kept)
        g0 = _compile_stats()[0]
        diff, ci, plain = _alternating(suspended, forward, n, rounds, clock, k)
        graphs = _compile_stats()[0] - g0
    report = suspended.flush()  # what the router calls counted is not a training window
    return {"us_per_forward": diff, "ci": ci, "plain_routers_us": plain,
            "router_calls_per_forward": len(calls), "rounds": rounds, "calls_per_round": n,
            "graphs_compiled_in_rounds": graphs,
            "counted_tokens": [layer.tokens for layer in report.layers] if report is not None else [],
            "expected_tokens": (rounds + 1) * n * w.tokens_per_step}


def _paired_hook_times(
    w: Workload, specs: list[Any], watch: moewatch.Monitor, floor: FloorCounter, steps: int, offset: int
) -> tuple[float, float, float]:
    """moewatch's and the floor counter's router hooks, both registered, timed on the same router calls: each
    hook's entry in the module's hook dict is wrapped with a thread-time timer, and the two swap places every
    step (whichever runs second finds the indices and the kernels' code in cache). Returns (moewatch µs/step,
    floor µs/step, router calls per step)."""
    spent = {"moewatch": 0.0, "floor": 0.0}
    calls = [0]
    pairs, saved = [], []
    for spec, floor_handle in zip(specs, floor.handles, strict=True):
        hooks = spec.hook_module._forward_hooks
        mw_key = next(h.id for h in watch._handles if h.hooks_dict_ref() is hooks and h.id in hooks)
        for key, who in ((mw_key, "moewatch"), (floor_handle.id, "floor")):
            fn = hooks[key]

            def timed(*a: Any, fn: Any = fn, who: str = who) -> Any:
                t = time.thread_time()
                try:
                    return fn(*a)
                finally:
                    spent[who] += time.thread_time() - t
                    calls[0] += who == "floor"

            saved.append((hooks, key, fn))
            hooks[key] = timed
        pairs.append((hooks, mw_key, floor_handle.id))
    try:
        for i in range(steps):
            for hooks, mw_key, floor_key in pairs:
                first, second = (floor_key, mw_key) if i % 2 == 0 else (mw_key, floor_key)
                hooks.move_to_end(second, last=False)
                hooks.move_to_end(first, last=False)
            w.step(offset + i)
    finally:
        for hooks, key, fn in saved:
            hooks[key] = fn
    return spent["moewatch"] / steps * 1e6, spent["floor"] / steps * 1e6, calls[0] / steps


def _in_hook_rounds(
    w: Workload, specs: list[Any], attach: Callable[..., moewatch.Monitor], steps: int, offset: int, rounds: int
) -> dict[str, Any]:
    """Thread time inside the router hooks per step (µs), medians over ``rounds`` rounds of two runs each,
    timed on the same calls as the floor counter's (``_paired_hook_times``): moewatch with count-only calls
    (probs_every huge; an untimed step first, as a window's first call is always sampled) and with every call
    sampled (probs_every 1), window ends excluded."""
    res: dict[str, list[float]] = {"count": [], "sampled": [], "floor": []}
    calls = 0.0
    for r in range(rounds):
        for kind in ("count", "sampled") if r % 2 == 0 else ("sampled", "count"):
            watch = attach(window=10**9, probs_every=10**9 if kind == "count" else 1)
            floor = FloorCounter(specs)
            try:
                if r == 0 or kind == "count":
                    w.step(0)  # not timed
                us, floor_us, calls = _paired_hook_times(w, specs, watch, floor, steps, offset)
            finally:
                floor.close()
                watch.close()
            res[kind].append(us)
            res["floor"].append(floor_us)
    out: dict[str, Any] = {k: statistics.median(v) for k, v in res.items()}
    out.update(calls_per_router_step=calls / len(specs), rounds=rounds)
    return out


def _window_end_ms(w: Workload, attach: Callable[..., moewatch.Monitor], steps: int, offset: int) -> float:
    """Host time of a window end in training (pack, copy, metrics, health, trends, report; sinks off), ms:
    with a window of one step, the thread time of the optimizer post-hook on each of ``steps`` steps, median
    of the second half (trend fits then run over longer histories; 8 windows is a full one by default)."""
    watch = attach(window=1)
    times: list[float] = []
    advance = watch._advance

    def timed() -> Any:
        t = time.thread_time()
        try:
            return advance()
        finally:
            times.append((time.thread_time() - t) * 1e3)

    watch._advance = timed  # type: ignore[method-assign]  # the optimizer post-hook calls this
    try:
        for i in range(steps):
            w.step(offset + i)
    finally:
        del watch._advance
        watch.close()
    return statistics.median(times[steps // 2 :])


def _step_hook_us(attach: Callable[..., moewatch.Monitor], optimizer: torch.optim.Optimizer,
                  calls: int = 2000) -> float:
    """Host time of moewatch's optimizer post-hook on a step that does not end a window, µs (median of 5
    runs): the hooks ``attach`` registered on ``optimizer``, called as ``optimizer.step()`` calls them."""
    before = set(optimizer._optimizer_step_post_hooks)
    watch = attach(window=10**9)
    hooks = [h for key, h in optimizer._optimizer_step_post_hooks.items() if key not in before]
    try:
        runs = []
        for _ in range(5):
            t = time.thread_time()
            for _ in range(calls):
                for h in hooks:
                    h(optimizer, (), {})
            runs.append((time.thread_time() - t) / calls * 1e6)
    finally:
        watch._step = watch._window_start_step  # no router ran: nothing to report, no idle-window warning
        watch.close()
    return statistics.median(runs)


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
    p.add_argument("--compile", action="store_true",
                   help="also time the compiled and compiled+moewatch variants (torch.compile of the model)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--blocks", type=int, default=0, help="A/B blocks per variant (0: per-model default)")
    p.add_argument("--steps-per-block", type=int, default=0, help="steps per block (0: one window)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (compiled: at least 3)")
    p.add_argument("--window-steps", type=int, default=0,
                   help="moewatch window length in optimizer steps (0: per-model default: demo 100, qwen3moe 10, "
                   "moe64 2)")
    p.add_argument("--hook-steps", type=int, default=0,
                   help="steps per in-hook measurement (0: per-model default: demo 50, qwen3moe 20, moe64 2)")
    p.add_argument("--hook-rounds", type=int, default=3, help="rounds of in-hook measurements (default 3)")
    p.add_argument("--hook-processes", type=int, default=0,
                   help="processes the in-hook measurement runs in, this one and fresh ones, medians over them "
                   f"(0: per-model default: {', '.join(f'{m} {n}' for m, n in HOOK_PROCESSES.items())})")
    p.add_argument("--hook-only", action="store_true", help=argparse.SUPPRESS)  # one fresh process's part
    p.add_argument("--graph-rounds", type=int, default=0,
                   help="--compile: rounds of compiled-forward pairs timing moewatch's in-graph cost "
                        f"(0: per-model default: {', '.join(f'{m} {r}' for m, r in GRAPH_ROUNDS.items())})")
    p.add_argument("--scale", type=float, default=1.0, help="scale tokens per step (smoke tests use < 1)")
    p.add_argument("--probs-every", type=int, default=None,
                   help="moewatch probs_every: probability statistics on every Nth router call of a window "
                   f"(default: moewatch's, {DEFAULT_PROBS_EVERY})")
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

    if args.hook_only:
        with open(args.json, "w") as f:
            json.dump(_hook_only(names[0], args, device), f)
        return 0
    machine = _machine(device)
    clock = "wall (CUDA-synchronised per block)" if device.type == "cuda" else "thread CPU time"
    print(f"# moewatch step overhead on {device}: {machine}")
    print(f"# clock: {clock}; one model per row, moewatch / naive attached for a block, removed after it; "
          "moewatch sinks off (console, jsonl, prometheus, alerts), window ends on"
          + (f"; compiled variants: torch.compile(backend={args.compile_backend!r})" if args.compile else ""))
    results = []
    for name in names:
        t0 = time.perf_counter()
        r = run_model(name, args, device)
        results.append(r)
        x = r.extra
        print(f"\n## {name}: {r.description}  ({time.perf_counter() - t0:.0f} s)")
        print("   step ms (median): " + ", ".join(f"{v} {ms:.3f}" for v, ms in r.step_ms.items()))
        for key in r.ratio:
            print(f"   {key:<28} {_fmt_ratio(r.ratio[key])}  wall {r.wall_ratio[key]:.4f}  "
                  f"fastest-10% blocks {r.fast_ratio[key]:.4f}")
        for v, c in x["compile"].items():
            if v in COMPILED:
                print(f"   {v}: {c['graphs']} graphs, {c['graph_breaks']} graph breaks at its first calls "
                      f"({c['warmup_s']:.0f} s warm-up with compilation)")
        if "graphs_compiled_in_timed_blocks" in x["compile"]:
            c = x["compile"]
            g = c["in_graph"]
            print(f"   graphs compiled during the timed blocks: {c['graphs_compiled_in_timed_blocks']}, during the "
                  f"in-graph rounds: {c['graphs_compiled_in_graph_rounds']}")
            print(f"   compiled, in the graph ({g['rounds']} rounds x {g['calls_per_round']} forwards each way): moewatch "
                  f"adds {g['us_per_forward']:.1f} us per forward (95% CI {g['ci'][0]:.1f} to {g['ci'][1]:.1f}; plain "
                  f"forward {g['plain_forward_us']:.0f} us); post-hook {g['step_hook_us']:.1f} us/step; with a window "
                  f"end per {DEFAULT_WINDOW} steps: compiled+moewatch / compiled {g['modeled_ratio']:.4f} "
                  f"({g['modeled_ratio_ci'][0]:.4f}-{g['modeled_ratio_ci'][1]:.4f})")
            rg = c["router_graphs"]
            print(f"   compiled, router-level graphs ({rg['rounds']} rounds x {rg['calls_per_round']} calls of each of "
                  f"{rg['router_calls_per_forward']} router calls per forward, each way): moewatch adds "
                  f"{rg['us_per_forward']:.1f} us per forward (95% CI {rg['ci'][0]:.1f} to {rg['ci'][1]:.1f}; plain "
                  f"routers {rg['plain_routers_us']:.0f} us); compiled+moewatch / compiled {rg['modeled_ratio']:.4f} "
                  f"({rg['modeled_ratio_ci'][0]:.4f}-{rg['modeled_ratio_ci'][1]:.4f}); graphs compiled in its "
                  f"rounds: {rg['graphs_compiled_in_rounds']}")
        print(f"   router hooks, us/step (medians over {x['hook_processes']} processes of their medians of "
              f"{x['hook_rounds']} rounds x {x['hook_steps']} steps, on the same calls as the floor's, window ends "
              f"apart): floor {x['floor_hook_us_per_step']:.1f}; moewatch count-only calls "
              f"{x['count_hook_us_per_step']:.1f} ({x['count_vs_floor']:.2f}x floor), every call sampled "
              f"{x['sampled_hook_us_per_step']:.1f}")
        print(f"   moewatch at its defaults (window {DEFAULT_WINDOW}, probs_every {r.probs_every}: "
              f"{x['sampled_share'] * 100:.0f}% of calls sampled): {r.hook_us_per_step:.1f} us/step "
              f"({r.hook_us_per_step / (r.step_ms['plain'] * 1e3) * 100:.2f}% of a plain step); "
              f"moewatch / floor in-hook: {x['hook_vs_floor']:.2f}x (per process: "
              f"{', '.join(f'{v:.2f}' for v in x['hook_vs_floor_per_process'])})")
        print(f"   window end: {x['window_end_ms']:.2f} ms ({x['window_end_us_per_step_default']:.1f} us/step at window "
              f"{DEFAULT_WINDOW}); {r.ops_count_call} aten ops per router call, {r.ops_sampled_call} on the calls "
              f"that sample the probabilities: {r.ops_per_router_call:.2f} on average")
        mem = (f"peak step memory above plain: moewatch {r.peak_extra_bytes['moewatch'] / 1024:.1f} KiB, naive "
               f"{r.peak_extra_bytes['naive'] / 1024:.1f} KiB; " if r.peak_extra_bytes else "")
        print(f"   memory: {mem}moewatch buffers {r.monitor_state_bytes} B (O(layers x experts), and on the CPU "
              f"one sampled call's workspace), temporaries <= {x['transient_bytes_per_router_call'] / 1024:.1f} "
              f"KiB per router call, freed when its hook returns; {r.window_ends} window ends timed")
        print(f"   window_steps {r.window_steps}, {x['blocks']} blocks x {x['steps_per_block']} steps per "
              f"variant; syncs: {r.sync_check}")
    print("\n| model | window | plain ms/step | moewatch / plain, median [IQR] (95% CI) | naive / plain | "
          "router hooks us/step at defaults | floor us/step (moewatch / floor) | count-only calls / floor | "
          "window end ms | ops per router call (+ on sampled calls) | monitor memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m, nv, x = r.ratio["moewatch/plain"], r.ratio["naive/plain"], r.extra
        mem = f"{r.monitor_state_bytes} B buffers + {x['transient_bytes_per_router_call'] / 1024:.1f} KiB/call"
        if r.peak_extra_bytes:
            mem += f"; peak +{r.peak_extra_bytes['moewatch'] / 1024:.0f} KiB"
        print(f"| {r.model} | {r.window_steps} | {r.step_ms['plain']:.2f} | {m.median:.4f} [{m.q1:.4f}-{m.q3:.4f}] "
              f"({m.ci_lo:.4f}-{m.ci_hi:.4f}) | {nv.median:.3f} [{nv.q1:.3f}-{nv.q3:.3f}] | "
              f"{r.hook_us_per_step:.0f} | {x['floor_hook_us_per_step']:.0f} ({x['hook_vs_floor']:.2f}x) | "
              f"{x['count_vs_floor']:.2f}x | {x['window_end_ms']:.2f} | "
              f"{r.ops_count_call} (+{r.ops_sampled_call - r.ops_count_call} every {r.probs_every}) | {mem} |")
    if args.compile:
        print("\n| model | compiled ms/step (eager plain) | compiled+moewatch / compiled, median [IQR] (95% CI) | "
              "fastest 10% | whole forward in the graph, us (95% CI) | router graphs, us/forward (95% CI) | "
              "from its parts at window 100 (95% CI) | graph breaks: compiled / +moewatch | "
              "graphs compiled in timed blocks |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            c, ci = r.ratio["compiled+moewatch/compiled"], r.extra["compile"]
            rg = ci["router_graphs"]
            print(f"| {r.model} | {r.step_ms['compiled']:.2f} ({r.step_ms['plain']:.2f}) | {c.median:.4f} "
                  f"[{c.q1:.4f}-{c.q3:.4f}] ({c.ci_lo:.4f}-{c.ci_hi:.4f}) | "
                  f"{r.fast_ratio['compiled+moewatch/compiled']:.4f} | {ci['in_graph']['us_per_forward']:.1f} "
                  f"({ci['in_graph']['ci'][0]:.1f} to {ci['in_graph']['ci'][1]:.1f}) | "
                  f"{rg['us_per_forward']:.1f} ({rg['ci'][0]:.1f} to {rg['ci'][1]:.1f}) | "
                  f"{rg['modeled_ratio']:.4f} ({rg['modeled_ratio_ci'][0]:.4f}-"
                  f"{rg['modeled_ratio_ci'][1]:.4f}) | {ci['compiled']['graph_breaks']} / "
                  f"{ci['compiled+moewatch']['graph_breaks']} | {ci['graphs_compiled_in_timed_blocks']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "device": str(device), "clock": clock,
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
