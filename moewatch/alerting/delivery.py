"""Delivery off the training thread: one bounded queue and one worker thread per notifier.

``submit`` never blocks (a short lock; a full queue drops its oldest notification and counts it). The
worker renders each notification into HTTP requests and posts them with connect/read timeouts, retrying
connection errors, 5xx and 429 with exponential backoff and jitter (``Retry-After`` honoured, capped),
never other 4xx. ``close`` flushes until a deadline, then gives up; the worker threads are daemons so a
hanging endpoint can never keep the process alive.

Secrets live in request URLs (Slack) and bodies (PagerDuty): nothing here logs a URL, a body or the text
of a ``requests`` exception (which embeds the URL); service answers are logged with secrets redacted.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests

from moewatch.alerting.model import Notification
from moewatch.alerting.security import redact, register_secrets
from moewatch.alerting.settings import AlertCondition, AlertsConfig

__all__ = [
    "DeliveryResult",
    "DeliveryStats",
    "DeliveryWorker",
    "HttpNotifier",
    "HttpRequest",
    "RetryPolicy",
    "post_with_retries",
    "redact",
]

log = logging.getLogger("moewatch.alerts")

_BODY_LOG_CHARS = 500


@dataclass(frozen=True)
class HttpRequest:
    """One POST of a JSON body. ``url`` and ``body`` may hold secrets: never log them; ``label`` is safe."""

    url: str = field(repr=False)
    body: Any = field(repr=False)
    label: str = ""
    headers: dict[str, str] = field(default_factory=dict, repr=False)


class HttpNotifier(Protocol):
    """A service reached over HTTP (Slack, PagerDuty, a generic webhook)."""

    name: str
    conditions: frozenset[AlertCondition]
    min_interval: float  # seconds between two requests (Slack: 1)
    # Optional ``sends_repeats: bool`` (default True): False skips repeat notifications (PagerDuty).

    def render(self, notification: Notification) -> list[HttpRequest]: ...

    def secrets(self) -> list[str]: ...

    def target(self) -> str: ...


@dataclass(frozen=True)
class RetryPolicy:
    connect_timeout: float = 3.05
    read_timeout: float = 10.0
    max_retries: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 300.0

    @classmethod
    def from_config(cls, cfg: AlertsConfig) -> RetryPolicy:
        return cls(
            cfg.connect_timeout, cfg.read_timeout, cfg.max_retries, cfg.backoff_initial, cfg.backoff_max,
            cfg.retry_after_max,
        )

    def backoff(self, retry: int) -> float:
        """Delay before retry number ``retry`` (1-based): exponential, capped, with jitter in [50 %, 100 %]."""
        base = min(self.backoff_max, self.backoff_initial * 2 ** (retry - 1))
        return base * random.uniform(0.5, 1.0)


class DeliveryStats:
    """Thread-safe counters: sent, failed, retried, dropped."""

    FIELDS = ("sent", "failed", "retried", "dropped")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


@dataclass(frozen=True)
class DeliveryResult:
    ok: bool
    status: int | None
    body: str
    attempts: int
    error: str | None = None


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def post_with_retries(
    session: requests.Session,
    req: HttpRequest,
    policy: RetryPolicy,
    *,
    name: str,
    stats: DeliveryStats | None = None,
    secrets: list[str] | None = None,
    sleep: Callable[[float], bool] | None = None,
) -> DeliveryResult:
    """POST ``req`` until it succeeds, fails for good, or ``sleep`` refuses to wait (returns False).

    Counts one ``retried`` per retry and one ``sent`` or ``failed`` at the end.
    """
    secrets = secrets or []
    wait = sleep or (lambda s: (time.sleep(s), True)[1])
    data = json.dumps(req.body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "moewatch", **req.headers}
    attempt = 0
    while True:
        attempt += 1
        status: int | None = None
        body = ""
        delay: float | None = None
        error: str | None = None
        try:
            resp = session.post(
                req.url, data=data, headers=headers,
                timeout=(policy.connect_timeout, policy.read_timeout), allow_redirects=False,
            )
            status, body = resp.status_code, redact(resp.text[:2000], secrets)
            if 200 <= status < 300:
                if stats:
                    stats.add("sent")
                return DeliveryResult(True, status, body, attempt)
            error = f"HTTP {status}"
            if status == 429 or status >= 500:
                after = retry_after_seconds(resp.headers.get("Retry-After"))
                if after is not None and status in (429, 503):
                    delay = min(after, policy.retry_after_max)
            else:  # other 4xx (and odd 1xx/3xx): the request itself is wrong, retrying will not help
                log.warning(
                    "moewatch: %s notification (%s) rejected with HTTP %d, not retried: %s",
                    name, req.label, status, body[:_BODY_LOG_CHARS],
                )
                if stats:
                    stats.add("failed")
                return DeliveryResult(False, status, body, attempt, error)
        except requests.RequestException as exc:
            # str(exc) embeds the URL, which can be the secret: only the exception type is reported.
            error = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - the worker thread must survive anything
            error = type(exc).__name__
        if attempt > policy.max_retries:
            log.warning(
                "moewatch: %s notification (%s) failed after %d attempts: %s%s",
                name, req.label, attempt, error, f": {body[:_BODY_LOG_CHARS]}" if body else "",
            )
            if stats:
                stats.add("failed")
            return DeliveryResult(False, status, body, attempt, error)
        if delay is None:
            delay = policy.backoff(attempt)
        log.info("moewatch: %s notification (%s) got %s; retry %d in %.2fs", name, req.label, error, attempt, delay)
        if not wait(delay):
            log.warning(
                "moewatch: %s notification (%s) abandoned at close after %d attempts: %s",
                name, req.label, attempt, error,
            )
            if stats:
                stats.add("failed")
            return DeliveryResult(False, status, body, attempt, error or "abandoned")
        if stats:
            stats.add("retried")


class DeliveryWorker:
    """A bounded queue and a daemon thread delivering one notifier's notifications."""

    def __init__(
        self,
        notifier: HttpNotifier,
        policy: RetryPolicy,
        queue_size: int = 100,
        session: requests.Session | None = None,
    ) -> None:
        self.notifier = notifier
        register_secrets(notifier.secrets())
        self.policy = policy
        self.stats = DeliveryStats()
        self._queue: deque[Notification] = deque()
        self._queue_size = queue_size
        self._cv = threading.Condition()
        self._closing = False
        self._deadline: float | None = None
        self._last_send = 0.0
        self._session = session or requests.Session()
        self._thread: threading.Thread | None = None
        self._drop_logged = False

    @property
    def name(self) -> str:
        return self.notifier.name

    def submit(self, notification: Notification) -> None:
        """Queue ``notification``; never blocks. When the queue is full the oldest one is dropped."""
        with self._cv:
            if self._closing:
                self.stats.add("dropped")
                return
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self.stats.add("dropped")
                if not self._drop_logged:
                    self._drop_logged = True
                    log.warning(
                        "moewatch: %s notification queue is full (%d); dropping the oldest (counted in "
                        "delivery_stats; raise alerts.queue_size if the service is only slow)",
                        self.name, self._queue_size,
                    )
            self._queue.append(notification)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"moewatch-alerts-{self.name}", daemon=True)
                self._thread.start()
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    def request_close(self, deadline: float) -> None:
        """Stop accepting; the worker delivers what is queued until ``deadline`` (``time.monotonic()``)."""
        with self._cv:
            self._closing = True
            self._deadline = deadline
            self._cv.notify_all()

    def close(self, deadline: float) -> bool:
        """:meth:`request_close`, then wait until ``deadline`` at most. Returns True when the worker finished
        in time; what is still queued then is dropped (and counted)."""
        self.request_close(deadline)
        with self._cv:
            thread = self._thread
        done = True
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
            done = not thread.is_alive()
        with self._cv:
            left = len(self._queue)
            self._queue.clear()
        if left:
            self.stats.add("dropped", left)
            log.warning("moewatch: %s: %d queued notification(s) not delivered before close timeout", self.name, left)
        if done:
            self._session.close()
        return done

    # --- worker thread -----------------------------------------------------------------------------

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() > self._deadline

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; False (at once) when the close deadline would pass first."""
        end = time.monotonic() + seconds
        with self._cv:
            while True:
                if self._deadline is not None and end > self._deadline:
                    return False
                left = end - time.monotonic()
                if left <= 0:
                    return True
                self._cv.wait(left)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue or self._past_deadline():
                    return
                item = self._queue.popleft()
            self._deliver(item)

    def _deliver(self, notification: Notification) -> None:
        try:
            requests_ = self.notifier.render(notification)
        except Exception:  # noqa: BLE001 - a rendering bug must not kill the worker
            log.exception("moewatch: rendering a %s notification failed", self.name)
            self.stats.add("failed")
            return
        for req in requests_:
            wait = self._last_send + self.notifier.min_interval - time.monotonic()
            if wait > 0 and not self._sleep(wait):
                self.stats.add("failed")
                continue
            post_with_retries(
                self._session, req, self.policy, name=self.name, stats=self.stats,
                secrets=self.notifier.secrets(), sleep=self._sleep,
            )
            self._last_send = time.monotonic()
