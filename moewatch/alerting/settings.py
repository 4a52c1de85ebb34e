"""Config section for alerting."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AlertsConfig"]


class AlertsConfig(BaseModel):
    """Alert rules evaluated on every window report, and where notifications go."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Evaluate alerts on every window.")
