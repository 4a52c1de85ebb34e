"""Delivery off the training thread: one bounded queue and one worker thread per notifier.

``submit`` never blocks (a short lock; a full queue drops its oldest notification and counts it). The
worker renders each notification into HTTP requests and posts them with connect/read timeouts, retrying
connection errors, 5xx and 429 with exponential backoff and jitter (``Retry-After`` honoured, capped),
never other 4xx. By default it retries for as long as the process lives (``max_retries=None``), the delay
capped at ``backoff_max``: an outage of any length loses nothing. Notifications of one alert group (one
run, one incident) that queue up behind a failing endpoint are coalesced into the group's latest state
(keeping alerts that resolved meanwhile), and a notification still being retried is superseded by a newer
one of its group, so a long outage delivers the present, once, not a backlog. ``close`` flushes until a
deadline, then gives up: what is still undelivered is logged with its count and counted as ``dropped``. The
worker threads are daemons so a hanging endpoint can never keep the process alive.

Secrets live in request URLs (Slack) and bodies (PagerDuty): nothing here logs a URL, a body or the text
of a ``requests`` exception (which embeds the URL); service answers are logged with secrets redacted.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import requests
from urllib3.exceptions import InvalidHeader
from urllib3.util import Retry

from moewatch._once import Once
from moewatch.alerting.model import Notification
from moewatch.alerting.security import redact, register_secrets
from moewatch.alerting.settings import AlertCondition, AlertsConfig
from moewatch.sinks.base import DELIVERY_OUTCOMES

__all__ = [
    "DeliveryResult",
    "DeliveryStats",
    "DeliveryWorker",
    "HttpNotifier",
    "HttpRequest",
    "RetryPolicy",
    "coalesce",
    "post_with_retries",
    "redact",
]

log = logging.getLogger(__name__)

# urllib3's Retry parses Retry-After and knows which statuses carry it; the retry loop itself stays here
# rather than in an HTTPAdapter(max_retries=Retry(...)) because moewatch needs what Retry does not give:
# retries for as long as the process lives, counted one by one (moewatch_notifications_total{outcome=
# "retried"}), a backoff that a newer notification of the same group can supersede, and a deadline at
# close() that cuts a backoff sleep short.
_RETRY = Retry()

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


_ALERTS = AlertsConfig.model_fields  # RetryPolicy's defaults are the settings' defaults


@dataclass(frozen=True)
class RetryPolicy:
    connect_timeout: float = _ALERTS["connect_timeout"].default
    read_timeout: float = _ALERTS["read_timeout"].default
    max_retries: int | None = _ALERTS["max_retries"].default  # None: retry while the process lives
    backoff_initial: float = _ALERTS["backoff_initial"].default
    backoff_max: float = _ALERTS["backoff_max"].default
    retry_after_max: float = _ALERTS["retry_after_max"].default

    @classmethod
    def from_config(cls, cfg: AlertsConfig) -> RetryPolicy:
        return cls(
            cfg.connect_timeout, cfg.read_timeout, cfg.max_retries, cfg.backoff_initial, cfg.backoff_max,
            cfg.retry_after_max,
        )

    def backoff(self, retry: int) -> float:
        """Delay before retry number ``retry`` (1-based): exponential, capped, with jitter in [50 %, 100 %]."""
        base = min(self.backoff_max, self.backoff_initial * 2 ** min(retry - 1, 64))
        return base * random.uniform(0.5, 1.0)


class DeliveryStats:
    """Thread-safe counters of :data:`~moewatch.sinks.base.DELIVERY_OUTCOMES`. ``listeners`` are called
    (on the counting thread, outside the lock) after every change."""

    FIELDS = DELIVERY_OUTCOMES

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)
        self.listeners: list[Callable[[], None]] = []

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 - a listener must not break delivery
                log.exception("moewatch: delivery stats listener %r failed", listener)

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
    abandoned: bool = False  # ``sleep`` refused to wait (close deadline, or superseded)


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date, parsed by urllib3), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(_RETRY.parse_retry_after(value.strip())))
    except (InvalidHeader, TypeError, ValueError):
        return None


def post_with_retries(
    session: requests.Session,
    req: HttpRequest,
    policy: RetryPolicy,
    *,
    name: str,
    stats: DeliveryStats | None = None,
    secrets: list[str] | None = None,
    sleep: Callable[[float], bool] | None = None,
    first_attempt: int = 1,
) -> DeliveryResult:
    """POST ``req`` until it succeeds, fails for good, or ``sleep`` refuses to wait (returns False).

    Counts one ``retried`` per retry and one ``sent`` or ``failed`` at the end; when ``sleep`` refuses, the
    result has ``abandoned=True`` and nothing is counted (the caller knows why it refused).
    ``first_attempt`` > 1 continues the backoff of an earlier, superseded request.
    """
    secrets = secrets or []
    wait = sleep or (lambda s: (time.sleep(s), True)[1])
    data = json.dumps(req.body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "moewatch", **req.headers}
    attempt = first_attempt - 1
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
                if after is not None and status in _RETRY.RETRY_AFTER_STATUS_CODES:
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
        if policy.max_retries is not None and attempt > policy.max_retries:
            log.warning(
                "moewatch: %s notification (%s) failed after %d attempts: %s%s",
                name, req.label, attempt, error, f": {body[:_BODY_LOG_CHARS]}" if body else "",
            )
            if stats:
                stats.add("failed")
            return DeliveryResult(False, status, body, attempt, error)
        if delay is None:
            delay = policy.backoff(attempt)
        level = logging.WARNING if attempt == 3 else logging.INFO
        log.log(
            level, "moewatch: %s notification (%s) got %s; retry %d in %.2fs%s", name, req.label, error, attempt,
            delay, " (retrying until it is delivered or the monitor closes)" if policy.max_retries is None else "",
        )
        if not wait(delay):
            return DeliveryResult(False, status, body, attempt, "abandoned", abandoned=True)
        if stats:
            stats.add("retried")


def _group(n: Notification) -> tuple[str, str, bool]:
    return (n.group_key, n.incident, n.test)


def coalesce(older: Notification, newer: Notification) -> Notification:
    """One notification saying what ``older`` then ``newer`` (same group and incident) said: ``newer``'s
    alerts plus the alerts that resolved in ``older`` and are not in ``newer``; changed in either."""
    assert _group(older) == _group(newer), "only notifications of one group and incident coalesce"
    present = {a.fingerprint for a in newer.alerts}
    carried = tuple(a for a in older.alerts if a.status == "resolved" and a.fingerprint not in present)
    alerts = newer.alerts + carried
    keep = {a.fingerprint for a in alerts}
    return replace(newer, alerts=alerts, changed=frozenset(newer.changed | (older.changed & keep)))


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
        self._drop_logged = Once()
        self._inflight: Notification | None = None
        self._abandoned = False  # close() gave up on the in-flight notification (and counted it)
        self._failing = False  # the endpoint's last answer was a failure: coalesce what queues up
        self._attempts = 0  # attempts so far of the current outage (the backoff continues across supersedes)
        self._resume_at = 0.0  # when the superseded request's next retry was due

    @property
    def name(self) -> str:
        return self.notifier.name

    def submit(self, notification: Notification) -> None:
        """Queue ``notification``; never blocks. While the endpoint is failing, a queued notification of the
        same group and incident is replaced by the coalesced one; when the queue is full the oldest one is
        dropped."""
        with self._cv:
            if self._closing:
                self.stats.add("dropped")
                return
            key = _group(notification)
            for i in range(len(self._queue) - 1, -1, -1):
                if self._failing and _group(self._queue[i]) == key:
                    self._queue[i] = coalesce(self._queue[i], notification)
                    self.stats.add("coalesced")
                    self._cv.notify_all()
                    return
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self.stats.add("dropped")
                if self._drop_logged.first():
                    log.warning(
                        "moewatch: %s notification queue is full (%d); dropping the oldest (counted in "
                        "delivery_stats; raise alerts.queue_size if the service is only slow)",
                        self.name, self._queue_size,
                    )
            self._queue.append(notification)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"moewatch-alerts-{self.name}", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def pending(self) -> int:
        """Notifications queued (not counting the one being delivered)."""
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
        in time; what is still undelivered then (queued, or in flight) is logged and counted as dropped."""
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
            if not done and self._inflight is not None:
                left += 1
                self._abandoned = True
        if left:
            self._count_dropped(left)
        if done:
            self._session.close()
        return done

    def _count_dropped(self, n: int) -> None:
        self.stats.add("dropped", n)
        log.warning(
            "moewatch: %s: %d notification(s) still undelivered at close, after alerts.close_timeout; dropped "
            "(counted in moewatch_notifications_total{outcome='dropped'})", self.name, n,
        )

    # --- worker thread -----------------------------------------------------------------------------

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() > self._deadline

    def _superseded(self, key: tuple[str, str, bool]) -> bool:
        return any(_group(n) == key for n in self._queue)

    def _sleep(self, seconds: float, key: tuple[str, str, bool] | None = None) -> bool:
        """Wait ``seconds``; False (at once) when the close deadline would pass first, or when a newer
        notification of group ``key`` arrives (``key`` is given for retry waits only)."""
        end = time.monotonic() + seconds
        with self._cv:
            if key is not None:
                self._failing = True
                self._resume_at = end
            while True:
                if self._deadline is not None and end > self._deadline:
                    return False
                if key is not None and self._superseded(key):
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
                if self._failing:  # the endpoint is down: deliver the group's latest state only
                    key = _group(item)
                    for queued in [n for n in self._queue if _group(n) == key]:
                        self._queue.remove(queued)
                        item = coalesce(item, queued)
                        self.stats.add("coalesced")
                self._inflight = item
            outcome = self._deliver(item)
            with self._cv:
                self._inflight = None
                if self._abandoned:
                    return
                if outcome == "superseded":
                    key = _group(item)
                    for i, queued in enumerate(self._queue):
                        if _group(queued) == key:
                            del self._queue[i]
                            self._queue.appendleft(coalesce(item, queued))  # the group keeps its place
                            self.stats.add("coalesced")
                            break
                    else:  # cannot happen (the queue only loses entries at close); keep it
                        self._queue.appendleft(item)
                elif outcome == "abandoned":
                    self._count_dropped(1)

    def _deliver(self, notification: Notification) -> str:
        """``sent``, ``failed``, ``superseded`` (a newer state of its group is queued: deliver that
        instead) or ``abandoned`` (the close deadline came first)."""
        try:
            requests_ = self.notifier.render(notification)
        except Exception:  # noqa: BLE001 - a rendering bug must not kill the worker
            log.exception("moewatch: rendering a %s notification failed", self.name)
            self.stats.add("failed")
            return "failed"
        key = _group(notification)
        outcome = "sent"
        for i, req in enumerate(requests_):
            wait = self._last_send + self.notifier.min_interval - time.monotonic()
            resuming = self._failing and i == 0  # a superseded request's retry was due then: keep the backoff
            if resuming:
                wait = max(wait, self._resume_at - time.monotonic())
            if wait > 0 and not self._sleep(wait, key if resuming else None):
                with self._cv:
                    superseded = not self._past_deadline() and self._superseded(key)
                return "superseded" if superseded else "abandoned"
            # Only before the first request succeeds may a newer state replace this one (no resends).
            group = key if i == 0 else None
            res = post_with_retries(
                self._session, req, self.policy, name=self.name, stats=self.stats,
                secrets=self.notifier.secrets(), sleep=lambda s, g=group: self._sleep(s, g),
                first_attempt=self._attempts + 1 if i == 0 else 1,
            )
            with self._cv:
                down = res.status is None or res.status >= 500 or res.status == 429
                self._failing = not res.ok and down
                self._attempts = res.attempts if res.abandoned else 0
            self._last_send = time.monotonic()
            if res.abandoned:
                with self._cv:
                    superseded = not self._past_deadline() and i == 0 and self._superseded(key)
                if superseded:
                    log.info("moewatch: %s notification superseded by a newer state of its group", self.name)
                    return "superseded"
                return "abandoned"
            if not res.ok:
                outcome = "failed"
        return outcome
