"""Config sections for the Prometheus exporter and the Pushgateway."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PrometheusConfig", "PushgatewayConfig"]


class PrometheusConfig(BaseModel):
    """The /metrics HTTP endpoint served by the monitor."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve /metrics while the monitor is attached.")
    host: str = Field("0.0.0.0", description="Address to bind.")
    port: int = Field(9405, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    per_expert: bool = Field(True, description="Export per-expert series (layers x experts of them).")


class PushgatewayConfig(BaseModel):
    """Optional push to a Prometheus Pushgateway, for short or ephemeral jobs."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="Pushgateway base URL, e.g. http://127.0.0.1:9091; unset = off.")
