"""The sink contract (moewatch.sinks.base): sinks never see the monitor; they get reports and
MonitorStats; their state in state_dict() is keyed by a stable name; on_alert shares the notifiers'
alert engine."""

from __future__ import annotations

import threading

import prometheus_client.parser
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

import moewatch
from moewatch.alerting.sink import AlertSink
from moewatch.exporter.collector import MoEWatchCollector
from moewatch.sinks.base import Checkpointable, MonitorStats
from tests.fakes import ToyMoE, quiet, tokens_for

COLLAPSED = [[0, 1]] * 200


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in prometheus_client.parser.text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_collector_serves_reports_and_stats_alone_with_no_monitor() -> None:
    model = ToyMoE(num_experts=8, top_k=2, layers=1)
    with moewatch.attach(model, **quiet(min_fair_share=8, window_steps=1)) as watch:
        model(tokens_for(COLLAPSED))
        report = watch.step()
    assert report is not None
    collector = MoEWatchCollector("r1")
    registry = CollectorRegistry()
    registry.register(collector)
    collector.update(report)
    collector.update_stats(MonitorStats(hook_errors=3, deliveries={"slack": {"sent": 2, "dropped": 1}}))
    s = _samples(registry)
    assert s[("moewatch_hook_errors_total", (("run", "r1"),))] == 3
    assert s[("moewatch_notifications_total", (("notifier", "slack"), ("outcome", "sent"), ("run", "r1")))] == 2
    assert s[("moewatch_notifications_total", (("notifier", "slack"), ("outcome", "dropped"), ("run", "r1")))] == 1
    assert s[("moewatch_windows_total", (("run", "r1"),))] == 1


class _Counting:
    """A checkpointable sink, two of which share one name."""

    name = "counting"

    def __init__(self) -> None:
        self.windows = 0

    def emit(self, report: object) -> None:
        self.windows += 1

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, int]:
        return {"windows": self.windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.windows = state["windows"]


def test_sink_state_is_keyed_by_stable_name_and_two_of_one_name_do_not_collide() -> None:
    a, b = _Counting(), _Counting()
    assert isinstance(a, Checkpointable)
    model = ToyMoE(num_experts=8, top_k=2, layers=1)
    with moewatch.attach(model, sinks=[a, b], **quiet(window_steps=1)) as watch:
        for _ in range(2):
            model(tokens_for(COLLAPSED))
            watch.step()
        a.windows = 10  # the two sinks now hold different state
        state = watch.state_dict()
    assert state["sinks"] == {"counting": {"windows": 10}, "counting#2": {"windows": 2}}
    c, d = _Counting(), _Counting()
    model2 = ToyMoE(num_experts=8, top_k=2, layers=1)
    with moewatch.attach(model2, sinks=[c, d], **quiet(window_steps=1)) as watch2:
        watch2.load_state_dict(state)
    assert (c.windows, d.windows) == (10, 2)


def test_state_saved_under_class_names_still_loads() -> None:
    sink = _Counting()
    model = ToyMoE(num_experts=8, top_k=2, layers=1)
    with moewatch.attach(model, sinks=[sink], **quiet(window_steps=1)) as watch:
        watch.load_state_dict({"step": 0, "window": 0, "sinks": {"_Counting": {"windows": 7}}})
    assert sink.windows == 7


def test_on_alert_uses_the_notifiers_engine_not_a_second_one(tmp_path) -> None:
    seen: list[str] = []
    done = threading.Event()
    model = ToyMoE(num_experts=8, top_k=2, layers=1)
    cfg = quiet(min_fair_share=8, window_steps=1, alerts={"enabled": True, "log_notifications": False})
    with moewatch.attach(model, **cfg) as watch:
        alert_sinks = [s for s in watch.sinks if isinstance(s, AlertSink)]
        assert len(alert_sinks) == 1
        watch.on_alert(lambda alert, layer: (seen.append(alert.status), done.set()))
        assert [s for s in watch.sinks if isinstance(s, AlertSink)] == alert_sinks  # no sink was added
        for _ in range(3):
            model(tokens_for(COLLAPSED))
            watch.step()
        assert done.wait(5)
        engine_state = alert_sinks[0].engine.state_dict()
    assert "firing" in seen
    assert any(t["status"] == "firing" for t in engine_state["tracks"])


def test_on_alert_with_alerts_disabled_adds_one_silent_alert_sink_and_resumes_its_state() -> None:
    model = ToyMoE(num_experts=8, top_k=2, layers=1)
    fired: list[str] = []
    with moewatch.attach(model, **quiet(min_fair_share=8, window_steps=1)) as watch:
        watch.on_alert(lambda alert, layer: fired.append(alert.status))
        watch.on_alert(lambda alert, layer: None)
        added = [s for s in watch.sinks if isinstance(s, AlertSink)]
        assert len(added) == 1 and added[0].workers == [] and added[0].log_notifier is None
        for _ in range(3):
            model(tokens_for(COLLAPSED))
            watch.step()
        state = watch.state_dict()
    assert "alerts" in state["sinks"]
    # a resumed run that registers its callback after load_state_dict still knows the open incident
    model2 = ToyMoE(num_experts=8, top_k=2, layers=1)
    with moewatch.attach(model2, **quiet(min_fair_share=8, window_steps=1)) as watch2:
        watch2.load_state_dict(state)
        watch2.on_alert(lambda alert, layer: None)
        sink2 = next(s for s in watch2.sinks if isinstance(s, AlertSink))
        assert sink2.engine.state_dict()["tracks"] == state["sinks"]["alerts"]["engine"]["tracks"]
