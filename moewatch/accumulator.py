"""Device-side counting: the only moewatch code on the training hot path.

Legend: ``L`` routers (layers), ``E`` experts of a router (``Emax`` the largest), ``T`` tokens of one call,
``K`` top-k. Buffers live on the device of the router outputs, are updated in place under ``no_grad`` and
are never read by the host until a window closes:

* ``counts_LE2`` int64 ``[L, Emax + 2]``: assignments per expert in columns ``1..E`` of a row; column 0 counts
  ids below 0 and column ``E + 1`` ids of ``E`` or more (both invalid). ``torch.bucketize`` maps an id to its
  column in one kernel that never reads the device from the host (``index_add_`` of an invalid id would
  crash the process on CUDA instead).
* ``stats_LS`` float64 ``[L, Emax + 3]``: columns ``[:E]`` sum of router probability vectors,
  ``Emax`` sum of ``logsumexp(logits)^2`` (z-loss), ``Emax + 1`` finite token rows, ``Emax + 2`` dropped
  assignments reported by the framework.

Token counts come from tensor shapes, which the host knows without asking the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moewatch.adapters.base import RouterOutput

__all__ = ["Accumulator", "WindowCounts"]

#: From this many ids per call, eager CPU counting maps ids to columns with add + clamp_ instead of bucketize.
_CLAMP_FROM = 2048
_INT64, _INT32 = torch.int64, torch.int32


@dataclass(frozen=True)
class WindowCounts:
    """Host copy of one window's buffers (numpy), the input of :mod:`moewatch.window`."""

    counts_LE1: np.ndarray  # int64 [L, Emax + 1]; column E of a row holds the router's invalid ids
    stats_LS: np.ndarray  # float64 [L, Emax + 3]
    tokens_L: np.ndarray  # int64 [L]
    prob_tokens_L: np.ndarray  # int64 [L], tokens whose probabilities/logits were seen
    invalid_below_L: np.ndarray | None = None  # int64 [L]: of the invalid ids in column E, those below 0


class _Buffers:
    """One device's buffers, plus per-layer views of them made once so that an update slices nothing."""

    __slots__ = ("counts_LE2", "stats_LS", "traced_LC", "one", "count_rows", "expert_counts",
                 "edges", "layer_edges",
                 "prob_rows", "z_cells", "finite_cells", "zf_cells", "dropped_cells", "zf_mask_21", "zf_base_21",
                 "stats_heads", "work")

    def __init__(self, num_experts: list[int], e_max: int, device: torch.device) -> None:
        n_layers = len(num_experts)
        self.counts_LE2 = torch.zeros(n_layers, e_max + 2, dtype=torch.int64, device=device)
        self.stats_LS = torch.zeros(n_layers, e_max + 3, dtype=torch.float64, device=device)
        # Under torch.compile the host-side counters would be guarded Python ints (a recompile per call):
        # traced calls keep tokens, probability tokens and the call number on the device instead.
        self.traced_LC = torch.zeros(n_layers, 3, dtype=torch.float64, device=device)
        self.one = torch.ones((), dtype=torch.int64, device=device)  # expanded: the index_add_ source
        self.count_rows = list(self.counts_LE2.unbind(0))
        self.expert_counts = [self.counts_LE2[i, 1 : e + 1] for i, e in enumerate(num_experts)]
        # bucketize(id, [0, 1, ..., E], right=True): id + 1 for a valid id, 0 below, E + 1 above.
        self.edges = {e: torch.arange(e + 1, device=device) for e in set(num_experts)}
        self.layer_edges = [self.edges[e] for e in num_experts]
        self.prob_rows = [self.stats_LS[i, :e] for i, e in enumerate(num_experts)]
        self.z_cells = list(self.stats_LS[:, e_max].unbind(0))
        self.finite_cells = list(self.stats_LS[:, e_max + 1].unbind(0))
        self.zf_cells = list(self.stats_LS[:, e_max : e_max + 2].unbind(0))  # (z-loss, finite rows): adjacent
        self.dropped_cells = list(self.stats_LS[:, e_max + 2].unbind(0))
        # [[lse^2], [1]] per token from lse in two ops: base + (lse * mask) * lse; NaN rows stay NaN in both.
        self.zf_mask_21 = torch.tensor([[1.0], [0.0]], device=device)
        self.zf_base_21 = torch.tensor([[0.0], [1.0]], device=device)
        self.stats_heads = list(self.stats_LS[:, : e_max + 2].unbind(0))  # probability sums, z-loss, finite rows
        # CPU only: the last sampled call's workspace per expert count, (tokens, W, probability rows, z row,
        # finite row); see Accumulator._sample_cpu_small.
        self.work: dict[int, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def zero_(self) -> None:
        self.counts_LE2.zero_()
        self.stats_LS.zero_()
        self.traced_LC.zero_()


class Accumulator:
    """Per-router counters, updated in place with no host synchronisation.

    A router call with indices costs 2 aten ops to count (bucketize, index_add_; on the CPU from
    ``_CLAMP_FROM`` ids on, 3: add, clamp_, index_add_, much cheaper there than bucketize). A call that also
    carries the probability statistics (softmax logits, the common case) costs 11 more, no composites: 3 for
    the probability sums (softmax, nansum, add_), 4 for logsumexp (amax, amax, log_, sub) and 4 for the
    z-loss and finite rows together (mul, addcmul, nansum, add_); on the CPU with fewer than 16 experts, where
    dispatch costs more than arithmetic, 9 into a kept workspace (softmax, amax, amax, log, ceil_, sub_,
    square_, nansum, add_; see ``tests/test_no_sync.py::test_kernels_per_router_call``)."""

    def __init__(self, num_experts: list[int], probs_every: int = 1) -> None:
        self.num_experts = list(num_experts)
        self.probs_every = probs_every
        # Calls of each router until its next sampled one (0: the next call samples; every window's first does).
        self._until_sample_L = [0] * len(num_experts)
        self.n_layers = len(num_experts)
        self.e_max = max(num_experts)
        self.col_z, self.col_finite, self.col_dropped = self.e_max, self.e_max + 1, self.e_max + 2
        # Host-side token counts (from shapes). Preallocated; updated by index, never appended to.
        self.tokens_L = [0] * self.n_layers
        self.prob_tokens_L = [0] * self.n_layers
        # One set of buffers per device that router outputs live on (several with pipeline/device_map).
        self._bufs: dict[torch.device, _Buffers] = {}
        self._last: tuple[torch.device, _Buffers] | None = None
        self.traced_calls = False  # set by compiled calls, whose token counts the host does not see
        self._updaters: dict[tuple[int, int], Callable[[RouterOutput], None]] = {}

    def _buffers(self, device: torch.device) -> _Buffers:
        last = self._last
        if last is not None and last[0] == device:
            return last[1]
        bufs = self._bufs.get(device)
        if bufs is None:
            # Normal tensors even when the first call runs under torch.inference_mode() (count_eval): an
            # inference tensor could not be updated in place by the training calls after it.
            with torch.inference_mode(False):
                bufs = self._bufs[device] = _Buffers(self.num_experts, self.e_max, device)
        self._last = (device, bufs)
        return bufs

    @property
    def packed_width(self) -> int:
        """Columns of :meth:`pack`'s tensor: ``Emax + 2`` counts, ``Emax + 3`` statistics, then the 3 traced
        counters (tokens, probability tokens, calls) of calls made under ``torch.compile``."""
        return 2 * self.e_max + 8

    def state_bytes(self) -> int:
        """Bytes of device memory the buffers hold: O(layers x experts), plus on the CPU, where routers with
        fewer than 16 experts keep one sampled call's workspace ((Emax + 2) x tokens float32), one call's worth."""
        total = 0
        for b in self._bufs.values():
            work = [w[1] for w in b.work.values()]
            for t in (b.counts_LE2, b.stats_LS, b.traced_LC, b.one, b.zf_mask_21, b.zf_base_21, *b.edges.values(),
                      *work):
                total += t.numel() * t.element_size()
        return total

    @property
    def devices(self) -> list[torch.device]:
        return list(self._bufs)

    def prepare(self, device: torch.device) -> None:
        """Allocate the buffers of ``device`` now (at attach), so that a compiled graph finds them instead of
        creating them, which would cost a recompile on the next call."""
        if device.type != "meta":
            self._buffers(device)

    def update(self, layer: int, out: RouterOutput, top_k: int) -> None:
        """Add one router call. Must run with gradients disabled."""
        if torch.compiler.is_compiling():
            self._update_traced(layer, out, top_k)
            return
        fn = self._updaters.get((layer, top_k))
        if fn is None:
            fn = self._updaters[(layer, top_k)] = self.updater(layer, top_k)
        fn(out)

    def updater(self, layer: int, top_k: int) -> Callable[[RouterOutput], None]:
        """The eager ``update`` of one router, as a closure: the router's hook calls it on every call, so its
        constants (edges, count row, the last device's buffers, the ``index_add_`` source of the last call's
        size) are bound once instead of looked up per call. Must run with gradients disabled."""
        e, probs_every = self.num_experts[layer], self.probs_every
        tokens_L, until_sample_L = self.tokens_L, self._until_sample_L
        general, sample = self._count_other, self._sample_eager
        # The last device's buffers and what the count reads from them; rebound when the device changes.
        device: torch.device | None = None
        bufs: _Buffers | None = None
        edges = row = ones_N = None
        ones_n, clamp_from = -1, _CLAMP_FROM

        def update(out: RouterOutput) -> None:
            nonlocal device, bufs, edges, row, ones_N, ones_n, clamp_from
            idx = out.indices_TK
            if idx is not None:
                if idx.device != device:
                    device = idx.device
                    bufs = self._buffers(device)
                    edges, row, ones_n = bufs.layer_edges[layer], bufs.count_rows[layer], -1
                    clamp_from = _CLAMP_FROM if device.type == "cpu" else 1 << 62
                n = idx.numel()
                tokens_L[layer] += n // top_k
                if n < clamp_from:  # bucketize takes ids of any integer dtype and returns int64 columns
                    cols_N = torch.bucketize(idx, edges, right=True).view(-1)
                else:
                    # The same columns. CPU bucketize costs 15-30 ns per id from a few thousand ids on (1 ms
                    # for 32k ids); add + clamp_ cost well under 1 ns per id.
                    dtype = idx.dtype
                    if dtype is not _INT64 and dtype is not _INT32:
                        idx = idx.long()  # id + 1 must not wrap around in a narrow dtype
                    cols_N = torch.add(idx, 1).clamp_(0, e + 1).view(-1)
                if ones_n != n:
                    ones_N, ones_n = bufs.one.expand(n), n  # type: ignore[union-attr]
                row.index_add_(0, cols_N, ones_N)  # type: ignore[union-attr]
                out_bufs = bufs
            else:
                out_bufs = general(layer, out, e)
            if out.dropped is not None:
                out_bufs.dropped_cells[layer].add_(out.dropped)  # type: ignore[union-attr]
            # Probabilities on calls 0, N, 2N, ... of the window; the counts above are exact.
            left = until_sample_L[layer]
            if left:
                until_sample_L[layer] = left - 1
                return
            until_sample_L[layer] = probs_every - 1
            sample(layer, out, out_bufs, e)  # type: ignore[arg-type]

        return update

    def _count_other(self, layer: int, out: RouterOutput, e: int) -> _Buffers:
        """Count a call that carries a routing map or per-expert counts instead of ids."""
        if out.routing_map_TE is not None:
            rmap = out.routing_map_TE.reshape(-1, e)
            bufs = self._buffers(rmap.device)
            self.tokens_L[layer] += rmap.shape[0]
            bufs.expert_counts[layer].add_(rmap.sum(dim=0, dtype=torch.int64))
            return bufs
        if out.counts_E is not None and out.num_tokens is not None:
            counts = out.counts_E.reshape(-1)
            bufs = self._buffers(counts.device)
            self.tokens_L[layer] += out.num_tokens
            bufs.expert_counts[layer].add_(counts.to(torch.int64))
            return bufs
        raise ValueError("RouterOutput needs indices_TK, routing_map_TE, or counts_E with num_tokens")

    def _sample_eager(self, layer: int, out: RouterOutput, bufs: _Buffers, e: int) -> None:
        """The probability statistics of a sampled call (softmax sums, z-loss, finite rows)."""
        logits = out.logits_TE
        if logits is None and out.probs_TE is None and out.logits_fn is not None:
            logits = out.logits_fn()
        if logits is not None and out.probs_TE is None:
            # No detach: under no_grad nothing here records autograd history (one dispatch less per call).
            if logits.dim() != 2:
                logits = logits.reshape(-1, e)
            if logits.dtype is not torch.float32:
                logits = logits.float()
            self.prob_tokens_L[layer] += logits.shape[0]
            if out.score_func == "sigmoid":
                scores = torch.sigmoid(logits)
                bufs.prob_rows[layer].add_(torch.nansum(scores / scores.sum(dim=-1, keepdim=True), dim=0))
                lse_T = torch.logsumexp(logits, dim=-1)
                finite_T = torch.isfinite(lse_T)
                bufs.finite_cells[layer].add_(finite_T.sum())
                lse_T = torch.where(finite_T, lse_T, 0.0)
                bufs.z_cells[layer].add_(torch.dot(lse_T, lse_T))
            elif e < 16 and logits.device.type == "cpu":
                self._sample_cpu_small(layer, logits, bufs, e)
            else:
                probs = torch.softmax(logits, dim=1)  # the only [T, E] temporary of the call
                # logsumexp = max(logit) - log(max p) (same expert; max p >= 1/E): three cheap ops instead of
                # logsumexp's five kernels. NaN, never +-inf, exactly when a row holds NaN/+inf or is all -inf.
                lse_T = torch.amax(logits, dim=1) - torch.amax(probs, dim=1).log_()
                bufs.prob_rows[layer].add_(torch.nansum(probs, dim=0))  # non-finite rows add nothing
                # (sum of lse^2, finite rows) in one reduction of [[lse^2], [1]]: NaN rows are skipped by both.
                zf_2T = torch.addcmul(bufs.zf_base_21, lse_T * bufs.zf_mask_21, lse_T)
                bufs.zf_cells[layer].add_(torch.nansum(zf_2T, dim=1))
        elif out.probs_TE is not None:
            probs = out.probs_TE.detach().reshape(-1, e).float()
            bufs.prob_rows[layer].add_(torch.nansum(probs, dim=0))
            self.prob_tokens_L[layer] += probs.shape[0]
            bufs.finite_cells[layer].add_(torch.isfinite(probs).all(dim=-1).sum())

    def _sample_cpu_small(self, layer: int, logits_TE: torch.Tensor, bufs: _Buffers, e: int) -> None:
        """``_sample_eager``'s softmax statistics for a CPU router with fewer than 16 experts, where every op
        costs its dispatch more than its arithmetic: 9 kernels (and a transposed view) into a workspace ``W``
        ``[Emax + 2, T]`` kept for the next call of the same size, whose rows are the statistics row's columns
        (probabilities, zeros up to ``Emax``, lse^2, finite-row indicator), so one ``nansum`` over tokens and one
        ``add_`` update them all. CPU softmax is also several times slower over a last dim narrower than one
        vector register than over the token dim of the transposed view. Reusing the workspace is safe because
        CPU ops run in program order; on a GPU the general path's temporaries come from the stream-aware caching
        allocator instead."""
        t = logits_TE.shape[0]
        work = bufs.work.get(e)
        if work is None or work[0] != t:
            with torch.inference_mode(False):  # reused by training calls after an inference-mode one
                w = torch.zeros(self.e_max + 2, t, device=logits_TE.device)  # rows e..Emax-1 stay zero
                work = bufs.work[e] = (t, w, w[:e], w[self.e_max], w[self.e_max + 1])
        _, w, probs_ET, z_T, finite_T = work
        x_ET = logits_TE.t()
        torch.softmax(x_ET, 0, out=probs_ET)
        # logsumexp = max(logit) - log(max p), as in the general path; max p lies in [1/E, 1], so its ceil is 1,
        # and NaN exactly when the row is non-finite: the finite-row indicator.
        torch.amax(x_ET, 0, out=z_T)
        torch.amax(probs_ET, 0, out=finite_T)
        log_max_p_T = torch.log(finite_T)
        finite_T.ceil_()
        z_T.sub_(log_max_p_T).square_()  # lse^2, NaN on non-finite rows
        bufs.stats_heads[layer].add_(torch.nansum(w, dim=1))  # NaN rows add nothing to any column

    def _update_traced(self, layer: int, out: RouterOutput, top_k: int) -> None:
        """``update`` as torch.compile traces it: the same statistics, with no Python state that changes per
        call (no guard, no recompile) and no data-dependent branch (no graph break). Every buffer is
        indexed from its base inside the graph: pre-made views of one base would reach the graph as
        aliased inputs, whose in-place updates AOTAutograd does not all keep (non-finite rows appeared where
        eager had none). The probability sampling is a device-side choice (calls 0, N, 2N, ... of the window
        add their statistics, the others zeros), so the graph is the same for every call."""
        self.traced_calls = True
        e = self.num_experts[layer]
        device = next(t.device for t in (out.indices_TK, out.routing_map_TE, out.counts_E) if t is not None)
        bufs = self._bufs[device]  # allocated by prepare() at attach
        counts_E2 = bufs.counts_LE2[layer]
        stats_S, traced_C = bufs.stats_LS[layer], bufs.traced_LC[layer]
        idx = out.indices_TK
        if idx is not None:
            tokens = idx.numel() // top_k
            if idx.dtype is not torch.int64 and idx.dtype is not torch.int32:
                idx = idx.long()
            # bucketize's columns (id + 1, 0 below, E + 1 above) as add + clamp, which inductor fuses
            # (bucketize stays a library call: 1-2 ms for 32k ids on a CPU). The call's histogram is int32,
            # whose scatter-add inductor generates in its kernel (an int64 one falls back to aten), and a
            # call holds far fewer than 2**31 ids; it is added to the window's int64 row.
            cols_N = (idx + 1).clamp_(0, e + 1).view(-1)
            hist_E2 = torch.zeros(e + 2, dtype=torch.int32, device=device)
            counts_E2[: e + 2].add_(hist_E2.index_add_(0, cols_N, torch.ones_like(cols_N, dtype=torch.int32)))
        elif out.routing_map_TE is not None:
            rmap = out.routing_map_TE.reshape(-1, e)
            tokens = rmap.shape[0]
            counts_E2[1 : e + 1].add_(rmap.sum(dim=0, dtype=torch.int64))
        elif out.counts_E is not None and out.num_tokens is not None:
            tokens = out.num_tokens
            counts_E2[1 : e + 1].add_(out.counts_E.reshape(-1).to(torch.int64))
        else:
            raise ValueError("RouterOutput needs indices_TK, routing_map_TE, or counts_E with num_tokens")
        if out.dropped is not None:
            stats_S[self.col_dropped].add_(out.dropped)
        # This call is sampled (calls 0, N, 2N, ... of the window): read before the call counter advances.
        take = torch.remainder(traced_C[2], self.probs_every) == 0
        logits = out.logits_TE
        if logits is None and out.probs_TE is None and out.logits_fn is not None:
            logits = out.logits_fn()
        # Every call computes the statistics (inductor fuses them into a few small kernels), kept or zeroed
        # by `take`. torch.cond would skip them on unsampled calls, but a cond in a router hook makes dynamo
        # give up on the forward of transformers models (eager frame by frame: 6 compiled frames, not 1).
        # Inductor's CPU code checks isnan one element at a time (nansum over [4096, 64] took 0.4 ms), so NaN
        # entries are dropped by `x == x`, which it vectorises; the sums are nansum's.
        if logits is not None and out.probs_TE is None:
            if logits.dim() != 2:
                logits = logits.reshape(-1, e)
            logits = logits.detach().float()
            if out.score_func == "sigmoid":
                scores = torch.sigmoid(logits)
                probs = scores / scores.sum(dim=-1, keepdim=True)
                lse_T = torch.logsumexp(logits, dim=-1)
            else:
                # The eager form (see _sample_eager): logsumexp = max(logit) - log(max p), no second exp
                # pass; NaN, never +-inf, exactly when a row holds NaN/+inf or is all -inf.
                probs = torch.softmax(logits, dim=-1)
                lse_T = torch.amax(logits, dim=-1) - torch.amax(probs, dim=-1).log()
            finite_T = torch.isfinite(lse_T)
            lse_T = torch.where(finite_T, lse_T, 0.0)
            z, finite = torch.dot(lse_T, lse_T), finite_T.sum()
        elif out.probs_TE is not None:
            probs = out.probs_TE.detach().reshape(-1, e).float()
            z, finite = torch.zeros((), device=device), torch.isfinite(probs).all(dim=-1).sum()
        else:
            traced_C.add_(self._traced_counters(tokens, torch.zeros((), dtype=torch.float64, device=device)))
            return
        rows = probs.shape[0]
        prob_sum_E = torch.where(probs == probs, probs, 0.0).sum(dim=0)
        # One update of the statistics row (probability sums, z-loss, finite rows at their columns) and one of
        # the traced counters, each a single fused kernel: fewer buffers for the compiled graph to allocate.
        parts = [prob_sum_E, z.view(1), finite.view(1).float()]
        if e < self.e_max:
            parts.insert(1, prob_sum_E.new_zeros(self.e_max - e))
        update_S = torch.cat(parts).double()
        stats_S[: self.e_max + 2].add_(torch.where(take, update_S, 0.0))
        traced_C.add_(self._traced_counters(tokens, take.double() * rows))

    @staticmethod
    def _traced_counters(tokens: int, sampled_rows: torch.Tensor) -> torch.Tensor:
        """A traced call's increment of its counters ``[tokens, probability tokens, calls]``, made by ops from a
        device tensor (a ``torch.tensor`` constant cannot be traced for the meta device)."""
        one = torch.ones_like(sampled_rows)
        return torch.stack([one * tokens, sampled_rows, one])

    def pack(self) -> torch.Tensor | None:
        """Everything of the window in one float64 tensor ``[L, packed_width]`` on the first device
        (device-side, no sync), and zero the buffers. ``None`` if nothing was ever counted."""
        if not self._bufs:
            return None
        parts = []
        for bufs in self._bufs.values():
            parts.append(torch.cat([bufs.counts_LE2.double(), bufs.stats_LS, bufs.traced_LC], dim=1))
        packed = parts[0]  # torch.cat made a fresh tensor: zeroing the buffers below leaves it intact
        for extra in parts[1:]:
            packed.add_(extra.to(packed.device, non_blocking=True))
        for bufs in self._bufs.values():
            bufs.zero_()
        return packed

    def take_host_counts(self) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.asarray(self.tokens_L, dtype=np.int64)
        prob_tokens = np.asarray(self.prob_tokens_L, dtype=np.int64)
        for i in range(self.n_layers):
            self.tokens_L[i] = 0
            self.prob_tokens_L[i] = 0
            self._until_sample_L[i] = 0  # every window samples the probability statistics from its first call
        self.traced_calls = False
        return tokens, prob_tokens

    def unpack(self, packed_host: np.ndarray, tokens_L: np.ndarray, prob_tokens_L: np.ndarray) -> WindowCounts:
        c, s = self.e_max + 2, 2 * self.e_max + 5
        raw_LE2 = np.rint(packed_host[:, :c]).astype(np.int64)
        traced_LC = np.rint(packed_host[:, s : s + 3]).astype(np.int64)
        tokens_L = np.asarray(tokens_L, dtype=np.int64) + traced_LC[:, 0]
        prob_tokens_L = np.asarray(prob_tokens_L, dtype=np.int64) + traced_LC[:, 1]
        counts_LE1 = np.zeros((self.n_layers, self.e_max + 1), dtype=np.int64)
        for i, e in enumerate(self.num_experts):
            counts_LE1[i, :e] = raw_LE2[i, 1 : e + 1]
            counts_LE1[i, e] = raw_LE2[i, 0] + raw_LE2[i, e + 1 :].sum()
        return WindowCounts(
            counts_LE1=counts_LE1,
            stats_LS=packed_host[:, c:s].astype(np.float64),
            tokens_L=tokens_L,
            prob_tokens_L=prob_tokens_L,
            invalid_below_L=raw_LE2[:, 0].copy(),
        )
