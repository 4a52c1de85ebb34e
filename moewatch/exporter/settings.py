"""Config sections for the Prometheus exporter and the Pushgateway."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["PrometheusConfig", "PushgatewayConfig"]


class PrometheusConfig(BaseModel):
    """The /metrics HTTP endpoint served by the monitor (on the reporting rank only)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve /metrics while the monitor is attached.")
    host: str = Field("0.0.0.0", description="Address to bind.")
    port: int = Field(9405, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    per_expert: bool = Field(
        True,
        description="Export per-expert series (2 x layers x experts of them); turn off for very large models.",
    )
    certfile: Path | None = Field(
        None, description="PEM certificate: serve /metrics over HTTPS (needs keyfile too)."
    )
    keyfile: Path | None = Field(None, description="PEM private key for certfile.")

    @model_validator(mode="after")
    def _tls_pair(self) -> PrometheusConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError(
                "prometheus.certfile and prometheus.keyfile must be set together "
                "(MOEWATCH_PROMETHEUS__CERTFILE / MOEWATCH_PROMETHEUS__KEYFILE)"
            )
        return self


class PushgatewayConfig(BaseModel):
    """Optional push to a Prometheus Pushgateway, for short or ephemeral jobs."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        None, description="Pushgateway base URL, e.g. http://127.0.0.1:9091; unset = off."
    )
    job: str = Field("moewatch", min_length=1, description="The `job` label of pushed groups.")
    timeout_s: float = Field(
        5.0, gt=0, description="HTTP timeout of one push, in seconds (pushes run on a background thread)."
    )
