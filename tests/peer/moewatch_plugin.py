"""pytest plugin of the inner runs: with ``PEER_MOEWATCH_ATTACH=1``, moewatch watches every model built.

It wraps ``transformers.PreTrainedModel.post_init`` (the last line of every model's ``__init__``, also the
ones ``from_pretrained`` builds) and calls ``moewatch.attach`` on the *top-level* model only: a model built
inside another model's ``__init__`` (``MixtralForCausalLM.model``) is skipped, its routers are the outer
model's; so is a second ``post_init()`` of a model already watched (a test calls it by hand, and
attach() rightly refuses a second monitor on one model). An attach error propagates (the test fails) and is also recorded in the summary, in case a test
expected some other error from the constructor. At each test's teardown the test's monitors are closed
(a close error is a test error). At session end, with ``PEER_MOEWATCH_SUMMARY=<path>``, a JSON summary is
written: models attached, tokens counted (sum of every window report's ``tokens``), hook errors.

The variables are not named ``MOEWATCH_*``: attach() refuses unknown ``MOEWATCH_*`` environment variables.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import weakref
from pathlib import Path
from typing import Any

import pytest

ENV_ATTACH = "PEER_MOEWATCH_ATTACH"
ENV_SUMMARY = "PEER_MOEWATCH_SUMMARY"
OVERRIDES: dict[str, Any] = {
    "console": {"enabled": False},
    "jsonl": {"enabled": False},
    "prometheus": {"enabled": False},
    "alerts": {"enabled": False},
    # Most of the mixin's tests run eval-mode forwards, which moewatch skips by default: counting them too
    # puts moewatch's hooks in every forward the suite makes, not only the training ones.
    "count_eval": True,
}


class _Tally:
    """A moewatch sink: adds up the window reports of every monitor."""

    name = "peer-tally"

    def __init__(self, stats: dict[str, Any]) -> None:
        self.stats = stats

    def emit(self, report: Any) -> None:
        self.stats["windows"] += 1
        self.stats["tokens"] += int(report.tokens)
        self.stats["max_hook_errors_in_a_report"] = max(
            self.stats["max_hook_errors_in_a_report"], report.hook_errors
        )

    def close(self) -> None:
        pass


class _Attacher:
    def __init__(self) -> None:
        self.stats: dict[str, Any] = {
            "models_attached": 0,
            "nested_post_init_skipped": 0,
            "repeat_post_init_skipped": 0,
            "attached_by_class": {},
            "windows": 0,
            "tokens": 0,
            "hook_errors": 0,
            "max_hook_errors_in_a_report": 0,
            "attach_errors": [],
            "close_errors": [],
        }
        self.open: list[tuple[str, Any]] = []  # (nodeid, monitor) of the running test
        self.nodeid = "<collection>"
        self.watched: weakref.WeakSet[Any] = weakref.WeakSet()

    def install(self) -> None:
        from transformers import PreTrainedModel

        import moewatch

        original = PreTrainedModel.post_init
        attacher = self

        def post_init(model: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(model, *args, **kwargs)
            if model in attacher.watched:
                attacher.stats["repeat_post_init_skipped"] += 1
            elif _built_inside_another_model(model):
                attacher.stats["nested_post_init_skipped"] += 1
            else:
                try:
                    monitor = moewatch.attach(model, sinks=[_Tally(attacher.stats)], **OVERRIDES)
                except Exception as exc:
                    attacher.stats["attach_errors"].append(
                        {"test": attacher.nodeid, "model": type(model).__name__, "error": _short(exc)}
                    )
                    raise
                attacher.watched.add(model)
                attacher.stats["models_attached"] += 1
                by_class = attacher.stats["attached_by_class"]
                by_class[type(model).__name__] = by_class.get(type(model).__name__, 0) + 1
                attacher.open.append((attacher.nodeid, monitor))
            return result

        post_init.__wrapped__ = original  # type: ignore[attr-defined]
        PreTrainedModel.post_init = post_init

    def close_open(self) -> None:
        errors = []
        while self.open:
            nodeid, monitor = self.open.pop()
            self.stats["hook_errors"] += monitor.hook_errors
            try:
                monitor.close()
            except Exception as exc:
                self.stats["close_errors"].append({"test": nodeid, "error": _short(exc)})
                errors.append(exc)
        if errors:
            raise errors[0]


def _built_inside_another_model(model: Any) -> bool:
    """True when some caller up the stack is the ``__init__`` of another PreTrainedModel."""
    from transformers import PreTrainedModel

    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            owner = frame.f_locals.get("self")
            if owner is not model and isinstance(owner, PreTrainedModel):
                return True
        frame = frame.f_back
    return False


def _short(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]


_ATTACHER: _Attacher | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _ATTACHER
    import torch

    torch.set_num_threads(1)  # tiny models: intra-op threads only slow them down (as tests/conftest.py)
    if os.environ.get(ENV_ATTACH) == "1":
        _ATTACHER = _Attacher()
        _ATTACHER.install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Any:
    if _ATTACHER is not None:
        _ATTACHER.nodeid = item.nodeid
    yield


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: Any) -> None:
    if _ATTACHER is not None:
        _ATTACHER.close_open()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get(ENV_SUMMARY)
    if not path:
        return
    summary: dict[str, Any] = {"attach": _ATTACHER is not None}
    if _ATTACHER is not None:
        try:
            _ATTACHER.close_open()
        except Exception:  # noqa: BLE001 - already recorded in close_errors
            pass
        summary.update(_ATTACHER.stats)
    Path(path).write_text(json.dumps(summary, indent=2))
