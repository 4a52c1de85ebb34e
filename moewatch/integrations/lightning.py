"""Lightning integration (``pytorch_lightning`` or ``lightning``)::

    from moewatch.integrations.lightning import MoEWatchCallback
    trainer = pl.Trainer(accumulate_grad_batches=2, callbacks=[MoEWatchCallback(window_steps=50)])

Same behaviour as the transformers callback: attaches at fit start to the real optimizer (a window is
``window_steps`` optimizer steps whatever ``accumulate_grad_batches`` is), logs each new window with
``pl_module.log_dict`` (rank zero only), keeps the monitor state in Lightning checkpoints through the
callback's ``state_dict``/``load_state_dict``, optionally saves a rollback checkpoint when a layer first
degrades, and closes at fit end. Importing this module needs neither Lightning package.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from moewatch.attaching import attach
from moewatch.config import MoEWatchConfig
from moewatch.integrations._common import CallbackBase, log_keys
from moewatch.monitor import Monitor

try:
    from pytorch_lightning import Callback as _Base
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from lightning.pytorch import Callback as _Base
    except ImportError:
        _Base = object

__all__ = ["MoEWatchCallback"]

log = logging.getLogger(__name__)


class MoEWatchCallback(CallbackBase, _Base):  # type: ignore[misc, valid-type]
    """Router health for a Lightning ``Trainer.fit``. Arguments as :class:`CallbackBase`; with
    ``save_on_degrade`` the rollback point is ``trainer.save_checkpoint`` at the end of that window, to
    ``<dirpath>/moewatch-rollback-step=<N>.ckpt`` (``dirpath``: the ModelCheckpoint's, else
    ``trainer.default_root_dir``)."""

    def __init__(self, config: MoEWatchConfig | None = None, *, save_on_degrade: bool = False,
                 log_prefix: str = "moewatch", **overrides: Any) -> None:
        if _Base is object:
            raise ImportError("moewatch.integrations.lightning needs Lightning: pip install pytorch-lightning")
        self._init_common(config, save_on_degrade, log_prefix, overrides)
        self.watch: Monitor | None = None
        self.rollback_paths: list[str] = []
        self._pending_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "MoEWatchCallback"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.watch is not None:
            return
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        if len(optimizers) > 1:
            log.warning("moewatch: %d optimizers; counting steps of the first", len(optimizers))
        self.watch = attach(pl_module, optimizer=optimizers[0] if optimizers else None, config=self.config,
                            **self.overrides)
        self._manual = not optimizers
        if self._pending_state is not None:
            self._apply(self._pending_state)
            self._pending_state = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        watch = self.watch
        if watch is None:
            return
        if self._manual and trainer.global_step > watch.step_count:
            watch.step()
        report = watch.latest
        if report is None or report is self._seen:
            return
        self._seen = report
        pl_module.log_dict(log_keys(report, self.log_prefix), on_step=True, on_epoch=False, rank_zero_only=True)
        if self.trigger.update(report) and self.save_on_degrade:
            ckpt_cb = getattr(trainer, "checkpoint_callback", None)
            dirpath = getattr(ckpt_cb, "dirpath", None) or trainer.default_root_dir
            path = os.path.join(dirpath, f"moewatch-rollback-step={trainer.global_step}.ckpt")
            log.warning("moewatch: window %d degraded a layer; saving a rollback checkpoint %s", report.window, path)
            trainer.save_checkpoint(path)
            self.rollback_paths.append(path)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.watch is not None:
            self.watch.close()

    def state_dict(self) -> dict[str, Any]:
        if self.watch is None:
            return {}
        return {"monitor": self.watch.state_dict(), "trigger": self.trigger.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start: keep the state until the monitor exists.
        if not state_dict:
            return
        if self.watch is None:
            self._pending_state = state_dict
        else:
            self._apply(state_dict)

    def _apply(self, state: dict[str, Any]) -> None:
        assert self.watch is not None
        self.watch.load_state_dict(state["monitor"])
        self.trigger.load_state_dict(state.get("trigger", {}))
