"""Prometheus alerting rules (and their ``promtool test rules`` unit tests) as code.

``alerts/moewatch-rules.yaml`` and ``alerts/moewatch-rules.test.yaml`` are generated from here
(``python -m moewatch.exporter.generate``); a test keeps the committed files equal to the output.
Only Prometheus 2.42 features are used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import yaml

__all__ = [
    "AlertSpec",
    "RUNBOOK_URL",
    "RuleOptions",
    "alert_specs",
    "rules_yaml",
    "rules_document",
    "rules_test_document",
    "rules_test_yaml",
]

RUNBOOK_URL = "https://github.com/moewatch/moewatch/blob/main/alerts/runbook.md"


@dataclass(frozen=True)
class RuleOptions:
    """Knobs of the generated rules. The e2e test uses short ``for`` durations and its own ``job``."""

    job: str = "moewatch"
    collapsed_for: str = "5m"
    warning_for: str = "15m"
    dead_for: str = "10m"
    absent_for: str = "5m"
    stalled_for: str = "5m"
    projected_for: str = "2m"
    #: MoEWatchProjectedCollapse fires when the projected collapse is at most this many steps ahead.
    projected_horizon_steps: int = 500
    hook_errors_for: str = "1m"
    nonfinite_for: str = "1m"
    invalid_ids_for: str = "1m"
    #: No window closed for ``stalled_factor`` x the last window's length, and for at least ``stalled_after``.
    stalled_factor: int = 3
    stalled_after: str = "10m"
    runbook_url: str = RUNBOOK_URL

    def short(self, duration: str = "3s") -> RuleOptions:
        """Every ``for`` set to ``duration`` (``stalled_after`` is kept: a short test run must not look
        stalled while it starts up)."""
        return replace(
            self,
            collapsed_for=duration,
            warning_for=duration,
            dead_for=duration,
            absent_for=duration,
            stalled_for=duration,
            projected_for=duration,
            hook_errors_for=duration,
            nonfinite_for=duration,
            invalid_ids_for=duration,
        )


@dataclass(frozen=True)
class AlertSpec:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    def rule(self, runbook_url: str) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": f"{runbook_url}#{self.name.lower()}",
            },
        }


_WHERE = "layer {{ $labels.layer }} ({{ $labels.module }}) of run {{ $labels.run }}"


def alert_specs(opts: RuleOptions = RuleOptions()) -> list[AlertSpec]:
    job = opts.job
    return [
        AlertSpec(
            "MoEWatchLayerCollapsed",
            "moewatch_layer_state == 2",
            opts.collapsed_for,
            "critical",
            "MoE router collapsed: " + _WHERE,
            "The router of "
            + _WHERE
            + " has been collapsed (a few experts take most tokens, others are dead) "
            "for "
            + opts.collapsed_for
            + ". Collapse rarely recovers by itself: act before more compute is spent.",
        ),
        AlertSpec(
            "MoEWatchLayerWarning",
            "moewatch_layer_state == 1",
            opts.warning_for,
            "warning",
            "MoE router imbalanced: " + _WHERE,
            "The router of "
            + _WHERE
            + " has been in the warning band (load CV, dead experts, top-2 share or "
            "entropy past the healthy threshold) for " + opts.warning_for + ".",
        ),
        AlertSpec(
            "MoEWatchDeadExperts",
            # insufficient_data (-1) windows never alert (moewatch.health)
            "moewatch_layer_dead_experts > 0 and moewatch_layer_state >= 0",
            opts.dead_for,
            "warning",
            "Dead experts: " + _WHERE,
            "{{ $value }} expert(s) of " + _WHERE + " received less than dead_fraction of their fair share "
            "of tokens in every window for " + opts.dead_for + ".",
        ),
        AlertSpec(
            "MoEWatchExporterAbsent",
            f'up{{job="{job}"}} == 0 or absent(up{{job="{job}"}})',
            opts.absent_for,
            "warning",
            'moewatch exporter of job "' + job + '" is down or gone',
            "A moewatch target of job "
            + job
            + " has been down, or no such target discovered, for "
            + opts.absent_for
            + ": router health of the training run is not being watched.",
        ),
        AlertSpec(
            "MoEWatchTrainingStalled",
            "time() - moewatch_window_end_timestamp_seconds > clamp_min("
            f"{opts.stalled_factor} * moewatch_window_duration_seconds, {_seconds(opts.stalled_after)})",
            opts.stalled_for,
            "warning",
            "Training stalled: run {{ $labels.run }} has closed no window",
            "The moewatch exporter of run {{ $labels.run }} is up but no window has closed for "
            f"{opts.stalled_factor}x the last window's length (at least {opts.stalled_after}), for "
            + opts.stalled_for
            + " more: training is hung (a collective waiting on a dead rank, a stuck data loader) or in a "
            "long phase without optimizer steps (evaluation, checkpointing).",
        ),
        AlertSpec(
            "MoEWatchProjectedCollapse",
            "(moewatch_layer_projected_collapse_step - ignoring(layer, module) group_left moewatch_step) <= "
            f"{opts.projected_horizon_steps}",
            opts.projected_for,
            "warning",
            "MoE router heading for collapse: " + _WHERE,
            "The health metrics of "
            + _WHERE
            + " are climbing toward the collapsed thresholds on an exponential trend; at this rate the "
            "layer collapses in about {{ $value }} optimizer steps. Act now, while no expert is dead yet.",
        ),
        AlertSpec(
            "MoEWatchHookErrors",
            "moewatch_hook_errors_total > 0",
            opts.hook_errors_for,
            "warning",
            "moewatch cannot read a router of run {{ $labels.run }}",
            "{{ $value }} router hook(s) of run {{ $labels.run }} raised while reading the router's output; "
            "each such router is skipped from then on, so its layer is not being watched. The training "
            "log names the router and the error (a `RouterReadWarning`).",
        ),
        AlertSpec(
            "MoEWatchRouterNonFinite",
            "moewatch_layer_nonfinite > 0",
            opts.nonfinite_for,
            "critical",
            "Non-finite router outputs: " + _WHERE,
            "The router of " + _WHERE + " has produced NaN/inf outputs (logits or probabilities) for "
            + opts.nonfinite_for + ": {{ $value }} non-finite rows in its last window. Training is usually "
            "diverging (loss or weights NaN/inf); the layer's routing metrics cannot be trusted.",
        ),
        AlertSpec(
            "MoEWatchRouterInvalidIds",
            "moewatch_layer_invalid_ids > 0",
            opts.invalid_ids_for,
            "warning",
            "Invalid expert ids: " + _WHERE,
            "The router of " + _WHERE + " has returned expert ids outside [0, experts) for "
            + opts.invalid_ids_for + ": {{ $value }} in its last window. A broken router or adapter (a custom "
            "extractor, a padding id such as -1, global ids on an expert-parallel rank, the wrong num_experts). "
            "Those ids are not counted as loads, so the layer is not really watched; the training log names the "
            "router and on which side of the range the ids fell.",
        ),
    ]


def rules_document(opts: RuleOptions = RuleOptions()) -> dict[str, Any]:
    return {
        "groups": [
            {"name": "moewatch", "rules": [spec.rule(opts.runbook_url) for spec in alert_specs(opts)]},
        ]
    }


def _dump(doc: dict[str, Any], header: str) -> str:
    body = yaml.safe_dump(doc, sort_keys=False, width=120, allow_unicode=True)
    return header + body


_HEADER = "# Generated by `python -m moewatch.exporter.generate`; edit moewatch/exporter/rules.py instead.\n"


def rules_yaml(opts: RuleOptions = RuleOptions()) -> str:
    return _dump(rules_document(opts), _HEADER)


# --- promtool unit tests ---------------------------------------------------------------------


def _seconds(duration: str) -> int:
    m = re.fullmatch(r"(\d+)([smh])", duration)
    if m is None:
        raise ValueError(f"durations are whole seconds, minutes or hours (e.g. 10m), got {duration!r}")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def _minutes(duration: str) -> int:
    m = re.fullmatch(r"(\d+)([mh])", duration)
    if m is None:
        raise ValueError(f"promtool tests need whole minutes or hours, got {duration!r}")
    return int(m.group(1)) * (60 if m.group(2) == "h" else 1)


def _render(template: str, labels: dict[str, str], value: str) -> str:
    out = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), template)
    return out.replace("{{ $value }}", value)


def _series(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{inner}}}"


def _case(
    spec: AlertSpec, runbook_url: str, series: list[dict[str, str]], labels: dict[str, str], value: str
) -> dict[str, Any]:
    """Input series held for 2x ``for``; silent one minute before ``for`` elapses, firing right at it."""
    rule = spec.rule(runbook_url)
    minutes = _minutes(spec.for_)
    expected = {
        "exp_labels": {**labels, "severity": spec.severity},
        "exp_annotations": {k: _render(v, labels, value) for k, v in rule["annotations"].items()},
    }
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            {"eval_time": f"{minutes - 1}m", "alertname": spec.name, "exp_alerts": []},
            {"eval_time": f"{minutes}m", "alertname": spec.name, "exp_alerts": [expected]},
        ],
    }


def _silent(spec: AlertSpec, series: list[dict[str, str]]) -> dict[str, Any]:
    minutes = _minutes(spec.for_)
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [{"eval_time": f"{2 * minutes}m", "alertname": spec.name, "exp_alerts": []}],
    }


def rules_test_document(
    opts: RuleOptions = RuleOptions(), rule_file: str = "moewatch-rules.yaml"
) -> dict[str, Any]:
    specs = {s.name: s for s in alert_specs(opts)}
    target = {"job": opts.job, "instance": "trainer-0:9405"}
    layer = {"run": "r1", "layer": "3", "module": "model.layers.3.mlp.gate"}
    lab = {**layer, **target}
    per_rank = [{**layer, "rank": str(r), "job": opts.job, "instance": f"trainer-0:{9405 + r}"} for r in (0, 1)]
    stage0 = {"stage": "0", "job": opts.job, "instance": "trainer-0:9405"}
    stage1 = {"stage": "1", "job": opts.job, "instance": "trainer-1:9405"}
    hold = lambda v: f"{v}x{2 * 60}"  # noqa: E731 - a value held for two hours of 1m samples

    def state(v: int, labels: dict[str, str] = lab) -> dict[str, str]:
        return {"series": _series("moewatch_layer_state", labels), "values": hold(v)}

    def dead(v: int) -> dict[str, str]:
        return {"series": _series("moewatch_layer_dead_experts", lab), "values": hold(v)}

    def layer_gauge(metric: str, v: int) -> dict[str, str]:
        return {"series": _series(f"moewatch_layer_{metric}", lab), "values": hold(v)}

    def up(v: int) -> dict[str, str]:
        return {"series": _series("up", target), "values": hold(v)}

    rb = opts.runbook_url
    tests = [
        _case(specs["MoEWatchLayerCollapsed"], rb, [state(2)], lab, "2"),
        _silent(specs["MoEWatchLayerCollapsed"], [state(1)]),
        _case(specs["MoEWatchLayerWarning"], rb, [state(1)], lab, "1"),
        _silent(specs["MoEWatchLayerWarning"], [state(0)]),
        _case(specs["MoEWatchDeadExperts"], rb, [dead(3), state(1)], lab, "3"),
        # insufficient data never alerts, and no dead experts means no alert
        _silent(specs["MoEWatchDeadExperts"], [dead(3), state(-1)]),
        _silent(specs["MoEWatchDeadExperts"], [dead(0), state(0)]),
        _case(specs["MoEWatchExporterAbsent"], rb, [up(0)], target, "0"),
        _case(
            specs["MoEWatchExporterAbsent"],
            rb,
            [{"series": _series("up", {"job": "other", "instance": "x:1"}), "values": hold(1)}],
            {"job": opts.job},
            "1",
        ),
        _silent(specs["MoEWatchExporterAbsent"], [up(1)]),
        # prometheus.per_rank: each rank's own state; the alert names the rank (and instance) that collapsed
        _case(
            specs["MoEWatchLayerCollapsed"], rb,
            [state(2, per_rank[0]), state(0, per_rank[1])], per_rank[0], "2",
        ),  # fmt: skip
        *_stalled_cases(specs["MoEWatchTrainingStalled"], rb, opts, {"run": "r1", **target}),
        *_projected_cases(specs["MoEWatchProjectedCollapse"], rb, opts, lab, {"run": "r1", **target}),
        # pipeline stages: each stage's exporter has its own step series, matched by the stage's labels
        *_projected_cases(
            specs["MoEWatchProjectedCollapse"], rb, opts, {**layer, **stage1, "layer": "7", "module": "model.layers.7.mlp.gate"}, {"run": "r1", **stage1},
            other={"run": "r1", **stage0},
        ),
        _case(
            specs["MoEWatchHookErrors"], rb,
            [{"series": _series("moewatch_hook_errors_total", {"run": "r1", **target}), "values": hold(2)}],
            {"run": "r1", **target}, "2",
        ),  # fmt: skip
        _silent(
            specs["MoEWatchHookErrors"],
            [{"series": _series("moewatch_hook_errors_total", {"run": "r1", **target}), "values": hold(0)}],
        ),
        _case(specs["MoEWatchRouterNonFinite"], rb, [layer_gauge("nonfinite", 5), state(1)], lab, "5"),
        _silent(specs["MoEWatchRouterNonFinite"], [layer_gauge("nonfinite", 0), state(2)]),
        # every id invalid: the layer reads warning (1), never insufficient data (-1), and the rule fires
        _case(specs["MoEWatchRouterInvalidIds"], rb, [layer_gauge("invalid_ids", 1024), state(1)], lab, "1024"),
        _silent(specs["MoEWatchRouterInvalidIds"], [layer_gauge("invalid_ids", 0), state(0)]),
    ]
    return {"rule_files": [rule_file], "evaluation_interval": "1m", "tests": tests}


def _stalled_cases(
    spec: AlertSpec, runbook_url: str, opts: RuleOptions, labels: dict[str, str]
) -> list[dict[str, Any]]:
    """promtool's clock starts at 0: a window that ended at time 0 and lasted 1 minute is overdue once
    ``max(factor x 1m, stalled_after)`` has passed, and fires ``stalled_for`` after that."""
    end, length = "moewatch_window_end_timestamp_seconds", "moewatch_window_duration_seconds"
    overdue = max(opts.stalled_factor * 60, _seconds(opts.stalled_after)) // 60 + 1  # first minute past it
    fires = overdue + _minutes(spec.for_)
    rule = spec.rule(runbook_url)
    expected = {
        "exp_labels": {**labels, "severity": spec.severity},
        "exp_annotations": {k: _render(v, labels, "") for k, v in rule["annotations"].items()},
    }

    def series(end_values: str, length_s: int) -> list[dict[str, str]]:
        return [
            {"series": _series(end, labels), "values": end_values},
            {"series": _series(length, labels), "values": f"{length_s}x{3 * fires}"},
        ]

    stuck = series(f"0x{3 * fires}", 60)
    return [
        {
            "interval": "1m",
            "input_series": stuck,
            "alert_rule_test": [
                {"eval_time": f"{fires - 1}m", "alertname": spec.name, "exp_alerts": []},
                {"eval_time": f"{fires}m", "alertname": spec.name, "exp_alerts": [expected]},
            ],
        },
        # windows closing every minute: never stalled; a long last window (an hour) raises the bar
        *(
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [{"eval_time": f"{2 * fires}m", "alertname": spec.name, "exp_alerts": []}],
            }
            for inputs in (series(f"0+60x{3 * fires}", 60), series(f"0x{3 * fires}", 3600))
        ),
    ]


def _projected_cases(
    spec: AlertSpec,
    runbook_url: str,
    opts: RuleOptions,
    lab: dict[str, str],
    run: dict[str, str],
    other: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """``other``: the run-level labels of a second exporter (another pipeline stage) far from collapse."""
    hold = lambda v: f"{v}x{2 * 60}"  # noqa: E731
    h = opts.projected_horizon_steps

    def inputs(projected: int | None, step: int) -> list[dict[str, str]]:
        out = [{"series": _series("moewatch_step", run), "values": hold(step)}]
        if other is not None:
            # far behind: matched with this stage's layer by mistake, the alert would not fire
            out.append({"series": _series("moewatch_step", other), "values": hold(0)})
        if projected is not None:
            out.append({"series": _series("moewatch_layer_projected_collapse_step", lab), "values": hold(projected)})
        return out

    return [
        _case(spec, runbook_url, inputs(1000 + h, 1000), lab, str(h)),
        _silent(spec, inputs(1001 + h, 1000)),  # just past the horizon
        _silent(spec, inputs(None, 1000)),  # not heading for collapse: no series
    ]


def rules_test_yaml(opts: RuleOptions = RuleOptions()) -> str:
    return _dump(rules_test_document(opts), _HEADER)
