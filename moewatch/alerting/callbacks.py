"""``watch.on_alert(callback)``: user code called for every alert that fires or resolves.

The :class:`~moewatch.alerting.sink.AlertSink` that evaluates alerts for the notifiers hands each changed
alert with its layer report to a :class:`CallbackDispatcher`: one engine, so callbacks and notifiers see
the same pending/firing/resolved transitions. The callbacks run on a worker thread: a slow or failing
callback costs the training loop nothing. The queue is bounded; when it is full, alerts are dropped and
counted in ``dropped``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from moewatch.alerting.model import Alert, Notification
from moewatch.report import LayerReport, WindowReport

__all__ = ["AlertCallback", "CallbackDispatcher"]

log = logging.getLogger(__name__)

AlertCallback = Callable[[Alert, LayerReport], Any]
_STOP = object()


class CallbackDispatcher:
    def __init__(self, queue_size: int = 256) -> None:
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

    def submit(self, notification: Notification, report: WindowReport) -> None:
        """Queue every alert that changed in ``notification`` with its layer report (never blocks)."""
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
