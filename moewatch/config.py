"""Configuration: one pydantic-settings model, from code, environment or a TOML/YAML file.

Precedence, highest first: keyword overrides to :func:`moewatch.attach`, fields given to
``MoEWatchConfig(...)``, environment variables (``MOEWATCH_WINDOW_STEPS=10``,
``MOEWATCH_THRESHOLDS__LOAD_COV_COLLAPSED=1.2``), then defaults. ``MoEWatchConfig.from_file`` reads
a TOML or YAML file whose keys are the field names below (sections for nested models).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from moewatch.alerting.settings import AlertsConfig
from moewatch.confighints import closest_field, unknown_env_vars
from moewatch.errors import ConfigError
from moewatch.exporter.settings import PrometheusConfig, PushgatewayConfig
from moewatch.trend_settings import EarlyWarningConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "ConsoleConfig",
    "JsonlConfig",
    "MoEWatchConfig",
    "Thresholds",
    "format_validation_error",
]


class Thresholds(BaseModel):
    """Health thresholds (README, "Metrics and health"). A metric is compared against its warning and collapsed bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    load_cov_warning: float = Field(0.35, ge=0, description="load_cov at or above this is a warning.")
    load_cov_collapsed: float = Field(1.0, ge=0, description="load_cov above this is collapsed.")
    dead_ratio_warning: float = Field(0.0, ge=0, le=1, description="dead_ratio above this is a warning.")
    dead_ratio_collapsed: float = Field(0.10, ge=0, le=1, description="dead_ratio above this is collapsed.")
    top2_excess_warning: float = Field(0.03, ge=0, le=1, description="top-2 excess above this is a warning.")
    top2_excess_collapsed: float = Field(0.38, ge=0, le=1, description="top-2 excess above this is collapsed.")
    entropy_warning: float = Field(0.85, ge=0, le=1, description="norm_entropy at or below this is a warning.")
    entropy_collapsed: float = Field(0.50, ge=0, le=1, description="norm_entropy below this is collapsed.")

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        pairs = [
            ("load_cov_warning", "load_cov_collapsed"),
            ("dead_ratio_warning", "dead_ratio_collapsed"),
            ("top2_excess_warning", "top2_excess_collapsed"),
        ]
        for lo, hi in pairs:
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"thresholds.{lo} must not exceed thresholds.{hi}")
        if self.entropy_collapsed > self.entropy_warning:
            raise ValueError("thresholds.entropy_collapsed must not exceed thresholds.entropy_warning")
        return self


class JsonlConfig(BaseModel):
    """The local JSONL log: one line per window, the report as JSON."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Write the JSONL log.")
    path: Path | None = Field(
        None, description="File to append to; default ./moewatch-runs/<run_name>/windows.jsonl."
    )


class ConsoleConfig(BaseModel):
    """The human view: a rich table per window (or a live-updating one)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Print the per-layer table at every window end.")
    live: bool = Field(False, description="Redraw one live table in place instead of printing one per window.")
    max_layers: int = Field(64, ge=1, description="Rows shown; the worst layers first when there are more.")


def _default_run_name() -> str:
    # Unique per process (four jobs started in one second must not share a run label or a JSONL file);
    # the ranks of one torchrun job share TORCHELASTIC_RUN_ID.
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    suffix = job if job and job != "none" else os.urandom(3).hex()
    return "run-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + suffix


class MoEWatchConfig(BaseSettings):
    """Everything moewatch can be told. Every field can be set from the environment with the prefix
    ``MOEWATCH_`` and ``__`` between nested names."""

    model_config = SettingsConfigDict(
        env_prefix="MOEWATCH_",
        env_nested_delimiter="__",
        extra="forbid",
        hide_input_in_errors=True,  # a misspelled or mistyped secret field must not be echoed
        validate_default=True,
        arbitrary_types_allowed=True,
    )

    run_name: str = Field(default_factory=_default_run_name, min_length=1, description="Label for this run.")
    window_steps: int = Field(100, ge=1, description="Optimizer steps per metrics window.")
    min_fair_share: float = Field(
        0.0,
        ge=0,
        description="Deprecated: noise-aware health (false_alarm_rate) replaces this blanket guard. When set, "
        "windows with fewer assignments per expert are still insufficient_data (no alerts).",
    )
    false_alarm_rate: float = Field(
        1e-4,
        gt=0,
        lt=1,
        description="Judge a metric against a threshold only where a balanced router would cross it by sampling "
        "noise alone in at most this share of layer-windows; elsewhere the metric reads insufficient_data.",
    )
    noise_aware: bool = Field(
        True,
        description="False: judge every threshold whatever the window's sampling noise (noise floors are still "
        "reported); for tests and for thresholds set on purpose below the noise.",
    )
    early_warning: EarlyWarningConfig = Field(
        default_factory=EarlyWarningConfig, description="Trend fit and projected_collapse warning."
    )
    dead_fraction: float = Field(
        0.01, ge=0, le=1, description="An expert is dead when its load is below this fraction of the fair share."
    )
    thresholds: Thresholds = Field(default_factory=Thresholds, description="Health thresholds per metric.")
    jsonl: JsonlConfig = Field(default_factory=JsonlConfig, description="The local JSONL log.")
    console: ConsoleConfig = Field(default_factory=ConsoleConfig, description="The console table.")
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig, description="The /metrics endpoint.")
    pushgateway: PushgatewayConfig = Field(
        default_factory=PushgatewayConfig, description="Optional push to a Prometheus Pushgateway."
    )
    alerts: AlertsConfig = Field(default_factory=AlertsConfig, description="Alert rules and notifiers.")

    routers: list[str] | None = Field(
        None,
        description="Only these modules are routers: glob patterns on dotted names. Default: auto-detect. "
        "A predicate (name, module) -> bool and a custom extractor are attach() arguments, not settings: "
        "the settings stay plain data that can be dumped and reloaded.",
    )
    top_k: int | None = Field(None, ge=1, description="k for plain nn.Linear gates that do not expose it.")
    num_experts: int | None = Field(None, ge=1, description="E for custom extractors that do not expose it.")
    capacity_factor: float | None = Field(
        None, gt=0, description="Estimate dropped tokens as if each expert held capacity_factor * fair share."
    )
    expert_parallel_size: int | None = Field(
        None, ge=1, description="Report load per expert-parallel rank (experts placed contiguously)."
    )
    expert_rank_map: list[int] | None = Field(
        None,
        description="Expert-parallel rank of each expert, when experts are not placed contiguously "
        "(length = experts per router); overrides expert_parallel_size.",
    )
    probs_every: int = Field(
        32,
        ge=1,
        description="Read the router probabilities (entropy's mean probability vector, z-loss, non-finite rows) "
        "on the first call of each router in every window and on every Nth call after it; expert counts stay "
        "exact on every call. A sampled call costs 11 device ops more than counting's 2 (9 on the CPU with fewer "
        "than 16 experts); at 32 (4 of the 100 "
        "calls of a default window) the hot path stays within 1.25x of a bare exact counter. The entropy's noise "
        "floor accounts for the sampled tokens. 1 = every call (exact entropy and z-loss, non-finite rows seen "
        "on every call; about 4x the hot-path cost of counting alone).",
    )
    recompute_logits: bool = Field(
        True,
        description="Megatron-Core and DeepSpeed routers return no probability vector: recompute their logits "
        "(one extra [tokens, hidden] x [hidden, experts] product, the gate's own size, on each call that samples "
        "the probabilities: see probs_every) for entropy and z-loss. Off: entropy falls back to the loads.",
    )
    layer_offset: int = Field(
        0,
        ge=0,
        description="Pipeline parallelism: added to every router's position, so a stage reports its layers under "
        "their global numbers (the routers held by earlier stages; e.g. stage s of S equal stages of a model with "
        "R routers: s * R // S). The `layer` label, LayerReport.index and the JSONL log all use it.",
    )
    pipeline_stage: int | None = Field(
        None,
        ge=0,
        description="Pipeline parallelism: this process's stage, exported as a `stage` label on every series and "
        "as `stage` in each report. Needs process_group= the stage's data-parallel group (or False): the world "
        "group would sum other stages' layers into this one's. Each stage's first rank then reports, on "
        "prometheus.port + LOCAL_RANK.",
    )
    count_eval: bool = Field(False, description="Also count forwards in eval mode.")
    async_flush: bool = Field(
        True, description="On CUDA, copy window counts non-blocking and build the report one step later."
    )
    strict: bool = Field(False, description="Re-raise exceptions from router hooks (for tests).")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> MoEWatchConfig:
        """Load a ``.toml``, ``.yaml`` or ``.yml`` file. Environment variables still apply beneath it."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        text = p.read_text()
        try:
            if p.suffix == ".toml":
                data = tomllib.loads(text)
            elif p.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text) or {}
            else:
                raise ConfigError(f"config file {p}: use a .toml, .yaml or .yml file")
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {p} is not valid {p.suffix[1:].upper()}: {exc}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {p} must hold a table/mapping of fields at the top level")
        return build_config(None, {**data, **overrides}, source=str(p))

    @property
    def jsonl_path(self) -> Path:
        return self.jsonl.path or Path("moewatch-runs") / self.run_name / "windows.jsonl"


_SECRET_FIELDS = frozenset(
    {"slack_webhook_url", "pagerduty_routing_key", "webhook_url", "webhook_bearer_token", "url", "password"}
)


def format_validation_error(exc: ValidationError, source: str = "MoEWatchConfig") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        env = "MOEWATCH_" + "__".join(str(x) for x in err["loc"]).upper()
        got = err.get("input")
        # Never echo a value that may be a secret: unknown keys (a misspelled secret field), secret fields.
        hidden = err["type"] == "extra_forbidden" or any(str(x) in _SECRET_FIELDS for x in err["loc"])
        got_s = " (value hidden)" if hidden else "" if isinstance(got, Mapping) else f" (got {got!r})"
        hint = closest_field(MoEWatchConfig, err["loc"]) if err["type"] == "extra_forbidden" else None
        if err["type"] == "extra_forbidden":  # an unknown key has no environment variable: name a real one
            lines.append(f"  {loc}: {err['msg']}{got_s}; " + (hint or "remove it (see the README's Configuration)"))
            continue
        lines.append(f"  {loc}: {err['msg']}{got_s}; set it in code, the config file or ${env}")
    return f"invalid moewatch configuration from {source}:\n" + "\n".join(lines)


def build_config(
    config: MoEWatchConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any], source: str = "attach()"
) -> MoEWatchConfig:
    """Merge keyword overrides into ``config`` (or a fresh one read from the environment). ``config`` may
    also be a mapping of the same fields (a parsed YAML or JSON file), validated like the model."""
    try:
        if isinstance(config, Mapping):
            config = MoEWatchConfig.model_validate(dict(config))
        elif config is not None and not isinstance(config, MoEWatchConfig):
            raise ConfigError(
                f"{source}: config= takes a moewatch.MoEWatchConfig or a dict of its fields, not "
                f"{type(config).__name__}"
            )
        if config is None:
            unknown = unknown_env_vars(MoEWatchConfig, os.environ)
            if unknown:
                raise ConfigError("unknown MOEWATCH_* environment variable(s):\n" + "\n".join(unknown))
            return MoEWatchConfig(**overrides)
        if not overrides:
            return config
        unknown = set(overrides) - set(MoEWatchConfig.model_fields)
        if unknown:
            raise ConfigError(
                f"unknown moewatch config field(s) {sorted(unknown)}; valid fields: {sorted(MoEWatchConfig.model_fields)}"
            )
        merged = {name: getattr(config, name) for name in MoEWatchConfig.model_fields} | dict(overrides)
        return MoEWatchConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
