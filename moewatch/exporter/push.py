"""Pushgateway: push the run's metrics after every window and at close, off the training thread."""

from __future__ import annotations

import logging
import os
import threading

from prometheus_client import push_to_gateway
from prometheus_client.registry import CollectorRegistry

from moewatch._once import Once
from moewatch.exporter.settings import PushgatewayConfig, mask_password

__all__ = ["Pusher", "default_rank", "local_rank"]

log = logging.getLogger(__name__)


def default_rank() -> int:
    """This process's rank: torch.distributed when initialised, else ``$RANK``, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # noqa: BLE001 - rank is only a label
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def local_rank() -> int:
    """This process's rank within its node: ``$LOCAL_RANK`` (torchrun), else ``$SLURM_LOCALID`` or
    ``$OMPI_COMM_WORLD_LOCAL_RANK``, else the global rank (right when every rank runs on one node)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                continue
    return default_rank()


class Pusher:
    """A daemon thread that PUTs ``registry`` to the group ``{job, run, rank}``.

    ``request()`` only sets a flag (never blocks); the thread pushes whatever is current when it wakes,
    so a slow gateway coalesces windows instead of queueing them. Failures are logged (once until the
    next success) and counted, never raised.
    """

    def __init__(self, config: PushgatewayConfig, registry: CollectorRegistry, run: str, rank: int) -> None:
        assert config.url is not None
        self.config = config
        self.url = config.url  # may hold a password: log display_url
        self.display_url = mask_password(config.url) or ""
        self.grouping_key = {"run": run, "rank": str(rank)}
        self._registry = registry
        self._wake = threading.Condition()
        self._wanted = False
        self._stopping = False
        self._failing = Once()  # logged once per outage
        self.stats = {"success": 0, "failure": 0}
        self._thread = threading.Thread(target=self._loop, name="moewatch-pushgateway", daemon=True)
        self._thread.start()

    def request(self) -> None:
        with self._wake:
            self._wanted = True
            self._wake.notify()

    def close(self) -> None:
        """One last push of the final state, bounded by about ``timeout_s``."""
        with self._wake:
            self._wanted = True
            self._stopping = True
            self._wake.notify()
        self._thread.join(self.config.timeout_s + 1.0)
        if self._thread.is_alive():
            log.warning("moewatch: final push to %s did not finish in %.1fs", self.display_url, self.config.timeout_s)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._wanted and not self._stopping:
                    self._wake.wait()
                wanted, stopping = self._wanted, self._stopping
                self._wanted = False
            if wanted:
                self._push_once()
            if stopping:
                return

    def _push_once(self) -> None:
        try:
            push_to_gateway(
                self.url,
                job=self.config.job,
                registry=self._registry,
                grouping_key=self.grouping_key,
                timeout=self.config.timeout_s,
            )
        except Exception as exc:  # noqa: BLE001 - the network must never reach training
            self.stats["failure"] += 1
            if self._failing.first():
                log.warning(
                    "moewatch: push to Pushgateway %s failed (%s: %s); retrying at the next window. "
                    "Check pushgateway.url (MOEWATCH_PUSHGATEWAY__URL)",
                    self.display_url,
                    type(exc).__name__,
                    _redact_url(str(exc), self.url, self.display_url),
                )
            return
        self.stats["success"] += 1
        if self._failing.reset():
            log.info("moewatch: pushes to %s succeed again", self.display_url)


def _redact_url(text: str, url: str, shown: str) -> str:
    """``text`` (an exception's message) without the URL's password."""
    from urllib.parse import quote, urlsplit

    text = text.replace(url, shown)
    password = urlsplit(url).password
    if password:
        for form in {password, quote(password, safe="")}:
            text = text.replace(form, "<redacted>")
    return text
