"""Router discovery and exact counting for plain ``nn.Linear`` gates and custom extractors, and the error
paths (the real Megatron-Core, DeepSpeed, torchtitan and MegaBlocks classes: ``tests/test_real_*.py``).

Legend: ``T`` tokens, ``E`` experts, ``K`` top-k, ``H`` hidden size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from frameworks.guards import no_host_sync_in_hooks
from torch import nn

import moewatch
from tests.fakes import quiet

H, BATCH, SEQ = 16, 2, 12
TOKENS = BATCH * SEQ



def _attach(model: nn.Module, **kw: Any) -> moewatch.Monitor:
    return moewatch.attach(model, **quiet(**{"window_steps": 1000, **kw}))


class Stack(nn.Module):
    """Residual stack of MoE layers: routers are ``layers.<i>.<...>``."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _x(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, H, generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Our own forward hooks: expert counts (``bincount`` of what ``chosen(out)`` returns) and logits."""

    def __init__(
        self,
        modules: list[nn.Module],
        num_experts: int,
        chosen: Callable[[Any], torch.Tensor],
        logits: Callable[[nn.Module, tuple[Any, ...], Any], torch.Tensor] | None = None,
    ) -> None:
        self.counts = [torch.zeros(num_experts, dtype=torch.int64) for _ in modules]
        self.logits: list[list[torch.Tensor]] = [[] for _ in modules]
        self.num_experts = num_experts
        self.handles = [m.register_forward_hook(self._hook(i, chosen, logits)) for i, m in enumerate(modules)]

    def _hook(self, i: int, chosen: Callable[[Any], torch.Tensor], logits: Any) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            with torch.no_grad():
                ids = chosen(out).reshape(-1)
                self.counts[i] += torch.bincount(ids, minlength=self.num_experts)
                if logits is not None:
                    self.logits[i].append(logits(module, args, out).detach().double())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def loads(self) -> list[list[int]]:
        return [c.tolist() for c in self.counts]


def _run(model: nn.Module, watch: moewatch.Monitor, steps: int = 3) -> moewatch.WindowReport:
    for seed in range(steps):
        model(_x(seed))
    return watch.flush()


def _norm_entropy(probs_TE: torch.Tensor) -> float:
    p = probs_TE.double().mean(dim=0)
    return float(-(p * p.log()).sum() / math.log(p.numel()))


# --- Megatron-Core -------------------------------------------------------------------------------------


# --- Megatron-Core, DeepSpeed, torchtitan, MegaBlocks --------------------------------------------------
# The real classes: tests/test_real_megatron.py, test_real_deepspeed.py, test_real_torchtitan.py,
# test_real_megablocks.py, and their hot-path checks in test_real_hot_path.py.


# --- plain nn.Linear gates and custom extractors -------------------------------------------------------


class LinearGateMoE(nn.Module):
    """A home-grown MoE block: ``gate`` is a bare Linear; k lives under a name moewatch does not know."""

    def __init__(self, num_experts: int = 5, k: int = 2, k_attr: str = "n_active") -> None:
        super().__init__()
        setattr(self, k_attr, k)
        self._k = k
        self.gate = nn.Linear(H, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.5)
        self.experts = nn.ModuleList(nn.Linear(H, H) for _ in range(num_experts))
        self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits_TE = self.gate(x.reshape(-1, H))
        weights_TK, ids_TK = logits_TE.softmax(-1).topk(self._k, dim=-1)
        out = torch.zeros_like(x.reshape(-1, H))
        for j in range(self._k):
            for e, expert in enumerate(self.experts):
                sel = ids_TK[:, j] == e
                out[sel] += weights_TK[sel, j : j + 1] * expert(x.reshape(-1, H)[sel])
        return (out + torch.sigmoid(self.shared_expert_gate(x.reshape(-1, H)))).reshape(x.shape)


def _linear_model(**kw: Any) -> Stack:
    torch.manual_seed(0)
    return Stack([LinearGateMoE(**kw) for _ in range(2)])


@pytest.mark.parametrize(
    "routers", [["*.gate"], lambda name, module: name.endswith(".gate")], ids=["glob", "predicate"]
)
def test_plain_linear_gate_named_by_user(routers: Any) -> None:
    model = _linear_model()
    with pytest.raises(moewatch.NoRouterFoundError):
        _attach(model)  # `n_active` is not a name moewatch knows: it must be told
    ref = Recorder([layer.gate for layer in model.layers], 5, lambda out: out.topk(2, dim=-1).indices)
    watch = _attach(model, routers=routers, top_k=2)
    report = _run(model, watch)
    watch.close()
    ref.remove()
    assert [(r.module, r.family, r.num_experts, r.top_k) for r in watch.routers] == [
        (f"layers.{i}.gate", "linear", 5, 2) for i in range(2)
    ]
    assert [layer.loads for layer in report.layers] == ref.loads()


def test_linear_gate_found_when_parent_exposes_top_k() -> None:
    model = _linear_model(k_attr="top_k")
    with _attach(model) as watch:
        assert [(r.module, r.family, r.top_k) for r in watch.routers] == [
            (f"layers.{i}.gate", "linear", 2) for i in range(2)
        ]


def test_linear_gate_without_k_asks_for_it() -> None:
    with pytest.raises(ValueError, match="top_k=K"):
        _attach(_linear_model(), routers=["*.gate"])


def test_pattern_matching_a_one_output_gate_is_rejected() -> None:
    with pytest.raises(
        ValueError, match="shared_expert_gate' matched `routers` but is an nn.Linear with 1 output"
    ):
        _attach(_linear_model(), routers=["*gate"], top_k=1)


class DictRouter(nn.Module):
    """A router with a shape moewatch cannot know: returns a dict."""

    def __init__(self, num_experts: int = 6, k: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(H, num_experts)
        self.k = k

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.proj(x.reshape(-1, H))
        return {"logits": logits, "choice": logits.topk(self.k, dim=-1).indices}


class DictMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = DictRouter()
        self.ffn = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.router(x)
        return self.ffn(x) * routed["logits"].mean(-1, keepdim=True).reshape(*x.shape[:-1], 1)


def _extract(module: nn.Module, args: tuple[Any, ...], out: Any) -> moewatch.RouterOutput:
    return moewatch.RouterOutput(indices_TK=out["choice"], logits_TE=out["logits"])


def test_custom_extractor() -> None:
    torch.manual_seed(0)
    model = Stack([DictMoE() for _ in range(2)])
    ref = Recorder(
        [layer.router for layer in model.layers], 6, lambda out: out["choice"], lambda m, a, o: o["logits"]
    )
    watch = _attach(model, routers=["layers.*.router"], extractor=_extract, num_experts=6, top_k=2)
    report = _run(model, watch)
    watch.close()
    ref.remove()
    assert [(r.module, r.family, r.num_experts, r.top_k) for r in watch.routers] == [
        (f"layers.{i}.router", "custom", 6, 2) for i in range(2)
    ]
    assert [layer.loads for layer in report.layers] == ref.loads()
    for i, layer in enumerate(report.layers):
        assert layer.norm_entropy == pytest.approx(
            _norm_entropy(torch.cat(ref.logits[i]).softmax(-1)), abs=2e-6
        )


# --- errors --------------------------------------------------------------------------------------------


def test_model_without_router_says_what_was_looked_for_and_how_to_fix() -> None:
    model = nn.Sequential(nn.Linear(H, 32), nn.GELU(), nn.Linear(32, H))
    with pytest.raises(moewatch.NoRouterFoundError) as info:
        _attach(model)
    msg = str(info.value)
    for needle in (
        "Sequential",
        "TopKRouter",
        "TopKGate",
        "TokenChoiceTopKRouter",
        "LearnedRouter",
        "routers=",
        "top_k=",
        "extractor=",
    ):
        assert needle in msg, needle
    assert isinstance(info.value, ValueError)


def test_pattern_that_matches_nothing() -> None:
    with pytest.raises(moewatch.NoRouterFoundError, match="no module matched routers="):
        _attach(_linear_model(), routers=["decoder.*.router"], top_k=2)


def test_pattern_that_matches_a_non_router_module() -> None:
    with pytest.raises(
        ValueError, match=r"'layers.0.experts' \(ModuleList\).*not a router family.*extractor="
    ):
        _attach(_linear_model(), routers=["layers.*.experts"], top_k=2)


# --- bad router outputs --------------------------------------------------------------------------------


class FakeTopKRouter(nn.Module):
    """Deterministic transformers-style router: returns ``(logits, scores, indices)`` that the test sets."""

    def __init__(self, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, H))
        self.next_indices: torch.Tensor | None = None
        self.next_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_TH = x.reshape(-1, H)
        logits = self.next_logits if self.next_logits is not None else F.linear(x_TH, self.weight)
        indices = self.next_indices if self.next_indices is not None else logits.topk(self.top_k, -1).indices
        return logits, torch.ones(indices.shape), indices


class FakeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = FakeTopKRouter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate(x)
        return x


def test_invalid_expert_ids_are_counted_not_fatal() -> None:
    model = Stack([FakeBlock()])
    indices_TK = torch.tensor([[0, 1], [-1, 2], [4, 3], [99, -7], [3, 3]])
    model.layers[0].gate.next_indices = indices_TK
    with _attach(model) as watch:
        model(torch.zeros(1, 5, H))
        report = watch.flush()
    layer = report.layers[0]
    assert layer.loads == [1, 1, 1, 3]
    assert layer.invalid_ids == 4
    assert layer.tokens == 5


def test_nonfinite_logits_are_counted() -> None:
    model = Stack([FakeBlock()])
    logits_TE = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    logits_TE[1, 2] = float("nan")
    logits_TE[4, 0] = float("inf")
    gate = model.layers[0].gate
    gate.next_logits = logits_TE
    gate.next_indices = torch.tensor([[0, 1]] * 6)
    with _attach(model) as watch:
        model(torch.zeros(1, 6, H))
        report = watch.flush()
    layer = report.layers[0]
    assert layer.nonfinite == 2
    assert layer.loads == [6, 6, 0, 0]
    finite = logits_TE[[0, 2, 3, 5]].double()
    assert layer.norm_entropy == pytest.approx(_norm_entropy(finite.softmax(-1)), abs=2e-6)
    assert layer.z_loss == pytest.approx(float(torch.logsumexp(finite, -1).pow(2).mean()), rel=1e-5)


class _Flaky:
    def __init__(self, fail_on: set[int]) -> None:
        self.calls = 0
        self.fail_on = fail_on

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> moewatch.RouterOutput:
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("boom from extractor")
        return _extract(module, args, out)


def test_extractor_without_routers_is_an_error() -> None:
    with pytest.raises(ValueError, match="extractor= reads the modules named by routers="):
        _attach(_linear_model(k_attr="top_k"), extractor=_extract)


def test_failing_hook_is_logged_once_counted_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = Stack([DictMoE()])
    flaky = _Flaky(fail_on={2, 3})
    watch = _attach(model, routers=["layers.0.router"], extractor=flaky, num_experts=6, top_k=2, strict=False)
    with caplog.at_level(logging.WARNING, logger="moewatch"):
        for seed in range(4):
            model(_x(seed))  # training never sees the error
    report = watch.flush()
    watch.close()
    assert flaky.calls == 2  # skipped after the failure: the extractor is not called again
    assert watch.hook_errors == 1 and report.hook_errors == 1
    assert len([r for r in caplog.records if "boom from extractor" in r.getMessage()]) == 1
    assert report.layers[0].tokens == TOKENS  # only the first call counted


def test_failing_hook_reraises_in_strict_mode() -> None:
    torch.manual_seed(0)
    model = Stack([DictMoE()])
    with _attach(model, routers=["layers.0.router"], extractor=_Flaky(fail_on={1}), num_experts=6, top_k=2):
        with pytest.raises(RuntimeError, match="boom from extractor"):
            model(_x(0))


def test_extractor_returning_the_wrong_type() -> None:
    torch.manual_seed(0)
    model = Stack([DictMoE()])
    with _attach(model, routers=["layers.0.router"], extractor=lambda m, a, o: o, num_experts=6, top_k=2):
        with pytest.raises(TypeError, match="not moewatch.RouterOutput"):
            model(_x(0))


# --- score function detection --------------------------------------------------------------------------


class SigmoidTopKRouter(FakeTopKRouter):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.reshape(-1, H), self.weight)
        weights, indices = torch.topk(logits.sigmoid(), self.top_k, dim=-1)
        return logits, weights, indices


def _with_bias(r: nn.Module) -> None:
    r.register_buffer("e_score_correction_bias", torch.zeros(r.num_experts))


def _with_attr(name: str, value: Any) -> Callable[[nn.Module], None]:
    return lambda r: setattr(r, name, value)


@pytest.mark.parametrize(
    ("router_cls", "setup", "expected"),
    [
        (FakeTopKRouter, lambda r: None, "softmax"),
        (FakeTopKRouter, _with_bias, "sigmoid"),
        (FakeTopKRouter, _with_attr("score_func", "sigmoid"), "sigmoid"),
        (FakeTopKRouter, _with_attr("scoring_function", nn.Sigmoid()), "sigmoid"),
        (FakeTopKRouter, _with_attr("score_func", "softmax"), "softmax"),
        (SigmoidTopKRouter, lambda r: None, "sigmoid"),
    ],
    ids=[
        "default",
        "correction-bias",
        "score_func-str",
        "activation-module",
        "softmax-str",
        "forward-uses-sigmoid",
    ],
)
def test_score_function_is_read_from_structure(
    router_cls: type, setup: Callable[[Any], None], expected: str
) -> None:
    block = FakeBlock()
    block.gate = router_cls()
    setup(block.gate)
    with _attach(Stack([block])) as watch:
        assert watch.routers[0].score_func == expected


# --- hot path ------------------------------------------------------------------------------------------


def test_sync_guard_catches_a_syncing_extractor(monkeypatch: pytest.MonkeyPatch) -> None:
    def syncing(module: nn.Module, args: tuple[Any, ...], out: Any) -> moewatch.RouterOutput:
        if out["choice"].max() > 99:  # a Python `if` on a device value
            pass
        return _extract(module, args, out)

    torch.manual_seed(0)
    model = Stack([DictMoE()])
    with no_host_sync_in_hooks(monkeypatch):
        watch = _attach(model, routers=["layers.0.router"], extractor=syncing, num_experts=6, top_k=2)
    with pytest.raises(AssertionError, match="__bool__"):
        model(_x(0))
    watch.close()
