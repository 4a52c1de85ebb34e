"""Hugging Face ``Trainer`` integration::

    from moewatch.integrations.transformers import MoEWatchCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[MoEWatchCallback(window_steps=50)])

The callback attaches at train begin (to the real torch optimizer behind accelerate's wrapper, so a window
is ``window_steps`` optimizer steps whatever ``gradient_accumulation_steps`` is), puts each window's
summary into the trainer's logs (``moewatch/layer_03/load_cov``...), saves the monitor state into every
checkpoint directory and restores it when the trainer resumes from one, and closes at train end.

Importing this module does not need transformers; constructing the callback does.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from moewatch.attaching import attach
from moewatch.config import MoEWatchConfig
from moewatch.integrations._common import STATE_FILE, CallbackBase, log_keys
from moewatch.monitor import Monitor
from moewatch.report import WindowReport

try:
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - exercised in an environment without transformers
    _Base = object

__all__ = ["MoEWatchCallback"]

log = logging.getLogger(__name__)


class MoEWatchCallback(CallbackBase, _Base):  # type: ignore[misc, valid-type]
    """Router health for a ``transformers.Trainer`` run. Arguments as :class:`CallbackBase`; with
    ``save_on_degrade`` the rollback point is requested with ``control.should_save = True`` (once per run,
    resumes included)."""

    def __init__(
        self,
        config: MoEWatchConfig | None = None,
        *,
        save_on_degrade: bool = False,
        log_prefix: str = "moewatch",
        **overrides: Any,
    ) -> None:
        if _Base is object:
            raise ImportError("moewatch.integrations.transformers needs transformers: pip install transformers")
        self._init_common(config, save_on_degrade, log_prefix, overrides)
        self.watch: Monitor | None = None
        self.rollback_steps: list[int] = []  # global steps at which a rollback checkpoint was requested
        self._logged: WindowReport | None = None  # last report put into the logs
        self._manual = False

    # --- Trainer events -----------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kw: Any) -> None:
        if self.watch is not None:
            return
        if model is None:
            raise ValueError("moewatch: the Trainer passed no model to on_train_begin")
        opt = optimizer
        self._manual = opt is None
        self.watch = attach(model, optimizer=opt, config=self.config, **self.overrides)
        if state.global_step > 0:  # the Trainer has already loaded the checkpoint's TrainerState
            self._restore(args, state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        watch = self.watch
        if watch is None:
            return
        if self._manual:
            watch.step()
        report = watch.latest
        if report is None or report is self._seen:
            return
        self._seen = report
        if self.save_on_degrade and self.trigger.update(report):
            control.should_save = True
            self.rollback_steps.append(state.global_step)
            log.warning("moewatch: window %d degraded a healthy layer; requesting a checkpoint at step %d",
                        report.window, state.global_step)
        elif not self.save_on_degrade:
            self.trigger.update(report)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kw: Any) -> None:
        watch = self.watch
        if watch is None or logs is None or watch.latest is None or watch.latest is self._logged:
            return
        self._logged = watch.latest
        keys = log_keys(watch.latest, self.log_prefix)
        logs.update(keys)  # seen by the report_to callbacks that run after this one
        # The Trainer appended a copy of ``logs`` to log_history before calling on_log: complete that entry.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(keys)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.watch is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            log.warning("moewatch: checkpoint folder %s not found; monitor state not saved", folder)
            return
        torch.save(self.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.watch is not None:
            self.watch.close()

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        assert self.watch is not None
        return {"monitor": self.watch.state_dict(), "trigger": self.trigger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.watch is not None
        self.watch.load_state_dict(state["monitor"])
        self.trigger.load_state_dict(state.get("trigger", {}))

    def _restore(self, args: Any, state: Any) -> None:
        candidates = [getattr(args, "resume_from_checkpoint", None),
                      os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        for folder in candidates:
            path = os.path.join(folder, STATE_FILE) if isinstance(folder, str) else None
            if path and os.path.isfile(path):
                self.load_state_dict(torch.load(path, weights_only=True))
                log.info("moewatch: resumed from %s (step %d)", path, state.global_step)
                return
        log.warning(
            "moewatch: resuming at step %d but no %s in %s; window numbers and history restart",
            state.global_step, STATE_FILE, [c for c in candidates if c],
        )
