"""Settings of the early warning (:mod:`moewatch.trend`), kept apart so the config imports nothing heavy."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EarlyWarningConfig"]


class EarlyWarningConfig(BaseModel):
    """Per layer, a robust fit of how fast the health metrics approach their collapsed thresholds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Fit trends and report projected_collapse_step.")
    windows: int = Field(8, ge=3, description="Fit over the last this many windows (M).")
    min_windows: int = Field(
        2,
        ge=2,
        description="Windows needed before projecting (a fast collapse can take only a few windows; the "
        "noise-floor guard keeps short fits from raising false alarms).",
    )
    min_rate: float = Field(
        0.02,
        ge=0,
        description="Ignore trends whose log-distance to the threshold shrinks by less than this per window "
        "(noise, not a collapse).",
    )
