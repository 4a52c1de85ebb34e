"""Notifier payloads as the services document them, delivered to a real loopback HTTP server."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from moewatch.alerting.engine import AlertEngine
from moewatch.alerting.notifiers.common import CONDITION_TITLES, alert_line, headline
from moewatch.alerting.notifiers.pagerduty import pagerduty_event
from moewatch.alerting.notifiers.slack import slack_payload
from moewatch.alerting.notifiers.webhook import alertmanager_payload
from moewatch.alerting.settings import AlertCondition, AlertsConfig
from moewatch.alerting.sink import AlertSink
from moewatch.config import MoEWatchConfig
from tests.webhook_server import WebhookServer, make_layer, make_report, status

FAST = dict(slack_min_interval=0.0, backoff_initial=0.01, backoff_max=0.05, close_timeout=5.0)
PD_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"


def _emit_all(sink: AlertSink, reports: list) -> None:
    for r in reports:
        sink.emit(r)


def _collapse_then_recover(layers: int = 3) -> list:
    bad = [make_layer(i, "collapsed", dead=(1, 2)) for i in range(layers)] + [make_layer(layers, "healthy")]
    good = [make_layer(i, "healthy") for i in range(layers + 1)]
    return [make_report(0, bad), make_report(1, bad), make_report(2, good), make_report(3, good)]


def _texts(blocks: list[dict]) -> str:
    out = []
    for b in blocks:
        if "text" in b:
            out.append(b["text"]["text"])
        for el in b.get("elements", []):
            out.append(el["text"])
    return "\n".join(out)


def test_slack_collapse_and_recovery_messages() -> None:
    with WebhookServer() as srv:
        sink = AlertSink(AlertsConfig(
            slack_webhook_url=srv.url("/services/T000/B000/XXXX"), grafana_url="https://grafana.example.com",
            **FAST,
        ))
        _emit_all(sink, _collapse_then_recover())
        sink.close()
        hits = srv.wait_for(2)
    assert [h.path for h in hits] == ["/services/T000/B000/XXXX"] * 2
    fire, resolve = hits[0].body, hits[1].body
    assert hits[0].headers["Content-Type"] == "application/json"
    assert set(fire) == {"text", "blocks"}
    assert fire["text"].startswith("[FIRING:6] moewatch run run-a step 10: layers 0-2 collapsed")
    assert "L0:[1, 2]" in fire["text"]
    assert fire["blocks"][0]["type"] == "header" and fire["blocks"][0]["text"]["type"] == "plain_text"
    assert "6 alerts firing" in fire["blocks"][0]["text"]["text"]
    body = _texts(fire["blocks"])
    assert "*Run* `run-a`" in body and "*step* 10" in body
    assert "*Firing: collapsed* (critical) — layers 0-2" in body
    assert "`model.layers.1.mlp.gate` — load_cov 1.8 &gt; 1 (collapsed)" in body  # value against threshold
    assert "2 dead experts: [1, 2]" in body
    assert "Thresholds: load_cov warning ≥ 0.35 / collapsed > 1, dead_ratio warning > 0 / collapsed > 0.1" in body
    assert "<https://grafana.example.com/d/moewatch-layer?var-run=run-a&var-layer=0" in body
    assert all(b["type"] in {"header", "section", "context"} for b in fire["blocks"])
    assert all(len(b["text"]["text"]) <= 3000 for b in fire["blocks"] if b["type"] == "section")
    assert resolve["text"].startswith("[RESOLVED] moewatch run run-a step 40")
    assert "6 alerts resolved" in resolve["blocks"][0]["text"]["text"]
    assert "*Resolved: collapsed*" in _texts(resolve["blocks"])
    assert sink.delivery_stats() == {"slack": {"sent": 2, "failed": 0, "retried": 0, "dropped": 0, "coalesced": 0}}


def test_slack_message_limits_with_sixty_layers() -> None:
    from moewatch.alerting.engine import AlertEngine
    from moewatch.alerting.notifiers import slack_payload

    n = AlertEngine(AlertsConfig()).evaluate(
        make_report(0, [make_layer(i, "collapsed", dead=tuple(range(40)), experts=64) for i in range(60)])
    )
    msg = slack_payload(n)
    assert len(msg["blocks"]) <= 50
    assert "layers 0-59" in msg["text"]
    assert all(len(b["text"]["text"]) <= 3000 for b in msg["blocks"] if b["type"] == "section")
    assert "… and 40 more layers" in _texts(msg["blocks"])


def test_pagerduty_trigger_and_resolve_share_one_dedup_key() -> None:
    answer = status(202, json.dumps({"status": "success", "message": "Event processed"}))
    with WebhookServer(default=answer) as srv:
        sink = AlertSink(AlertsConfig(
            pagerduty_routing_key=PD_KEY, pagerduty_url=srv.url("/v2/enqueue"),
            grafana_url="https://grafana.example.com", **FAST,
        ))
        bad = [make_layer(i, "collapsed", dead=(1, 2)) for i in range(60)]
        worse = [make_layer(i, "collapsed", dead=(1, 2, 3)) for i in range(60)]
        good = [make_layer(i, "healthy") for i in range(60)]
        _emit_all(sink, [make_report(0, bad), make_report(1, worse), make_report(2, good), make_report(3, good)])
        # a later, separate incident gets a new key
        _emit_all(sink, [make_report(4, [make_layer(0, "healthy", nonfinite=2)])])
        sink.close()
        hits = srv.wait_for(4, code=202)
    events = [h.body for h in hits]
    assert [e["event_action"] for e in events] == ["trigger", "trigger", "resolve", "trigger"]
    first, update, resolve, other = events
    assert first["routing_key"] == PD_KEY and resolve["routing_key"] == PD_KEY
    assert first["dedup_key"] == update["dedup_key"] == resolve["dedup_key"]  # one incident, one key
    assert other["dedup_key"] != first["dedup_key"]
    assert set(resolve) == {"routing_key", "event_action", "dedup_key"}
    p = first["payload"]
    assert len(p["summary"]) <= 1024 and p["summary"].startswith("[FIRING:120] moewatch run run-a step 10: layers 0-59 collapsed")
    assert p["severity"] == "critical" and p["source"] == "moewatch/run-a"
    assert p["timestamp"].endswith("Z") and p["class"] == "collapsed,dead_experts"
    d = p["custom_details"]
    assert d["layers_firing"] == list(range(60)) and d["dead_expert_ids"]["7"] == [1, 2]
    assert d["firing"][0]["metrics"]["load_cov"] == 1.8 and d["truncated_alerts"] == 20
    assert d["firing"][0]["thresholds"][0] == "load_cov 1.8 (warning >= 0.35, collapsed > 1)"
    assert first["links"][0]["href"].startswith("https://grafana.example.com/d/moewatch-layer?")
    assert update["payload"]["custom_details"]["dead_expert_ids"]["7"] == [1, 2, 3]
    assert other["payload"]["severity"] == "critical" and other["payload"]["class"] == "nonfinite"


def test_pagerduty_conditions_default_excludes_warning() -> None:
    with WebhookServer(default=status(202, "{}")) as srv:
        sink = AlertSink(AlertsConfig(pagerduty_routing_key=PD_KEY, pagerduty_url=srv.url(), **FAST))
        _emit_all(sink, [make_report(w, [make_layer(0, "warning")]) for w in range(3)])
        sink.close()
    assert srv.hits == []
    assert sink.delivery_stats()["pagerduty"]["sent"] == 0


def test_webhook_alertmanager_v4_payload() -> None:
    with WebhookServer() as srv:
        sink = AlertSink(AlertsConfig(
            webhook_url=srv.url("/alerts"), webhook_bearer_token="s3cr3t-token", receiver="ml-oncall",
            grafana_url="https://grafana.example.com", webhook_max_alerts=4, **FAST,
        ))
        _emit_all(sink, _collapse_then_recover())
        sink.close()
        hits = srv.wait_for(2)
    fire, resolve = hits[0].body, hits[1].body
    assert hits[0].headers["Authorization"] == "Bearer s3cr3t-token"
    assert set(fire) == {
        "version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels", "commonLabels",
        "commonAnnotations", "externalURL", "alerts",
    }
    assert fire["version"] == "4" and fire["status"] == "firing" and fire["receiver"] == "ml-oncall"
    assert fire["groupLabels"] == {"run": "run-a"} and fire["groupKey"] == '{}:{run="run-a"}'
    assert fire["commonLabels"] == {"run": "run-a"} and fire["externalURL"] == "https://grafana.example.com"
    assert len(fire["alerts"]) == 4 and fire["truncatedAlerts"] == 2
    a = fire["alerts"][0]
    assert set(a) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
    assert a["status"] == "firing" and a["endsAt"] == "0001-01-01T00:00:00Z"
    assert a["startsAt"] == "2023-11-14T22:13:30.000Z"
    assert a["labels"]["alertname"] in {"MoEWatchLayerCollapsed", "MoEWatchDeadExperts"}
    assert a["labels"]["severity"] in {"critical", "warning"} and a["labels"]["layer"] == "0"
    assert len(a["fingerprint"]) == 16 and "summary" in a["annotations"] and "description" in a["annotations"]
    assert a["generatorURL"].startswith("https://grafana.example.com/d/moewatch-layer?var-run=run-a&var-layer=0")
    dead = next(x for x in fire["alerts"] if x["labels"]["alertname"] == "MoEWatchDeadExperts")
    assert dead["annotations"]["dead_expert_ids"] == "1,2"
    assert "dead_ratio 0.25 (warning > 0, collapsed > 0.1)" in dead["annotations"]["metrics"]
    assert resolve["status"] == "resolved"
    assert {x["status"] for x in resolve["alerts"]} == {"resolved"}
    assert all(x["endsAt"] == "2023-11-14T22:14:00.000Z" for x in resolve["alerts"])
    assert {x["fingerprint"] for x in resolve["alerts"]} >= {a["fingerprint"]}


def test_log_notifier_is_the_default(caplog: pytest.LogCaptureFixture) -> None:
    sink = AlertSink(AlertsConfig())
    assert sink.workers == [] and sink.log_notifier is not None
    with caplog.at_level(logging.INFO, logger="moewatch.alerts"):
        _emit_all(sink, _collapse_then_recover(layers=1))
    sink.close()
    text = caplog.text
    assert "[FIRING:2] moewatch run run-a step 10: layer 0 collapsed" in text
    assert "layer 0 (model.layers.0.mlp.gate) collapsed [critical] - load_cov 1.8 > 1 (collapsed)" in text
    assert "[RESOLVED]" in text
    assert sink.delivery_stats() == {}


def test_factory_registered_and_disabled() -> None:
    from moewatch.alerting.sink import make_alert_sink
    from moewatch.sinks import SINK_FACTORIES

    assert make_alert_sink in SINK_FACTORIES
    assert make_alert_sink(MoEWatchConfig(alerts={"enabled": False})) is None
    sink = make_alert_sink(MoEWatchConfig(thresholds={"load_cov_collapsed": 2.0}))
    assert isinstance(sink, AlertSink) and sink.engine.thresholds.load_cov_collapsed == 2.0
    sink.close()


@pytest.mark.parametrize("condition", list(AlertCondition), ids=lambda c: c.value)
def test_every_condition_renders_for_every_notifier(condition: AlertCondition) -> None:
    """Each alert condition has a title and a summary in every payload (projected_collapse had no title and
    broke the Slack and log notifiers with a KeyError)."""
    layer = make_layer(2, "collapsed", dead=(1,), nonfinite=2).model_copy(
        update={"invalid_ids": 3, "projected_collapse_step": 15, "projected_collapse_metric": "load_cov"}
    )
    n = AlertEngine(AlertsConfig(conditions=[condition])).evaluate(make_report(0, [layer]))
    assert n is not None and [a.condition for a in n.firing] == [condition]
    alert = n.firing[0]
    assert alert.summary.startswith("layer 2 (model.layers.2.mlp.gate)")
    assert CONDITION_TITLES[condition] in headline(n)
    assert alert_line(alert).startswith(f"layer 2 (model.layers.2.mlp.gate) {condition.value}")
    assert CONDITION_TITLES[condition] in json.dumps(slack_payload(n))
    pd = pagerduty_event(replace(n, incident="inc-1"), PD_KEY)
    assert pd["payload"]["class"] == condition.value
    assert pd["payload"]["custom_details"]["firing"][0]["summary"] == alert.summary
    am = alertmanager_payload(n)
    assert am["alerts"][0]["labels"]["alertname"] == alert.name
