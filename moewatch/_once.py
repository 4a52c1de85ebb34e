""""Log it once": a thread-safe set of keys for warnings that would otherwise repeat every window."""

from __future__ import annotations

import threading
from collections.abc import Hashable

__all__ = ["Once"]


class Once:
    """``first(key)`` is True the first time ``key`` is seen (and after ``reset(key)``), False after."""

    def __init__(self) -> None:
        self._seen: set[Hashable] = set()
        self._lock = threading.Lock()

    def first(self, key: Hashable = None) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True

    def reset(self, key: Hashable = None) -> bool:
        """Forget ``key`` (the condition cleared); True if it had been seen."""
        with self._lock:
            if key in self._seen:
                self._seen.discard(key)
                return True
            return False
