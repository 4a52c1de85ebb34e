"""``watch.on_alert(callback)``: user code called for every alert that fires or resolves.

The sink evaluates the same alert engine as the notifiers (its own instance, so it works with no
notifier configured) on the training thread at window end, and hands each changed alert with its layer
report to a worker thread: a slow or failing callback costs the training loop nothing. It emits on the
reporting rank only (like every sink). The queue is bounded; when it is full, alerts are dropped and
counted in ``dropped``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from moewatch.alerting.engine import AlertEngine
from moewatch.alerting.model import Alert
from moewatch.alerting.settings import AlertsConfig
from moewatch.config import Thresholds
from moewatch.report import LayerReport, WindowReport

__all__ = ["AlertCallback", "AlertCallbackSink"]

log = logging.getLogger("moewatch.alerts")

AlertCallback = Callable[[Alert, LayerReport], Any]
_STOP = object()


class AlertCallbackSink:
    def __init__(self, config: AlertsConfig, thresholds: Thresholds | None = None, queue_size: int = 256) -> None:
        self.engine = AlertEngine(config, thresholds)
        self.callbacks: list[AlertCallback] = []
        self.dropped = 0
        self.errors = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="moewatch-on-alert", daemon=True)
        self._thread.start()

    def add(self, callback: AlertCallback) -> None:
        if not callable(callback):
            raise TypeError(f"moewatch: on_alert expects a callable, got {type(callback).__name__}")
        self.callbacks.append(callback)

    def emit(self, report: WindowReport) -> None:
        notification = self.engine.evaluate(report)
        if notification is None:
            return
        by_index = {layer.index: layer for layer in report.layers}
        for alert in notification.changed_alerts:
            layer = by_index.get(alert.layer)
            if layer is None:
                continue
            try:
                self._queue.put_nowait((alert, layer))
            except queue.Full:
                self.dropped += 1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                for cb in list(self.callbacks):
                    try:
                        cb(*item)
                    except Exception:  # noqa: BLE001 - user code must not kill the worker
                        self.errors += 1
                        log.exception("moewatch: on_alert callback %r failed", cb)
            finally:
                self._queue.task_done()

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait (at most ``timeout`` s) until every queued alert went through the callbacks."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self.drain(timeout)
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state.get("engine", {}))
