"""Route capture (issue 23, part 1): each token's top-k expert ids per monitored router, recorded on the
device while a ``with watch.capture_routes() as cap:`` block runs.

Each router gets one preallocated ``[max_tokens, top_k]`` int32 buffer on its own device when the block
opens (so memory is bounded and known up front); a router call copies its ids into the next rows (one
``copy_``, no host sync: the row offset comes from the tensor's shape, which the host knows). A block that
would need more rows stops recording and raises :class:`RouteCaptureFullError` when it exits, naming the
size to ask for.

What is recorded: every eager forward of a monitored router inside the block, in training or eval mode
(a ``generate()`` rollout, the training forward, an eval pass), except activation-checkpoint re-runs inside
backward (skipped as the counting skips them) and forwards run by ``torch.compile``d code (they call no
Python hook per call: compare on an eager forward). Whether a forward is counted into the window's loads
is unchanged by capturing: training-mode forwards are counted, eval forwards only with ``count_eval``.

Ids are what the router chose: the adapter's ``indices_TK`` as the framework ordered them (by score for
transformers, vLLM and SGLang, so column 0 is the top-1); for routers that hand over a routing map (Megatron-
Core, NLLB-MoE) the chosen experts ordered by the call's scores when it has them (else by expert id), with
-1 for slots a capacity drop left empty; DeepSpeed's counts-only gate is read from its dispatch mask or
sparse indices (after capacity, -1 where dropped).

Legend: ``T`` tokens, ``L`` routers (layers), ``K`` top-k, ``E`` experts, ``B`` sequences, ``S`` positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from moewatch.adapters.base import RouterInfo, RouterOutput, map_choices
from moewatch.errors import MoEWatchError

__all__ = [
    "DEFAULT_MAX_TOKENS", "RouteCapture", "RouteCaptureError", "RouteCaptureFullError", "choice_ids",
]

log = logging.getLogger(__name__)

#: Rows per router of a capture unless ``max_tokens`` says otherwise: 64 Ki tokens cost
#: ``65536 * top_k * 4`` bytes per router (2 MiB at top-8), 96 MiB for a 48-layer model.
DEFAULT_MAX_TOKENS = 1 << 16


class RouteCaptureError(MoEWatchError, RuntimeError):
    """A capture cannot give what was asked (nothing recorded, layers that saw different tokens)."""


class RouteCaptureFullError(RouteCaptureError):
    """More tokens went through a router than the capture's ``max_tokens`` rows hold."""


def choice_ids(out: RouterOutput, num_experts: int, top_k: int) -> torch.Tensor:
    """The ``[T, K]`` expert ids of one router call (any integer dtype; -1 where a slot holds no expert)."""
    if out.indices_TK is not None:
        return out.indices_TK.reshape(-1, top_k)
    if out.choice_fn is not None:
        return out.choice_fn().reshape(-1, top_k)
    if out.routing_map_TE is not None:
        scores_TE = out.probs_TE if out.probs_TE is not None else out.logits_TE
        if scores_TE is None and out.logits_fn is not None:
            scores_TE = out.logits_fn()
        return map_choices(out.routing_map_TE, scores_TE, top_k)
    raise RouteCaptureError("the router call carries only per-expert counts, no per-token choice")


class RouteCapture:
    """The routes recorded by one ``capture_routes()`` block. Read them after the block: :attr:`routes`
    (``[T, L, K]``), :meth:`sequence_routes` (``[B, S, L, K]``), :meth:`layer_routes` (one router's
    ``[T, K]``), :attr:`module_names` beside them."""

    def __init__(self, routers: Sequence[RouterInfo], devices: Sequence[torch.device], max_tokens: int,
                 *, count: bool = True) -> None:
        if max_tokens < 1:
            raise ValueError(f"moewatch.capture_routes: max_tokens={max_tokens}; it must be a positive row count")
        self.routers = list(routers)
        self.max_tokens = int(max_tokens)
        #: Whether the block's forwards are counted into the window as usual (False for moewatch's own probe).
        self.count = count
        self.tokens_L = [0] * len(self.routers)
        #: Tokens of each recorded call, per router (host-side, from shapes).
        self.call_tokens_L: list[list[int]] = [[] for _ in self.routers]
        self._wanted_L = [0] * len(self.routers)
        self.error: BaseException | None = None
        self.open = True
        with torch.inference_mode(False):  # writable from training forwards after an inference_mode one
            self._buf_L = [
                torch.full((self.max_tokens, r.top_k), -1, dtype=torch.int32, device=d)
                for r, d in zip(self.routers, devices, strict=True)
            ]

    # --- recording (router hooks) ---------------------------------------------------------------

    def record(self, layer: int, out: RouterOutput) -> None:
        """Add one router call's choices. Never raises: a failure is kept and raised when the block exits."""
        if self.error is not None:
            return
        try:
            r = self.routers[layer]
            ids_TK = choice_ids(out, r.num_experts, r.top_k)
            t, off = ids_TK.shape[0], self.tokens_L[layer]
            self._wanted_L[layer] += t
            if off + t > self.max_tokens:
                self.error = RouteCaptureFullError(
                    f"moewatch.capture_routes: router {r.module!r} (layer {r.index}) saw more than "
                    f"max_tokens={self.max_tokens} tokens inside the block; recording stopped there. Pass a "
                    "larger capture_routes(max_tokens=...) (each row costs top_k * 4 bytes per router on its "
                    "device) or capture fewer forwards per block"
                )
                return
            self._buf_L[layer][off : off + t].copy_(ids_TK)
            self.tokens_L[layer] = off + t
            self.call_tokens_L[layer].append(t)
        except Exception as exc:  # noqa: BLE001 - never break the forward being recorded
            r = self.routers[layer]
            self.error = RouteCaptureError(
                f"moewatch.capture_routes: cannot record the choices of router {r.module!r} (layer {r.index}, "
                f"family {r.family!r}): {exc}. Attach with extractor=fn returning a moewatch.RouterOutput "
                "with indices_TK to capture it"
            )
            self.error.__cause__ = exc

    def close(self) -> None:
        self.open = False

    # --- reading --------------------------------------------------------------------------------

    @property
    def module_names(self) -> list[str]:
        """Module names of the routers, in the order of the routes' layer axis."""
        return [r.module for r in self.routers]

    @property
    def num_tokens(self) -> int:
        """Tokens recorded (the same for every router of a plain forward)."""
        return max(self.tokens_L, default=0)

    def layer_routes(self, layer: int) -> torch.Tensor:
        """Router ``layer``'s recorded ids ``[T, K]`` (int32, on its device), calls in order."""
        self._check_readable()
        return self._buf_L[layer][: self.tokens_L[layer]]

    @property
    def routes(self) -> torch.Tensor:
        """All recorded ids, ``[T, L, K]`` int32 on the first router's device (layers with a smaller top-k
        padded with -1): the layout :func:`moewatch.route_agreement` takes."""
        self._check_readable()
        if not self.routers or self.num_tokens == 0:
            raise RouteCaptureError(
                "moewatch.capture_routes: no router call was recorded inside the block (the model did not run, "
                "every router is disabled, or the forwards ran compiled by torch.compile, whose router calls "
                "call no hook: capture an eager forward)"
            )
        if len(set(self.tokens_L)) != 1:
            counts = {r.module: n for r, n in zip(self.routers, self.tokens_L, strict=True)}
            raise RouteCaptureError(
                f"moewatch.capture_routes: the routers saw different token counts {counts}, so their routes do not "
                "line up per token; read each with layer_routes(i)"
            )
        t, k = self.tokens_L[0], max(r.top_k for r in self.routers)
        device = self._buf_L[0].device
        cols = []
        for buf_TK in self._buf_L:
            part = buf_TK[:t].to(device)
            if part.shape[1] < k:
                part = torch.nn.functional.pad(part, (0, k - part.shape[1]), value=-1)
            cols.append(part)
        return torch.stack(cols, dim=1)

    def sequence_routes(self, batch_size: int) -> torch.Tensor:
        """The routes as ``[B, S, L, K]`` for forwards over ``batch_size`` sequences each, such as one
        ``generate()`` call (a prefill over ``[B, P]`` then one ``[B, 1]`` call per new token): each call's
        ``B * s`` tokens are taken as ``B`` rows of ``s`` positions and the calls joined along ``S``. The
        last generated token is never fed back, so a rollout of ``P`` prompt and ``C`` new tokens gives
        ``S = P + C - 1``, the positions a training forward over the ``P + C`` tokens predicts from."""
        routes_TLK = self.routes
        calls = self.call_tokens_L[0]
        if batch_size < 1 or any(n % batch_size for n in calls):
            raise RouteCaptureError(
                f"moewatch.capture_routes: calls of {calls[:8]} tokens do not split into batch_size={batch_size} "
                "sequences; pass the batch size the forwards ran with"
            )
        parts, start = [], 0
        for n in calls:
            parts.append(routes_TLK[start : start + n].reshape(batch_size, n // batch_size, *routes_TLK.shape[1:]))
            start += n
        return torch.cat(parts, dim=1)

    def _check_readable(self) -> None:
        if self.open:
            raise RouteCaptureError("moewatch.capture_routes: read the routes after the with block has ended")
        if self.error is not None:
            raise self.error

    def __repr__(self) -> str:
        return f"RouteCapture(routers={len(self.routers)}, tokens={self.tokens_L[:4]}, max_tokens={self.max_tokens})"
