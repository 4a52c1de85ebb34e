"""Alert engine: Alertmanager semantics on hand-built window reports (no network)."""

from __future__ import annotations

import pickle

from moewatch.alerting.engine import AlertEngine
from moewatch.alerting.settings import AlertCondition, AlertsConfig, Severity
from tests.webhook_server import make_layer, make_report

C, W, D, N = (AlertCondition.COLLAPSED, AlertCondition.WARNING, AlertCondition.DEAD_EXPERTS,
              AlertCondition.NONFINITE)


def _engine(**kw) -> AlertEngine:
    return AlertEngine(AlertsConfig(**kw))


def _keys(n, status=None) -> set[tuple[int, AlertCondition]]:
    return {(a.layer, a.condition) for a in n.alerts if status is None or a.status == status}


def test_pending_then_firing_after_for_windows() -> None:
    e = _engine(for_windows=3)
    bad = [make_layer(0, "collapsed")]
    assert e.evaluate(make_report(0, bad)) is None  # pending 1
    assert e.evaluate(make_report(1, bad)) is None  # pending 2
    n = e.evaluate(make_report(2, bad))
    assert n is not None and _keys(n) == {(0, C)}
    assert n.firing[0].severity is Severity.CRITICAL
    assert n.changed == {n.firing[0].fingerprint}


def test_pending_resets_when_condition_clears() -> None:
    e = _engine(for_windows=2)
    assert e.evaluate(make_report(0, [make_layer(0, "collapsed")])) is None
    assert e.evaluate(make_report(1, [make_layer(0, "healthy")])) is None
    assert e.evaluate(make_report(2, [make_layer(0, "collapsed")])) is None  # pending again, from 1
    assert e.evaluate(make_report(3, [make_layer(0, "collapsed")])) is not None


def test_sixty_layers_collapsing_send_one_notification() -> None:
    e = _engine()
    layers = [make_layer(i, "collapsed", dead=(1, 2)) for i in range(60)]
    n = e.evaluate(make_report(0, layers))
    assert n is not None
    # collapsed + dead experts per layer; warning is inhibited by collapsed on the same layer
    assert _keys(n) == {(i, c) for i in range(60) for c in (C, D)}
    assert len(n.changed) == 120
    assert e.evaluate(make_report(1, layers)) is None  # nothing changed, repeat not due


def test_resolve_after_resolve_windows_and_only_once() -> None:
    e = _engine(resolve_windows=2)
    e.evaluate(make_report(0, [make_layer(0, "collapsed"), make_layer(1, "collapsed")]))
    assert e.evaluate(make_report(1, [make_layer(0, "healthy"), make_layer(1, "collapsed")])) is None
    n = e.evaluate(make_report(2, [make_layer(0, "healthy"), make_layer(1, "collapsed")]))
    assert n is not None
    assert _keys(n, "resolved") == {(0, C)} and _keys(n, "firing") == {(1, C)}
    assert n.changed == {a.fingerprint for a in n.resolved}
    resolved = n.resolved[0]
    assert resolved.ends_at == make_report(2, []).time_end
    assert e.evaluate(make_report(3, [make_layer(0, "healthy"), make_layer(1, "collapsed")])) is None


def test_flap_during_resolve_keeps_incident() -> None:
    e = _engine(resolve_windows=2)
    first = e.evaluate(make_report(0, [make_layer(0, "collapsed")]))
    e.evaluate(make_report(1, [make_layer(0, "healthy")]))
    assert e.evaluate(make_report(2, [make_layer(0, "collapsed")])) is None  # still the same incident
    e.evaluate(make_report(3, [make_layer(0, "healthy")]))
    n = e.evaluate(make_report(4, [make_layer(0, "healthy")]))
    assert n is not None and n.resolved[0].incident == first.firing[0].incident


def test_repeat_interval() -> None:
    e = _engine(repeat_interval="25s")  # windows are 10 s apart
    bad = [make_layer(0, "collapsed")]
    assert e.evaluate(make_report(0, bad)) is not None
    assert e.evaluate(make_report(1, bad)) is None
    assert e.evaluate(make_report(2, bad)) is None
    n = e.evaluate(make_report(3, bad))  # 30 s after the first notification
    assert n is not None and n.is_repeat and _keys(n, "firing") == {(0, C)}
    assert e.evaluate(make_report(4, bad)) is None


def test_insufficient_data_never_alerts_nor_resolves() -> None:
    e = _engine(resolve_windows=1)
    for w in range(5):
        assert e.evaluate(make_report(w, [make_layer(0, "insufficient_data", dead=(1, 2, 3), nonfinite=3)])) is None
    e.evaluate(make_report(5, [make_layer(0, "collapsed")]))
    assert e.evaluate(make_report(6, [make_layer(0, "insufficient_data")])) is None
    assert e.firing == [(0, "collapsed"), (0, "warning")]  # warning open but inhibited


def test_warning_then_collapse_then_recovery() -> None:
    e = _engine(resolve_windows=1)
    n = e.evaluate(make_report(0, [make_layer(0, "warning")]))
    assert _keys(n) == {(0, W)} and n.firing[0].severity is Severity.WARNING
    n = e.evaluate(make_report(1, [make_layer(0, "collapsed")]))
    assert _keys(n) == {(0, C)}  # warning stays open but is inhibited: not repeated
    n = e.evaluate(make_report(2, [make_layer(0, "warning")]))
    assert _keys(n, "resolved") == {(0, C)} and _keys(n, "firing") == {(0, W)}
    n = e.evaluate(make_report(3, [make_layer(0, "healthy")]))
    assert _keys(n, "resolved") == {(0, W)} and not n.firing


def test_newly_dead_experts_renotify_with_new_ids() -> None:
    e = _engine(conditions=["dead_experts"])
    n = e.evaluate(make_report(0, [make_layer(0, "warning", dead=(3,))]))
    assert n.firing[0].dead_expert_ids == (3,) and n.firing[0].new_dead_expert_ids == (3,)
    assert e.evaluate(make_report(1, [make_layer(0, "warning", dead=(3,))])) is None
    n = e.evaluate(make_report(2, [make_layer(0, "collapsed", dead=(3, 5, 6))]))
    assert n is not None and n.firing[0].new_dead_expert_ids == (5, 6)
    assert n.firing[0].dead_expert_ids == (3, 5, 6)
    assert "3 dead experts [3, 5, 6]" in n.firing[0].summary


def test_nonfinite_is_critical_and_conditions_are_configurable() -> None:
    e = _engine(conditions=["nonfinite"], severities={"nonfinite": "error"})
    n = e.evaluate(make_report(0, [make_layer(0, "collapsed", dead=(1,), nonfinite=7)]))
    assert _keys(n) == {(0, N)} and n.firing[0].severity is Severity.ERROR and n.firing[0].nonfinite == 7
    assert _engine().config.severity_of(N) is Severity.CRITICAL


def test_dead_experts_min() -> None:
    e = _engine(conditions=["dead_experts"], dead_experts_min=2)
    assert e.evaluate(make_report(0, [make_layer(0, "warning", dead=(1,))])) is None
    assert e.evaluate(make_report(1, [make_layer(0, "warning", dead=(1, 2))])) is not None


def test_state_survives_restart_without_repaging() -> None:
    e = _engine()
    first = e.evaluate(make_report(0, [make_layer(0, "collapsed", dead=(2,))]))
    state = pickle.loads(pickle.dumps(e.state_dict()))  # what torch.save would keep

    resumed = _engine()
    resumed.load_state_dict(state)
    assert resumed.evaluate(make_report(1, [make_layer(0, "collapsed", dead=(2,))], run="run-b")) is None
    resumed.evaluate(make_report(2, [make_layer(0, "healthy")], run="run-b"))
    n = resumed.evaluate(make_report(3, [make_layer(0, "healthy")], run="run-b"))
    assert n is not None and {a.status for a in n.alerts} == {"resolved"}
    # same identity as the original incident, even though the resumed run has another name
    assert {(a.fingerprint, a.incident) for a in n.alerts} == {(a.fingerprint, a.incident) for a in first.alerts}

    fresh = _engine()  # without the checkpoint the open incident would be paged again
    assert fresh.evaluate(make_report(1, [make_layer(0, "collapsed", dead=(2,))])) is not None


def test_grafana_link_and_labels() -> None:
    e = _engine(grafana_url="https://grafana.example.com/")
    n = e.evaluate(make_report(0, [make_layer(4, "collapsed")]))
    a = n.firing[0]
    assert a.generator_url.startswith("https://grafana.example.com/d/moewatch-layer?var-run=run-a&var-layer=4&")
    assert a.labels == {
        "alertname": "MoEWatchLayerCollapsed", "run": "run-a", "layer": "4",
        "module": "model.layers.4.mlp.gate", "condition": "collapsed", "severity": "critical",
    }
    assert [m.name for m in a.metrics] == ["load_cov", "dead_ratio", "top2_excess", "norm_entropy"]
    assert a.metrics[0].value == 1.8 and a.metrics[0].collapsed == 1.0


def _faulty(i: int, state: str = "warning", **faults) -> object:
    return make_layer(i, state).model_copy(update=faults)


def test_invalid_ids_alert_is_a_warning_and_holds_back_the_layer_warning() -> None:
    e = _engine(resolve_windows=1)
    n = e.evaluate(make_report(0, [_faulty(0, invalid_ids=128)]))
    assert _keys(n) == {(0, AlertCondition.INVALID_IDS)}  # the layer's warning alert is open but inhibited
    alert = n.firing[0]
    assert alert.severity is Severity.WARNING and alert.invalid_ids == 128 and alert.name == "MoEWatchRouterInvalidIds"
    assert "128 expert ids out of range" in alert.summary
    assert e.firing == [(0, "invalid_ids"), (0, "warning")]
    # the ids are fixed but the layer is still drifting: the fault resolves and the warning is told now
    n = e.evaluate(make_report(1, [_faulty(0)]))
    assert _keys(n, "resolved") == {(0, AlertCondition.INVALID_IDS)} and _keys(n, "firing") == {(0, W)}


def test_nonfinite_holds_back_the_layer_warning_but_not_a_collapse() -> None:
    e = _engine()
    n = e.evaluate(make_report(0, [_faulty(0, nonfinite=5), _faulty(1, "collapsed", nonfinite=5)]))
    assert _keys(n) == {(0, N), (1, N), (1, C)}
    # with the fault conditions switched off, the layer's warning alert is what tells
    e = _engine(conditions=["collapsed", "warning"])
    n = e.evaluate(make_report(0, [_faulty(0, nonfinite=5, invalid_ids=3)]))
    assert _keys(n) == {(0, W)}


def test_invalid_ids_alert_state_survives_a_checkpoint() -> None:
    e = _engine()
    first = e.evaluate(make_report(0, [_faulty(0, invalid_ids=7)])).firing[0]
    resumed = _engine()
    resumed.load_state_dict(pickle.loads(pickle.dumps(e.state_dict())))
    n = resumed.evaluate(make_report(1, [_faulty(0, invalid_ids=9)]))
    assert n is None  # same incident, nothing new to tell
    assert resumed.firing == e.firing
    again = resumed._snapshot(resumed._tracks[(0, "invalid_ids")], "firing")
    assert again.incident == first.incident and again.invalid_ids == 9
