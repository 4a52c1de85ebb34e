"""Immutable window reports: what every sink receives.

A :class:`WindowReport` is built on the CPU from one host copy of the device buffers and is never
mutated afterwards, so sinks (JSONL, console, Prometheus scrapes, alerting) can read it from any
thread. Metrics that are undefined for a window (no assignments, ``E <= 2`` for the top-2 excess,
``E == 1`` for entropy) are ``None``.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from moewatch._version import __version__

__all__ = ["HealthState", "LayerReport", "SCHEMA_VERSION", "WindowReport", "STATE_VALUES"]

#: Version of the report (and JSONL line) schema; bumped when fields change meaning or go away.
SCHEMA_VERSION = 2


class HealthState(str, Enum):
    HEALTHY = "healthy"
    WARNING = "warning"
    COLLAPSED = "collapsed"
    INSUFFICIENT_DATA = "insufficient_data"

    @property
    def severity(self) -> int:
        """Order used for "worst of": insufficient data ranks below healthy."""
        return _SEVERITY[self]


_SEVERITY = {
    HealthState.INSUFFICIENT_DATA: -1,
    HealthState.HEALTHY: 0,
    HealthState.WARNING: 1,
    HealthState.COLLAPSED: 2,
}

#: Numeric encoding exported as the Prometheus state gauge (-1 for insufficient data).
STATE_VALUES: dict[HealthState, int] = dict(_SEVERITY)


class LayerReport(BaseModel):
    """Router health of one MoE layer over one window."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="Router position in discovery order, 0-based.")
    module: str = Field(description="Dotted module name of the router.")
    family: str = Field(description="Adapter family that read this router.")
    num_experts: int
    top_k: int
    tokens: int = Field(description="Tokens seen in counted (training-mode, non-recompute) forwards.")
    assignments: int = Field(description="Valid expert assignments (sum of loads).")
    loads: list[int] = Field(description="Assignments per expert.")
    fair_share: float = Field(description="assignments / num_experts.")
    load_cov: float | None = None
    dead_experts: int = 0
    dead_expert_ids: list[int] = Field(default_factory=list)
    dead_ratio: float = 0.0
    top2_share: float | None = None
    top2_excess: float | None = Field(default=None, description="top2_share on the fair..max scale.")
    norm_entropy: float | None = None
    entropy_source: str = Field(default="probs", description="'probs' or 'loads' (fallback).")
    max_violation: float | None = None
    effective_experts: float | None = None
    z_loss: float | None = Field(default=None, description="mean_t logsumexp(logits_t)^2, when logits are seen.")
    nonfinite: int = Field(
        default=0,
        description="Non-finite router logits/probabilities seen (sampled rows); the layer is then at least "
        "'warning' and the nonfinite alert fires.",
    )
    invalid_ids: int = Field(
        default=0,
        description="Expert ids outside [0, num_experts): a broken router or adapter; the layer is then at "
        "least 'warning' and the invalid_ids alert fires.",
    )
    invalid_ids_below: int = Field(default=0, description="Of invalid_ids, those below 0 (the rest are >= num_experts).")
    dropped_ratio: float | None = Field(
        default=None, description="Estimated share of assignments over expert capacity (capacity_factor)."
    )
    ep_loads: list[int] | None = Field(default=None, description="Assignments per expert-parallel rank.")
    ep_load_cov: float | None = None
    state: HealthState
    reasons: list[str] = Field(default_factory=list)
    noise_floor: dict[str, float | None] = Field(
        default_factory=dict,
        description="Per metric, what a perfectly balanced router reaches by sampling noise alone at "
        "false_alarm_rate (upper floor for load_cov, top2_excess, dead_ratio; lower floor for norm_entropy).",
    )
    metric_states: dict[str, HealthState] = Field(
        default_factory=dict, description="State of each judged metric (insufficient_data: inside the noise)."
    )
    not_enough_data: dict[str, str] = Field(
        default_factory=dict, description="Metrics that read insufficient_data this window, with the reason."
    )
    projected_collapse_step: int | None = Field(
        default=None, description="Step at which the trend fit crosses a collapsed threshold; None: not heading there."
    )
    projected_collapse_metric: str | None = Field(default=None, description="The metric projected to cross first.")
    idle_windows: list[int] = Field(
        default_factory=list, description="Per expert, windows since it last received a token (0: this window)."
    )


class WindowReport(BaseModel):
    """All layers over one window of optimizer steps ``[step_start, step_end)``."""

    model_config = ConfigDict(frozen=True)

    run: str
    window: int = Field(description="Window sequence number, 0-based.")
    step_start: int
    step_end: int
    time_start: float = Field(description="Unix time the window opened.")
    time_end: float = Field(description="Unix time the window closed.")
    tokens: int = Field(description="Tokens seen by the first router over the window.")
    hook_errors: int = Field(default=0, description="Router hook exceptions swallowed so far.")
    layers: list[LayerReport]
    state: HealthState
    stage: int | None = Field(
        default=None, description="Pipeline stage that reported these layers (config pipeline_stage); None: no pipeline."
    )
    schema_version: int = Field(default=SCHEMA_VERSION, description="Report schema version.")
    moewatch_version: str = Field(default=__version__, description="moewatch version that wrote the report.")
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="Health thresholds and false_alarm_rate in force for this window."
    )

    @property
    def steps(self) -> int:
        return self.step_end - self.step_start

    def layer(self, index: int) -> LayerReport:
        """The layer whose ``index`` (global layer number, ``layer_offset`` included) is ``index``."""
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise IndexError(f"no layer {index} in this report (layers {[la.index for la in self.layers]})")
