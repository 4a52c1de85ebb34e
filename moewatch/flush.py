"""Window ends on the device side: take the counts off the device with one all_reduce and one
device-to-host copy, non-blocking on CUDA (the report is then built at a later step, once the copy has
landed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moewatch.accumulator import Accumulator, WindowCounts
from moewatch.errors import MoEWatchError
from moewatch.window import WindowMeta

__all__ = ["StepMismatchError", "WindowFlusher"]


class StepMismatchError(MoEWatchError, RuntimeError):
    """Ranks closed a window at different step counts: their windows are not aligned."""


@dataclass(frozen=True)
class _Pending:
    """A window whose counts are on their way to the host."""

    host: torch.Tensor
    event: Any  # torch.cuda.Event
    tokens: np.ndarray
    prob_tokens: np.ndarray
    meta: WindowMeta


#: The window's counts (all-reduced over the group), its meta, and this rank's own counts before the
#: all-reduce (``keep_local`` with a group; else None: the counts are this rank's own already).
Ready = tuple[WindowCounts, WindowMeta, WindowCounts | None]


class WindowFlusher:
    """Moves one window's counts from the accumulator's device buffers to the host.

    With a process group, every rank must close the same windows: the counts and the host-side token
    totals are summed across the group in one ``all_reduce`` (token totals ride in two extra columns).
    ``keep_local`` (per-rank export) also hands over this rank's own counts: they travel to the host in the
    same device-to-host copy, appended after the reduced ones.
    """

    def __init__(self, acc: Accumulator, group: Any = None, *, keep_local: bool = False) -> None:
        self._acc = acc
        self._group = group
        self._keep_local = keep_local
        self._pending: _Pending | None = None

    def release_group(self) -> None:
        self._group = None

    def close_window(self, meta: WindowMeta, blocking: bool) -> Ready | None:
        """Take the window off the device and zero the buffers. Returns the host counts, or ``None`` while a
        non-blocking copy is under way (``poll``/``finish`` hand it over later)."""
        packed = self._acc.pack()
        tokens, prob_tokens = self._acc.take_host_counts()
        if self._group is not None:
            packed = self._all_reduce(packed, tokens, prob_tokens, meta.step_end)
        if packed is None:
            return self._unpack(self._zeros(), tokens, prob_tokens), meta, None  # nothing counted, no group
        if packed.device.type == "cuda" and not blocking:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = _Pending(host, event, tokens, prob_tokens, meta)
            return None
        host_np = packed.cpu().numpy()  # CPU-GPU sync: once per window, at its end
        return self._ready(host_np, tokens, prob_tokens, meta)

    def poll(self) -> Ready | None:
        """The pending window, if its copy has landed (``event.query()`` does not synchronise)."""
        p = self._pending
        if p is None or not p.event.query():
            return None
        self._pending = None
        return self._ready(p.host.numpy(), p.tokens, p.prob_tokens, p.meta)

    def finish(self) -> Ready | None:
        """The pending window, waiting for its copy if needed."""
        p = self._pending
        if p is None:
            return None
        p.event.synchronize()  # CPU-GPU sync: only on flush()/close()
        return self.poll()

    def check_steps(self, step: int) -> StepMismatchError | None:
        """One small all_reduce of every rank's step count (``close()`` calls it on every rank before its
        last window, so a rank with an extra step is named on all ranks instead of hanging the others)."""
        steps_R = torch.zeros(dist.get_world_size(self._group), dtype=torch.float64)
        steps_R[dist.get_rank(self._group)] = step
        if dist.get_backend(self._group) == "nccl":
            steps_R = steps_R.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(steps_R, op=dist.ReduceOp.SUM, group=self._group)
        return _mismatch(np.rint(steps_R.cpu().numpy()).astype(np.int64))  # CPU-GPU sync: once, at close

    def _zeros(self) -> np.ndarray:
        return np.zeros((self._acc.n_layers, self._acc.packed_width))

    def _all_reduce(
        self, packed: torch.Tensor | None, tokens: np.ndarray, prob_tokens: np.ndarray, step: int
    ) -> torch.Tensor:
        if packed is not None:
            device = packed.device
        elif dist.get_backend(self._group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        if packed is None:  # this rank counted nothing yet, but must still join the collective
            packed = torch.from_numpy(self._zeros()).to(device)
        tok = torch.from_numpy(np.stack([tokens, prob_tokens], axis=1).astype(np.float64))
        if device.type == "cuda":
            tok = tok.pin_memory()
        full = torch.cat([packed, tok.to(device, non_blocking=True)], dim=1)
        # Each rank writes its step count into its own slot: after the SUM every rank sees all of them and
        # a rank whose windows are not aligned is named on every rank (checked in _unpack), not hidden in
        # a mixed window.
        steps_R = torch.zeros(dist.get_world_size(self._group), dtype=full.dtype)
        steps_R[dist.get_rank(self._group)] = step
        flat = torch.cat([full.flatten(), steps_R.to(device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._group)
        if self._keep_local:  # ``packed`` is untouched by the in-place all_reduce of the concatenation
            flat = torch.cat([flat, packed.flatten()])
        return flat

    def _ready(self, host: np.ndarray, tokens: np.ndarray, prob_tokens: np.ndarray, meta: WindowMeta) -> Ready:
        local = None
        if self._group is not None and self._keep_local:
            n_local = self._acc.n_layers * self._acc.packed_width
            cut = host.shape[0] - n_local
            host, own = host[:cut], host[cut:]
            local = self._acc.unpack(own.reshape(self._acc.n_layers, -1), tokens, prob_tokens)
        return self._unpack(host, tokens, prob_tokens), meta, local

    def _unpack(self, host: np.ndarray, tokens: np.ndarray, prob_tokens: np.ndarray) -> WindowCounts:
        if self._group is not None:  # rank step counts, then global token totals from the reduced columns
            n = self._acc.n_layers * (self._acc.packed_width + 2)
            steps = np.rint(host[n:]).astype(np.int64)
            error = _mismatch(steps)
            if error is not None:
                raise error
            host = host[:n].reshape(self._acc.n_layers, -1)
            tokens = np.rint(host[:, -2]).astype(np.int64)
            prob_tokens = np.rint(host[:, -1]).astype(np.int64)
            host = host[:, :-2]
        return self._acc.unpack(host, tokens, prob_tokens)


def _mismatch(steps_R: np.ndarray) -> StepMismatchError | None:
    if len(set(steps_R.tolist())) <= 1:
        return None
    return StepMismatchError(
        "moewatch: ranks are at different step counts ("
        + ", ".join(f"rank {r}: step {int(v)}" for r, v in enumerate(steps_R))
        + "); every rank must take the same optimizer steps (and load the same monitor state) for windows "
        "to line up"
    )
