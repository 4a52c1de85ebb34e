"""The local JSONL log: one line per window, the report as JSON."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO

from moewatch._once import Once
from moewatch.errors import ConfigError
from moewatch.report import WindowReport

__all__ = ["JsonlSink"]

log = logging.getLogger(__name__)


def _lock(fh: IO[str]) -> bool:
    """An exclusive advisory lock on ``fh`` for as long as it is open (False: another holder has it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no check
        return True
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks: no check
        return True
    return True


class JsonlSink:
    """Appends ``report.model_dump_json()`` lines to ``path`` (parents created), flushed per window."""

    name = "jsonl"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh: IO[str] | None = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"moewatch cannot write the JSONL log at {self.path}: {exc.strerror}; set jsonl.path "
                "(MOEWATCH_JSONL__PATH) to a writable file or jsonl.enabled=false"
            ) from None
        if not _lock(self._fh):
            self._fh.close()
            self._fh = None
            raise ConfigError(
                f"moewatch: the JSONL log {self.path} is being written by another live moewatch monitor; two runs "
                "would interleave their windows. Give this run its own run_name (MOEWATCH_RUN_NAME) or jsonl.path "
                "(MOEWATCH_JSONL__PATH), or close the other monitor"
            )
        self._failed = Once()

    def emit(self, report: WindowReport) -> None:
        if self._fh is None:
            return
        try:
            self._fh.write(report.model_dump_json() + "\n")
            self._fh.flush()
        except OSError as exc:  # a full disk must not stop training
            if self._failed.first():
                log.warning("moewatch: writing %s failed (%s); further JSONL lines may be lost", self.path, exc)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    @staticmethod
    def read(path: str | Path) -> list[WindowReport]:
        """Load every report of a JSONL log (for analysis and tests)."""
        with Path(path).open(encoding="utf-8") as fh:
            return [WindowReport.model_validate_json(line) for line in fh if line.strip()]
