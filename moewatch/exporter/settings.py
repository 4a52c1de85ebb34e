"""Config sections for the Prometheus exporter and the Pushgateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

__all__ = ["PrometheusConfig", "PushgatewayConfig", "mask_password"]


def mask_password(url: str | None) -> str | None:
    """``url`` with the password of its userinfo (``http://user:pw@host``) replaced by ``<redacted>``."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:<redacted>@{netloc[2]}"))
    except ValueError:
        return "<unparsable URL, hidden>"


class PrometheusConfig(BaseModel):
    """The /metrics HTTP endpoint served by the monitor: on the reporting rank only (rank 0 of the monitor's
    process group, serving the all-reduced window), or on every rank with ``per_rank`` (each rank's own
    counts, with a ``rank`` label)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve /metrics while the monitor is attached.")
    host: str = Field(
        "0.0.0.0",
        description="Address to bind. The default listens on all interfaces (the exporter convention, so a "
        "Prometheus on another host can scrape); use 127.0.0.1 to keep it local, and web_config_file for TLS "
        "and basic auth.",
    )
    web_config_file: Path | None = Field(
        None,
        description="Prometheus exporter-toolkit style web config (YAML): tls_server_config.cert_file/key_file "
        "and basic_auth_users {user: bcrypt hash}.",
    )
    port: int = Field(9405, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    per_expert: bool = Field(
        True,
        description="Export per-expert series (2 x layers x experts of them); turn off for very large models.",
    )
    per_rank: bool = Field(
        False,
        description="Every rank serves its own /metrics on port + LOCAL_RANK (LOCAL_RANK, else SLURM_LOCALID or "
        "OMPI_COMM_WORLD_LOCAL_RANK, else the global rank), each series with a `rank` label (the global rank), "
        "for aggregating in PromQL. Each rank exports its own local counts of the window (what its routers saw "
        "before the all-reduce), so sum without(rank, instance) of the counters is the job's total; health gauges and "
        "states are those of the rank's own counts. Off (default): the reporting rank alone serves the "
        "all-reduced window. JSONL, console and notifications stay on the reporting rank, all-reduced, "
        "either way.",
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

    @field_serializer("url")
    def _dump_url(self, url: str | None) -> str | None:
        return mask_password(url)  # dumps and reprs never show a password in the URL

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for key, value in super().__repr_args__():
            yield key, mask_password(value) if key == "url" else value
    timeout_s: float = Field(
        5.0, gt=0, description="HTTP timeout of one push, in seconds (pushes run on a background thread)."
    )
