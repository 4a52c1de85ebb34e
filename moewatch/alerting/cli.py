"""``moewatch alert-test``: send a test notification through every configured notifier and show what
each service answered. Exit status 0 when every service accepted it, 1 otherwise (or when none is
configured), 2 for configuration errors (raised as ConfigError, printed by ``moewatch.cli``)."""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import replace
from pathlib import Path

import requests

from moewatch.alerting.delivery import HttpRequest, RetryPolicy, post_with_retries
from moewatch.alerting.model import Notification
from moewatch.alerting.notifiers import PagerDutyNotifier
from moewatch.alerting.sink import build_notifiers
from moewatch.config import MoEWatchConfig, build_config

__all__ = ["register", "run_alert_test"]


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


def _load(path: Path | None) -> MoEWatchConfig:
    if path is not None:
        return MoEWatchConfig.from_file(path)
    return build_config(None, {}, source="the environment")


def run_alert_test(args: argparse.Namespace) -> int:
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
    key = "moewatch-test-" + hashlib.sha256(f"{run}\0{now}".encode()).hexdigest()[:16]
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
            if isinstance(notifier, PagerDutyNotifier) and not getattr(args, "no_resolve", False):
                reqs.append(notifier.resolve_request(key))
            for req in reqs:
                t0 = time.monotonic()
                res = post_with_retries(session, req, policy, name=notifier.name, secrets=notifier.secrets())
                took = time.monotonic() - t0
                verdict = "ok" if res.ok else "FAILED"
                status = f"HTTP {res.status}" if res.status is not None else (res.error or "no answer")
                body = " ".join(res.body.split())[:300]
                print(
                    f"{notifier.name:<10} {notifier.target():<40} {req.label:<40} {verdict} {status} "
                    f"({res.attempts} attempt{'s' if res.attempts != 1 else ''}, {took:.2f}s): {body}",
                    file=out,
                )
                failed += not res.ok
    return 1 if failed else 0
