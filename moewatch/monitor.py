"""The Monitor: hooks on every router, step counting, window ends, and hand-off to the sinks."""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moewatch._once import Once
from moewatch.accumulator import Accumulator, WindowCounts
from moewatch.adapters.base import RouterInfo, RouterSpec
from moewatch.adapters.failures import report_router_failure
from moewatch.capture import DEFAULT_MAX_TOKENS, RouteCapture, RouteCaptureError
from moewatch.config import MoEWatchConfig
from moewatch.errors import MoEWatchError
from moewatch.flush import StepMismatchError, WindowFlusher
from moewatch.optim import unwrap_optimizer
from moewatch.plain import mark_hook, release, watch_module
from moewatch.report import WindowReport
from moewatch.resume import (
    STATE_VERSION,
    RouterHistory,
    RouterMismatchError,
    router_signature,
    signature_difference,
)
from moewatch.sinks.base import (
    AlertSubscribable,
    Checkpointable,
    DeliveryReporter,
    MonitorStats,
    Sink,
    StatsConsumer,
    sink_name,
    wants_rank_counts,
)
from moewatch.trend import TrendTracker
from moewatch.window import WindowMeta, build_window_report

__all__ = ["AlreadyAttachedError", "Monitor"]

log = logging.getLogger(__name__)

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Monitor] = weakref.WeakKeyDictionary()


class AlreadyAttachedError(MoEWatchError, ValueError):
    """A model can carry one monitor at a time."""


def check_not_attached(model: nn.Module) -> None:
    if model in _ATTACHED:
        raise AlreadyAttachedError(
            f"moewatch is already attached to this {type(model).__name__}; call .close() on the existing "
            "monitor (or use it as a context manager) before attaching again"
        )


def _in_backward() -> bool:
    # Activation checkpointing (reentrant and not) re-runs forwards inside the autograd engine.
    return torch._C._current_graph_task_id() != -1


class Monitor:
    """Watches the routers of one model. Build it with :func:`moewatch.attach`."""

    def __init__(
        self,
        model: nn.Module,
        specs: list[RouterSpec],
        config: MoEWatchConfig,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        sinks: list[Sink] | None = None,
        process_group: Any = None,
        alert_sink_factory: Callable[[], Sink] | None = None,
    ) -> None:
        check_not_attached(model)
        self.config = config
        self._specs = specs  # read by benchmarks/ to time the hooks
        # layer_offset: a pipeline stage's routers under their global layer numbers.
        self._routers = [s.info(config.layer_offset + i) for i, s in enumerate(specs)]
        self._acc = Accumulator([s.num_experts for s in specs], config.probs_every)
        self._sinks: list[Sink] = list(sinks or [])
        self._alert_sink_factory = alert_sink_factory
        self._saved_sink_state: dict[str, Any] = {}  # for sinks added after load_state_dict (on_alert)
        self._group = process_group
        self._handles: list[Any] = []
        self._disabled = [False] * len(specs)
        self._invalid_ids_logged = Once()  # keyed by router position
        self._nothing_counted_logged = False
        self.hook_errors = 0
        self.latest: WindowReport | None = None
        #: The routes of the last capture_routes() block that ended without error.
        self.last_capture: RouteCapture | None = None
        # prometheus.per_rank: the exporter of every rank gets a report of that rank's own counts.
        self._per_rank = config.prometheus.per_rank and process_group is not None
        self._flusher = WindowFlusher(self._acc, process_group, keep_local=self._per_rank)
        self._step = 0
        self._window = 0
        self._window_start_step = 0
        self._window_start_time = time.time()
        self.history = RouterHistory(self._routers)
        self._closed = False
        self._detached = False
        self._manual_steps = False
        self._root_handle: Any = None
        self._root_forwards = 0
        self._root_forward_compiled = False
        self._model_ref = weakref.ref(model)
        # The open capture_routes() block, read by every router hook (a list cell the hooks hold).
        self._capturing: list[RouteCapture | None] = [None]

        for device in {p.device for s in specs for p in s.hook_module.parameters()}:
            self._acc.prepare(device)
        # Modules given moewatch.plain's attributes (copies and pickles are plain, stale compiled frames
        # miss), released at close.
        self._watched: list[nn.Module] = []
        for i, spec in enumerate(specs):
            self._handles.append(spec.hook_module.register_forward_hook(mark_hook(self._make_hook(i, spec))))
            self._watched.append(spec.hook_module)
            child = spec.extra.get("logits_module")
            if child is not None:
                self._handles.append(child.register_forward_hook(mark_hook(self._make_stash(spec))))
                self._watched.append(child)
        for module in self._watched:
            watch_module(module)
        if optimizer is not None:
            try:
                optimizer = unwrap_optimizer(optimizer)
            except ValueError:
                self._remove_hooks()
                raise
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self._advance()))
        else:
            # Fallback step source: each training forward of the root module after the first starts a new
            # step (so a user who calls step() after the first forward never gets a double count).
            self._root_handle = model.register_forward_pre_hook(mark_hook(self._root_pre_hook()))
            watch_module(model, forward=False)
            self._watched.append(model)
        _ATTACHED[model] = self
        self._trend = TrendTracker(self.config.early_warning, self.config.thresholds)
        # Trend and idle windows of the per-rank reports (not in state_dict: they restart on resume).
        self._local_trend = TrendTracker(self.config.early_warning, self.config.thresholds)
        self._local_history = RouterHistory(self._routers)
        for sink in self._sinks:
            self._bind(sink)

    # --- public API ---------------------------------------------------------------------------

    @property
    def routers(self) -> list[RouterInfo]:
        """Routers found, in layer order."""
        return list(self._routers)

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def sinks(self) -> list[Sink]:
        return list(self._sinks)

    def step(self) -> WindowReport | None:
        """Mark the end of one optimizer step (when no optimizer was given). Returns the report of a window
        that completed now, if any. Once called, root-module forwards no longer count as steps."""
        if not self._manual_steps:
            self._manual_steps = True
            if self._root_handle is not None:
                self._root_handle.remove()
                self._root_handle = None
                # Forwards counted as steps before the user's first step() were micro-batches of this step.
                self._step = self._window_start_step
        return self._advance()

    def flush(self) -> WindowReport | None:
        """Close the current window now (however many steps it has) and return its report. With a process
        group every rank must call it, as it all-reduces. When nothing was counted since the last window
        ended (e.g. a run whose length is a multiple of ``window_steps``), no empty window is made or
        emitted: it returns the last complete report, or None if there has been none."""
        self._finish_pending()
        if self._step == self._window_start_step and not self._counted_since_window():
            return self.latest
        report = self._end_window(blocking=True)
        if report is None:
            raise RuntimeError("moewatch: the window could not be built; the log holds the reason")
        return report

    def close(self) -> None:
        """Report what is left of the current window, remove every hook and close the sinks. The model is
        exactly as before ``attach``. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._root_forward_compiled and not self._manual_steps:
            log.warning(
                "moewatch: the model ran under torch.compile with no optimizer= and no watch.step(); compiled "
                "forwards do not mark steps, so windows closed only at flush()/close(). Pass optimizer= to "
                "moewatch.attach or call watch.step() after each optimizer step"
            )
        mismatch: StepMismatchError | None = None
        try:
            self._finish_pending()
            if self._group is not None:
                mismatch = self._flusher.check_steps(self._step)
            # With a group, decide from step counts only: they agree across ranks, token counts may not,
            # and a rank that skipped the all_reduce would hang the others.
            leftover = self._counted_since_window()
            if mismatch is None and (self._step > self._window_start_step or leftover):
                self._end_window(blocking=True)
        finally:
            self._detach()
        if mismatch is not None:
            raise mismatch

    def _detach(self) -> None:
        """Remove every hook, close the sinks and let go of the process group (a monitor that still held
        it would keep gloo's threads alive past ``destroy_process_group``, into interpreter shutdown)."""
        if self._detached:
            return
        self._detached = self._closed = True
        self._remove_hooks()
        model = self._model_ref()
        if model is not None:
            _ATTACHED.pop(model, None)
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - a sink must not break close()
                log.exception("moewatch: closing sink %s failed", type(sink).__name__)
        self._group = None
        self._flusher.release_group()

    @contextlib.contextmanager
    def capture_routes(self, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> Iterator[RouteCapture]:
        """Record each token's top-k expert ids per router for every forward inside the ``with`` block
        (training or eval mode, e.g. a ``generate()`` rollout and the training forward of the same tokens),
        on the device and without a host sync. ``max_tokens`` rows per router are allocated when the block
        opens; a block that needs more raises :class:`RouteCaptureFullError` when it exits. Counting into the
        window is unchanged. Read ``cap.routes`` (``[T, L, K]``) or ``cap.sequence_routes(batch)`` after the
        block; compare with :func:`moewatch.route_agreement` or :meth:`compare_routes`."""
        if self._capturing[0] is not None:
            raise RouteCaptureError("moewatch.capture_routes: a capture is already open on this monitor; "
                                    "end it before opening another")
        cap = RouteCapture(self._routers, self._router_devices(), max_tokens)
        self._capturing[0] = cap
        failed = False
        try:
            yield cap
        except BaseException:
            failed = True
            raise
        finally:
            self._capturing[0] = None
            cap.close()
            if cap.error is not None and not failed:
                raise cap.error
        self.last_capture = cap

    def _router_devices(self) -> list[torch.device]:
        out = []
        for spec in self._specs:
            p = next(spec.hook_module.parameters(), None)
            if p is None and spec.module is not spec.hook_module:
                p = next(spec.module.parameters(), None)
            out.append(p.device if p is not None else torch.device("cpu"))
        return out

    def on_alert(self, callback: Callable[..., Any]) -> None:
        """Call ``callback(alert, layer_report)`` for every alert that fires or resolves (the same
        pending/firing/resolved rules and the same engine as the notifiers, ``config.alerts``; with alerts
        disabled, a notifier-less alert sink is added for it). It runs on the reporting rank, on a worker
        thread: never inside the training step. Alert state resumes with ``state_dict()``."""
        sink = next((s for s in self._sinks if isinstance(s, AlertSubscribable)), None)
        if sink is None:
            if self._alert_sink_factory is None:
                raise RuntimeError("moewatch: on_alert needs a monitor built by moewatch.attach (no alert sink)")
            sink = self._alert_sink_factory()
            self.add_sink(sink)
        sink.add_alert_callback(callback)  # type: ignore[attr-defined]

    def _counted_since_window(self) -> bool:
        # Host-side knowledge only (no sync). With a group, token counts may differ across ranks, so callers
        # that all-reduce decide from step counts, which agree.
        if self._group is not None:
            return False
        return any(self._acc.tokens_L) or self._acc.traced_calls

    def add_sink(self, sink: Sink) -> None:
        """Add a sink after attach. State saved for its name by an earlier ``load_state_dict`` is loaded."""
        self._bind(sink)
        self._sinks.append(sink)
        saved = self._saved_sink_state.get(sink_name(sink))
        if saved is not None and isinstance(sink, Checkpointable):
            sink.load_state_dict(saved)

    def find_sink(self, cls: type[Any]) -> Any | None:
        """The first sink that is an instance of ``cls`` (e.g. the Prometheus exporter), or None."""
        return next((s for s in self._sinks if isinstance(s, cls)), None)

    def _bind(self, sink: Sink) -> None:
        # Sinks never see the monitor: delivery counters reach stats consumers through _push_stats.
        if isinstance(sink, DeliveryReporter):
            sink.on_delivery(self._push_stats)
        if isinstance(sink, StatsConsumer):
            sink.update_stats(self.stats())

    def stats(self) -> MonitorStats:
        """Hook errors so far and every delivering sink's counters, summed per notifier."""
        deliveries: dict[str, dict[str, int]] = {}
        for sink in self._sinks:
            if not isinstance(sink, DeliveryReporter):
                continue
            try:
                for notifier, outcomes in sink.delivery_stats().items():
                    row = deliveries.setdefault(str(notifier), {})
                    for outcome, n in outcomes.items():
                        row[outcome] = row.get(outcome, 0) + int(n)
            except Exception:  # noqa: BLE001 - a broken sink must not break the others
                log.exception("moewatch: delivery_stats() of %s failed", sink_name(sink))
        return MonitorStats(hook_errors=self.hook_errors, deliveries=deliveries)

    def _push_stats(self) -> None:
        # Called on the training thread (hook errors) and on delivery threads (counters).
        consumers = [s for s in self._sinks if isinstance(s, StatsConsumer)]
        if not consumers:
            return
        stats = self.stats()
        for sink in consumers:
            try:
                sink.update_stats(stats)
            except Exception:  # noqa: BLE001
                log.exception("moewatch: update_stats() of %s failed", sink_name(sink))

    def _sink_states(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sink, key in zip(self._sinks, self._sink_keys(), strict=True):
            if isinstance(sink, Checkpointable):
                out[key] = sink.state_dict()
        return out

    def _sink_keys(self) -> list[str]:
        # Stable names; a second sink of one name gets "name#2" (so two JSONL sinks never collide).
        keys: list[str] = []
        for sink in self._sinks:
            base, n = sink_name(sink), 1
            key = base
            while key in keys:
                n += 1
                key = f"{base}#{n}"
            keys.append(key)
        return keys

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue its history: step and window numbers, cumulative per-expert
        counts, per-expert dead streaks, the router signature, and sink state (alert incidents) keyed by
        sink name. Plain Python types only (``torch.save``/``json`` both work). Counts of the window under
        way are not in it: a resumed run starts a new window at the saved step."""
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "window": self._window,
            "routers": router_signature(self._routers),
            "history": self.history.state_dict(),
            "trend": self._trend.state_dict(),
            "sinks": self._sink_states(),
        }

    def load_state_dict(self, state: dict[str, Any], *, allow_router_mismatch: bool = False) -> None:
        """Continue from ``state``. A state saved from a model with other routers (layer count, experts per
        layer, module names, top_k) raises :class:`RouterMismatchError` naming the difference; with
        ``allow_router_mismatch=True`` it is accepted with a warning, and per-layer history that does not
        fit starts from zero."""
        if "routers" in state:
            diff = signature_difference(list(state["routers"]), router_signature(self._routers))
            if diff is not None:
                if not allow_router_mismatch:
                    raise RouterMismatchError(
                        f"moewatch: cannot load this monitor state: {diff}; load the state saved for this "
                        "model, or pass allow_router_mismatch=True to keep step/window numbers and alert "
                        "state and restart the per-layer history that does not fit"
                    )
                log.warning("moewatch: loading a monitor state from other routers (%s)", diff)
        elif self._routers:
            log.warning("moewatch: the monitor state has no router signature (saved by an older moewatch); "
                        "loading step/window numbers and sink state only")
        self._step = self._window_start_step = int(state.get("step", 0))
        self._window = int(state.get("window", 0))
        self._trend.load_state_dict(state.get("trend", {}))
        self.history.load_state_dict(state.get("history", {}))
        saved_sinks = dict(state.get("sinks", {}))
        self._saved_sink_state = saved_sinks
        for sink, key in zip(self._sinks, self._sink_keys(), strict=True):
            # states written before sinks had names are keyed by class name
            saved = saved_sinks.get(key, saved_sinks.get(type(sink).__name__))
            if saved is not None and isinstance(sink, Checkpointable):
                sink.load_state_dict(saved)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Monitor(run={self.config.run_name!r}, routers={len(self._routers)}, step={self._step}, "
            f"window_steps={self.config.window_steps}, closed={self._closed})"
        )

    # --- hot path -----------------------------------------------------------------------------

    def _make_hook(self, i: int, spec: RouterSpec) -> Callable[..., None]:
        acc, top_k, count_eval, strict = self._acc, spec.top_k, self.config.count_eval, self.config.strict
        extract = spec.extract
        count = acc.updater(i, top_k)  # the eager update, bound to this router
        disabled = self._disabled
        set_grad_enabled, in_graph_task = torch._C._set_grad_enabled, torch._C._current_graph_task_id
        is_compiling, is_grad_enabled = torch.compiler.is_compiling, torch.is_grad_enabled

        capturing = self._capturing

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if is_compiling():
                # Traced into the compiled graph: no graph break, nothing that changes per call. A
                # checkpoint re-run of a compiled region is recomputed by AOTAutograd without calling
                # hooks, and one that dynamo leaves to eager runs the eager branch below, which skips it.
                if (module.training or count_eval) and not disabled[i]:
                    with torch.no_grad():
                        acc.update(i, extract(module, args, output), top_k)
                return
            # Called for every router call: keep it to a few attribute reads before the device work.
            # in_graph_task() != -1: activation checkpointing re-running this forward inside backward.
            cap = capturing[0]
            if cap is None:
                if not (module.training or count_eval) or disabled[i] or in_graph_task() != -1:
                    return
                counted = True
            else:
                if disabled[i] or in_graph_task() != -1:
                    return
                counted = (module.training or count_eval) and cap.count
            grad_was_enabled = is_grad_enabled()
            try:
                set_grad_enabled(False)  # torch.no_grad() without its context-manager overhead
                out = extract(module, args, output)
                if counted:
                    count(out)
                if cap is not None:
                    cap.record(i, out)
            except Exception as exc:
                if strict:
                    raise
                self._disabled[i] = True
                self.hook_errors += 1
                report_router_failure(spec, exc)
                self._push_stats()
            finally:
                set_grad_enabled(grad_was_enabled)

        return hook

    @staticmethod
    def _make_stash(spec: RouterSpec) -> Callable[..., None]:
        def stash(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # Read by the router's hook; never keep the graph alive. A transformers router read at its experts
            # call may return (logits, weights, ids): the logits come first.
            spec.extra["stash"] = (output[0] if isinstance(output, tuple) else output).detach()

        return stash

    def _root_pre_hook(self) -> Callable[..., None]:
        # A closure, not the bound method: a bound method in the model's hooks would copy the Monitor along.
        on_root_forward = self._on_root_forward

        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            on_root_forward(module, args)

        return pre_hook

    def _on_root_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling():
            # Step counting is host work that a compiled forward cannot trace without a graph break:
            # compiled models take their steps from optimizer= or watch.step() (close() warns otherwise).
            self._root_forward_compiled = True
            return
        if module.training and not self._manual_steps and not _in_backward():
            if self._root_forwards:
                self._advance()
            self._root_forwards += 1

    def _advance(self) -> WindowReport | None:
        if self._closed:
            return None
        self._step += 1
        report = self._poll_pending()
        if self._step - self._window_start_step >= self.config.window_steps:
            blocking = not self.config.async_flush
            report = self._end_window(blocking=blocking) or report
        return report

    # --- window end ---------------------------------------------------------------------------

    def _reporting_rank(self) -> bool:
        if self._group is None:
            return True
        return dist.get_rank(self._group) == 0

    def _end_window(self, blocking: bool) -> WindowReport | None:
        meta = WindowMeta(
            run=self.config.run_name,
            window=self._window,
            step_start=self._window_start_step,
            step_end=self._step,
            time_start=self._window_start_time,
            time_end=time.time(),
            hook_errors=self.hook_errors,
        )
        self._window += 1
        self._window_start_step = self._step
        self._window_start_time = meta.time_end
        try:
            ready = self._flusher.close_window(meta, blocking)
        except StepMismatchError:
            # A configuration error that every rank sees at the same window: never a silent mix. Every
            # later window would mismatch too, so the monitor detaches (close() is then a no-op).
            self._detach()
            raise
        except Exception:
            if self.config.strict:
                raise
            log.exception("moewatch: closing window %d failed; its counts are lost", meta.window)
            return None
        return None if ready is None else self._publish(*ready)

    def _poll_pending(self) -> WindowReport | None:
        try:
            ready = self._flusher.poll()
        except StepMismatchError:
            self._detach()  # a non-blocking (CUDA) window found misaligned when its copy lands
            raise
        return None if ready is None else self._publish(*ready)

    def _finish_pending(self) -> None:
        try:
            ready = self._flusher.finish()
        except StepMismatchError:
            self._detach()
            raise
        if ready is not None:
            self._publish(*ready)

    def _publish(
        self, counts: WindowCounts, meta: WindowMeta, local: WindowCounts | None = None
    ) -> WindowReport | None:
        try:
            report = self._trend.update(self.history.update(build_window_report(self._routers, counts, meta, self.config)))
            own = report
            if local is not None:
                own = self._local_trend.update(
                    self._local_history.update(build_window_report(self._routers, local, meta, self.config))
                )
        except Exception:
            if self.config.strict:
                raise
            log.exception("moewatch: building window %d failed", meta.window)
            return None
        self.latest = report
        reporting = self._reporting_rank()
        if reporting:
            self._log_invalid_ids(report)
            self._log_nothing_counted(report)
        for sink in self._sinks:
            # Per-rank sinks (prometheus.per_rank) get this rank's own counts on every rank; the others get
            # the group's window, on the reporting rank only.
            per_rank = wants_rank_counts(sink)
            if per_rank or reporting:
                try:
                    sink.emit(own if per_rank else report)
                except Exception:  # noqa: BLE001 - a sink must never reach the training loop
                    if self.config.strict:
                        raise
                    log.exception("moewatch: sink %s failed on window %d", sink_name(sink), meta.window)
        return report

    def _log_invalid_ids(self, report: WindowReport) -> None:
        """Warn once per router whose ids fall outside ``[0, E)``, from the window's host counts (the hot path
        only counts them, in the buffer's edge columns)."""
        for i, layer in enumerate(report.layers):
            if layer.invalid_ids <= 0 or not self._invalid_ids_logged.first(i):
                continue
            e, below = layer.num_experts, layer.invalid_ids_below
            log.warning(
                "moewatch: router %r (layer %d, family %r) produced %d expert ids outside its range [0, %d) in "
                "window %d (%d below 0, %d >= %d; %d valid): a broken router or adapter, e.g. a padding id such as "
                "-1, global expert ids on an expert-parallel rank, or the wrong num_experts. They are not counted "
                "as loads; the layer reads at least 'warning' and the invalid_ids alert fires. Logged once per "
                "router; invalid_ids in the JSONL log and moewatch_layer_invalid_ids count every window",
                layer.module, layer.index, layer.family, layer.invalid_ids, e, report.window,
                below, layer.invalid_ids - below, e, layer.assignments,
            )  # fmt: skip

    def _log_nothing_counted(self, report: WindowReport) -> None:
        """Warn once when a window of training steps saw no router call at all: the hooks are not running
        (a compiled step function that ran before attach, a model copy, routers that never run)."""
        if self._nothing_counted_logged or report.step_end <= report.step_start or report.hook_errors:
            return
        if any(layer.tokens for layer in report.layers):
            return
        self._nothing_counted_logged = True
        log.warning(
            "moewatch: window %d (steps %d-%d) counted no router call on any of the %d routers: their hooks did "
            "not run. If the training step is compiled and ran before moewatch.attach, call "
            "torch.compiler.reset() after attaching (compiled graphs do not call hooks added later); check "
            "that the model given to attach is the one being trained, and model.train() (or count_eval=True). "
            "Logged once",
            report.window, report.step_start, report.step_end, len(report.layers),
        )  # fmt: skip

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None
        for module in self._watched:
            release(module)
        self._watched.clear()
