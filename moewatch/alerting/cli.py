"""``moewatch alert-test``: send a test notification through every configured notifier and show what
each service answered. Exit status 0 when every service accepted it, 1 otherwise (or when none is
configured), 2 for configuration errors (raised as ConfigError, printed by ``moewatch.cli``)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moewatch.alerting.delivery import DeliveryResult
    from moewatch.config import MoEWatchConfig

__all__ = ["describe_failure", "register", "run_alert_test"]

#: What a transport error means, for a person reading ``alert-test`` output (the exception text itself
#: is not shown: it embeds the URL, which can be the secret).
_ERRORS = {
    "ConnectionError": "could not connect: connection refused, host unreachable or DNS failure",
    "ConnectTimeout": "no TCP/TLS connection within alerts.connect_timeout",
    "ReadTimeout": "connected, but no answer within alerts.read_timeout",
    "SSLError": "TLS handshake failed (certificate or protocol)",
    "ProxyError": "the HTTP proxy refused or failed the request",
    "ChunkedEncodingError": "the connection dropped while reading the answer",
    "TooManyRedirects": "redirected too often",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "alert-test",
        help="send a test notification through every configured notifier",
        description="Send a test notification through each configured notifier (Slack, PagerDuty, generic "
        "webhook), reading the same configuration as training: MOEWATCH_ALERTS__* environment variables and "
        "--config FILE. Prints what each service answered. A PagerDuty test incident is resolved at once.",
    )
    p.add_argument("--config", type=Path, default=None, help="moewatch config file (TOML or YAML)")
    p.add_argument("--run-name", default=None, help="run label in the test message (default: the config's)")
    p.add_argument(
        "--no-resolve", action="store_true", help="leave the PagerDuty test incident open (do not resolve it)"
    )
    p.set_defaults(func=run_alert_test)


def describe_failure(res: DeliveryResult) -> str:
    """Text after the colon of a failed line: the service's answer, else what the error means. Never empty."""
    body = " ".join(res.body.split())[:300]
    if body:
        return body
    if res.status is not None:
        return f"HTTP {res.status} with an empty body"
    error = res.error or "no answer"
    return f"{error}: {_ERRORS[error]}" if error in _ERRORS else f"{error} (no answer from the service)"


def _load(path: Path | None) -> MoEWatchConfig:
    from moewatch.config import MoEWatchConfig, build_config

    if path is not None:
        return MoEWatchConfig.from_file(path)
    return build_config(None, {}, source="the environment")


def run_alert_test(args: argparse.Namespace) -> int:
    import requests

    from moewatch.alerting.delivery import HttpRequest, RetryPolicy, post_with_retries
    from moewatch.alerting.model import Notification, incident_key
    from moewatch.alerting.notifiers import PagerDutyNotifier
    from moewatch.alerting.sink import build_notifiers

    cfg = _load(getattr(args, "config", None))
    alerts = cfg.alerts
    notifiers = build_notifiers(alerts)
    out = sys.stdout
    if not notifiers:
        print(
            "moewatch alert-test: no notifier configured; set alerts.slack_webhook_url "
            "(MOEWATCH_ALERTS__SLACK_WEBHOOK_URL), alerts.pagerduty_routing_key "
            "(MOEWATCH_ALERTS__PAGERDUTY_ROUTING_KEY) or alerts.webhook_url (MOEWATCH_ALERTS__WEBHOOK_URL). "
            "Alerts currently go to the log only.",
            file=out,
        )
        return 1
    run = args.run_name or cfg.run_name
    now = time.time()
    key = "moewatch-test-" + incident_key(run, now, length=16)
    test = Notification(
        run=run, window=0, step=0, time=now, alerts=(), test=True,
        grafana_url=alerts.grafana_url, external_url=alerts.external_url or alerts.grafana_url, incident=key,
    )
    retries = 2 if alerts.max_retries is None else min(alerts.max_retries, 2)
    policy = replace(RetryPolicy.from_config(alerts), max_retries=retries)
    failed = 0
    with requests.Session() as session:
        for notifier in notifiers:
            reqs: list[HttpRequest] = notifier.render(test)
            resolve = None
            if isinstance(notifier, PagerDutyNotifier) and not getattr(args, "no_resolve", False):
                resolve = notifier.resolve_request(key)
                reqs.append(resolve)
            notifier_failed = False
            for req in reqs:
                if req is resolve and notifier_failed:
                    print(f"{notifier.name:<10} {notifier.target():<40} {req.label:<40} skipped: the trigger "
                          "failed, so there is no test incident to resolve", file=out)
                    continue
                t0 = time.monotonic()
                res = post_with_retries(session, req, policy, name=notifier.name, secrets=notifier.secrets())
                took = time.monotonic() - t0
                verdict = "ok" if res.ok else "FAILED"
                status = f"HTTP {res.status}" if res.status is not None else (res.error or "no answer")
                detail = " ".join(res.body.split())[:300] if res.ok else describe_failure(res)
                print(
                    f"{notifier.name:<10} {notifier.target():<40} {req.label:<40} {verdict} {status} "
                    f"({res.attempts} attempt{'s' if res.attempts != 1 else ''}, {took:.2f}s): {detail}",
                    file=out,
                )
                failed += not res.ok
                notifier_failed = notifier_failed or not res.ok
    return 1 if failed else 0
