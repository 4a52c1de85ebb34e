"""Router discovery and exact counting on real transformers 5.x MoE model classes built from tiny configs.

Every count is checked against an independent reference: a forward hook of the test's own on the same router
modules that records what the router returned, counted with ``torch.bincount``.

Legend: ``T`` tokens, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import transformers  # a test extra: missing it must fail, not skip
from frameworks.guards import no_host_sync_in_hooks
from torch import nn

import moewatch
from tests.fakes import quiet

VOCAB, BATCH, SEQ = 64, 2, 8
TOKENS = BATCH * SEQ
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    routers: list[str]
    num_experts: int
    top_k: int
    #: How the reference reads a router call: "indices" (logits, scores, indices), "llama4" (scores, logits),
    #: "logits" (DBRX: logits only), "switch" (one-hot, max prob, logits).
    output: str = "indices"
    score_func: str = "softmax"
    family: str = "transformers"
    encoder_decoder: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _causal(config_name: str, model_name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_name)(**{**_COMMON, **kw})
        return getattr(transformers, model_name)(config)

    return build


def _dbrx() -> nn.Module:
    config = transformers.DbrxConfig(
        d_model=32,
        n_heads=2,
        n_layers=2,
        max_seq_len=64,
        vocab_size=VOCAB,
        attn_config=dict(kv_n_heads=1, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2),
    )
    config.attn_config.rope_theta = 10000.0  # DbrxAttention reads it from attn_config (transformers 5.23)
    return transformers.DbrxForCausalLM(config)


def _switch() -> nn.Module:
    config = transformers.SwitchTransformersConfig(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        num_experts=4,
        expert_capacity=5,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
    )
    return transformers.SwitchTransformersForConditionalGeneration(config)


def _nllb() -> nn.Module:
    config = transformers.NllbMoeConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_experts=4,
        expert_capacity=6,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        max_position_embeddings=64,
    )
    return transformers.NllbMoeForConditionalGeneration(config)


def _names(fmt: str, n: int = 2) -> list[str]:
    return [fmt.format(i) for i in range(n)]


_DEEPSEEK = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    moe_intermediate_size=16,
    first_k_dense_replace=0,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    n_shared_experts=1,
)

CASES: dict[str, Case] = {
    "mixtral": Case(
        _causal("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
        _names("model.layers.{}.mlp.gate"),
        4,
        2,
    ),
    "qwen2_moe": Case(
        _causal(
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        ),
        _names("model.layers.{}.mlp.gate"),
        4,
        2,
    ),
    "qwen3_moe": Case(
        _causal(
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            head_dim=16,
        ),
        _names("model.layers.{}.mlp.gate"),
        4,
        2,
    ),
    "olmoe": Case(
        _causal("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2, eos_token_id=1),
        _names("model.layers.{}.mlp.gate"),
        4,
        2,
    ),
    "deepseek_v3": Case(
        _causal("DeepseekV3Config", "DeepseekV3ForCausalLM", **_DEEPSEEK),
        _names("model.layers.{}.mlp.gate"),
        8,
        2,
        score_func="sigmoid",
    ),
    "glm4_moe": Case(
        _causal(
            "Glm4MoeConfig",
            "Glm4MoeForCausalLM",
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            moe_intermediate_size=16,
            first_k_dense_replace=0,
            head_dim=16,
        ),
        _names("model.layers.{}.mlp.gate"),
        8,
        2,
        score_func="sigmoid",
    ),
    "gpt_oss": Case(
        _causal("GptOssConfig", "GptOssForCausalLM", num_local_experts=4, num_experts_per_tok=2, head_dim=16),
        _names("model.layers.{}.mlp.router"),
        4,
        2,
    ),
    "granitemoe": Case(
        _causal("GraniteMoeConfig", "GraniteMoeForCausalLM", num_local_experts=4, num_experts_per_tok=2),
        _names("model.layers.{}.block_sparse_moe.router"),
        4,
        2,
    ),
    "phimoe": Case(
        _causal("PhimoeConfig", "PhimoeForCausalLM", num_local_experts=4, num_experts_per_tok=2),
        _names("model.layers.{}.mlp.router"),
        4,
        2,
    ),
    "minimax": Case(
        _causal(
            "MiniMaxConfig", "MiniMaxForCausalLM", num_local_experts=4, num_experts_per_tok=2, head_dim=16
        ),
        _names("model.layers.{}.mlp.gate"),
        4,
        2,
    ),
    "jamba": Case(
        _causal(
            "JambaConfig",
            "JambaForCausalLM",
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
        ),
        _names("model.layers.{}.feed_forward.router"),
        4,
        2,
    ),
    "llama4": Case(
        _causal(
            "Llama4TextConfig",
            "Llama4ForCausalLM",
            num_local_experts=4,
            num_experts_per_tok=1,
            intermediate_size_mlp=32,
            head_dim=16,
        ),
        _names("model.layers.{}.feed_forward.router"),
        4,
        1,
        output="llama4",
        score_func="sigmoid",
    ),
    "dbrx": Case(_dbrx, _names("transformer.blocks.{}.ffn.router"), 4, 2, output="logits", family="logits"),
    "switch": Case(
        _switch,
        _names("encoder.block.{}.layer.1.mlp.router") + _names("decoder.block.{}.layer.2.mlp.router"),
        4,
        1,
        output="switch",
        family="switch",
        encoder_decoder=True,
    ),
    "gemma4": Case(
        _causal(
            "Gemma4TextConfig",
            "Gemma4ForCausalLM",
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=16,
            head_dim=16,
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
        ),
        _names("model.layers.{}.router"),
        4,
        2,
        output="probs",
    ),
    "afmoe": Case(
        _causal(
            "AfmoeConfig",
            "AfmoeForCausalLM",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            head_dim=16,
            num_dense_layers=0,
        ),
        _names("model.layers.{}.mlp.router"),
        4,
        2,
        score_func="sigmoid",
    ),
    "nllb_moe": Case(
        _nllb,
        _names("model.encoder.layers.{}.ffn.router") + _names("model.decoder.layers.{}.ffn.router"),
        4,
        2,
        output="nllb",
        family="nllb",
        encoder_decoder=True,
    ),
}

#: Families whose decoder layers support HF gradient checkpointing and stay cheap.
CHECKPOINTED = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "llama4", "dbrx", "phimoe"]



def _attach(model: nn.Module, **kw: Any) -> moewatch.Monitor:
    return moewatch.attach(model, **quiet(**{"window_steps": 1000, **kw}))


def _inputs(case: Case, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    if case.encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)}
    return {"input_ids": ids}


def _build(name: str) -> tuple[Case, nn.Module]:
    torch.manual_seed(0)
    case = CASES[name]
    return case, case.build().train()


def _chosen_TK(case: Case, out: Any) -> torch.Tensor:
    """The experts a router call chose, read from its output independently of moewatch."""
    if case.output in ("indices", "probs"):
        return out[2]
    if case.output == "llama4":
        return torch.topk(out[1], case.top_k, dim=-1).indices
    if case.output == "logits":
        return torch.topk(out, case.top_k, dim=-1).indices
    if case.output == "nllb":  # combine weights after capacity; the second expert may be sampled
        return out[1].nonzero()[:, 1]
    assert case.output == "switch"
    return out[2].argmax(dim=-1, keepdim=True)


def _logits_TE(case: Case, out: Any) -> torch.Tensor:
    return {
        "indices": lambda: out[0],
        "probs": lambda: out[0],  # Gemma4 returns probabilities, no logits
        "llama4": lambda: out[1],
        "logits": lambda: out,
        "switch": lambda: out[2],
        "nllb": lambda: out[2],
    }[case.output]()


class Reference:
    """Our own hooks on the router modules: per-router expert counts (``bincount``) and logits."""

    def __init__(self, case: Case, model: nn.Module) -> None:
        self.case = case
        self.counting = True
        self.counts = [torch.zeros(case.num_experts, dtype=torch.int64) for _ in case.routers]
        self.logits: list[list[torch.Tensor]] = [[] for _ in case.routers]
        self.skipped_calls = 0
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(i)) for i, n in enumerate(case.routers)]

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self.counting:
                self.skipped_calls += 1
                return
            with torch.no_grad():  # saving nothing for backward keeps non-reentrant recomputation consistent
                chosen = _chosen_TK(self.case, out).reshape(-1)
                logits = _logits_TE(self.case, out).detach().float()
            self.counts[i] += torch.bincount(chosen, minlength=self.case.num_experts)
            self.logits[i].append(logits.reshape(-1, self.case.num_experts))

        return hook

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def loads(self) -> list[list[int]]:
        return [c.tolist() for c in self.counts]


def _loss(out: Any) -> torch.Tensor:
    return out.logits.float().pow(2).mean()


# --- discovery ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_discovers_every_router(name: str) -> None:
    case, model = _build(name)
    with _attach(model) as watch:
        found = [(r.module, r.family, r.num_experts, r.top_k, r.score_func) for r in watch.routers]
    expected = [(n, case.family, case.num_experts, case.top_k, case.score_func) for n in case.routers]
    assert found == expected
    assert [r.index for r in watch.routers] == list(range(len(case.routers)))


def test_qwen2_moe_shared_expert_gate_is_not_a_router() -> None:
    _, model = _build("qwen2_moe")
    gates = [n for n, m in model.named_modules() if n.endswith("shared_expert_gate")]
    assert len(gates) == 2 and all(isinstance(dict(model.named_modules())[g], nn.Linear) for g in gates)
    with _attach(model) as watch:
        assert not any("shared_expert" in r.module for r in watch.routers)
    # top_k=1 fits a 1-output Linear, so only recognising it as no router can refuse it.
    with pytest.raises(
        ValueError, match="shared_expert_gate' matched `routers` but is an nn.Linear with 1 output"
    ):
        _attach(model, routers=["*gate"], top_k=1)


# --- exact counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_counts_match_router_outputs_exactly(name: str) -> None:
    case, model = _build(name)
    ref = Reference(case, model)
    watch = _attach(model)
    for seed in range(3):
        model(**_inputs(case, seed))
    report = watch.flush()
    watch.close()
    ref.remove()
    assert [layer.loads for layer in report.layers] == ref.loads()
    for layer in report.layers:
        assert layer.tokens == 3 * TOKENS
        if case.output != "nllb":  # NLLB-MoE reports assignments after capacity
            assert layer.assignments == 3 * TOKENS * case.top_k
        assert layer.invalid_ids == 0 and layer.nonfinite == 0


@pytest.mark.parametrize("name", list(CASES))
def test_hooks_never_synchronise_with_the_device(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case, model = _build(name)
    with no_host_sync_in_hooks(monkeypatch):
        watch = _attach(model)
    model(**_inputs(case, 0))
    report = watch.flush()
    watch.close()
    assert all(layer.tokens == TOKENS for layer in report.layers)


def test_switch_reports_capacity_drops() -> None:
    case, model = _build("switch")
    dropped = [0] * len(case.routers)
    modules = dict(model.named_modules())

    def record(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            dropped[i] += TOKENS - int(out[0].sum())

        return hook

    handles = [modules[n].register_forward_hook(record(i)) for i, n in enumerate(case.routers)]
    with _attach(model) as watch:
        model(**_inputs(case, 0))
        report = watch.flush()
    for h in handles:
        h.remove()
    assert any(dropped), "expert_capacity=5 must drop tokens for this test to mean anything"
    for layer, d in zip(report.layers, dropped, strict=True):
        expected = pytest.approx(d / TOKENS) if d else None
        assert layer.dropped_ratio == expected


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "llama4", "switch"])
def test_eval_mode_is_not_counted(name: str) -> None:
    case, model = _build(name)
    ref = Reference(case, model)
    with _attach(model) as watch:
        model.eval()
        with torch.no_grad():
            model(**_inputs(case, 0))
        assert sum(sum(c) for c in ref.loads()) > 0  # the routers did run
        report = watch.flush()
    ref.remove()
    assert report is None  # nothing was counted, so flush() made no window (it would hold the eval tokens)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("name", CHECKPOINTED)
@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_counts_once(name: str, reentrant: bool) -> None:
    case, model = _build(name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ref = Reference(case, model)
    watch = _attach(model)
    for seed in range(2):
        loss = _loss(model(**_inputs(case, seed)))
        with ref.paused():  # the recomputation inside backward calls the routers again
            loss.backward()
    report = watch.flush()
    watch.close()
    ref.remove()
    assert ref.skipped_calls == 2 * len(case.routers), "checkpointing did not recompute the routers"
    assert [layer.loads for layer in report.layers] == ref.loads()
    assert all(layer.tokens == 2 * TOKENS for layer in report.layers)


@pytest.mark.parametrize("name", ["mixtral", "phimoe", "switch"])
def test_gradient_accumulation_counts_every_micro_batch(name: str) -> None:
    case, model = _build(name)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ref = Reference(case, model)
    watch = _attach(model, optimizer=opt, window_steps=1)
    for micro in range(4):
        _loss(model(**_inputs(case, micro))).backward()
    assert watch.latest is None
    opt.step()
    report = watch.latest
    watch.close()
    ref.remove()
    assert report is not None and report.step_end == 1
    assert [layer.loads for layer in report.layers] == ref.loads()
    assert all(layer.tokens == 4 * TOKENS for layer in report.layers)


def test_afmoe_counts_the_biased_choice_not_the_top_k_of_logits() -> None:
    case, model = _build("afmoe")
    for layer in model.model.layers:
        layer.mlp.expert_bias[1] = 10.0  # aux-loss-free balancing bias: steers selection, not the logits
    ref = Reference(case, model)
    with _attach(model) as watch:
        model(**_inputs(case, 0))
        report = watch.flush()
    ref.remove()
    assert [layer.loads for layer in report.layers] == ref.loads()
    assert all(layer.loads[1] == TOKENS for layer in report.layers)


# --- probabilities ------------------------------------------------------------------------------------


def _norm_entropy(probs_TE: torch.Tensor) -> float:
    p = probs_TE.double().mean(dim=0)
    return float(-(p * p.log()).sum() / math.log(p.numel()))


@pytest.mark.parametrize(
    "name", ["mixtral", "gpt_oss", "deepseek_v3", "glm4_moe", "llama4", "dbrx", "gemma4"]
)
def test_norm_entropy_from_router_probabilities(name: str) -> None:
    case, model = _build(name)
    ref = Reference(case, model)
    with _attach(model) as watch:
        for seed in range(2):
            model(**_inputs(case, seed))
        report = watch.flush()
    ref.remove()
    for i, layer in enumerate(report.layers):
        logits_TE = torch.cat(ref.logits[i]).double()
        assert layer.entropy_source == "probs"
        if case.output == "probs":
            assert layer.norm_entropy == pytest.approx(_norm_entropy(logits_TE), abs=2e-6)
            assert layer.z_loss is None
            continue
        if case.score_func == "sigmoid":
            scores = logits_TE.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            probs = logits_TE.softmax(dim=-1)
        assert layer.norm_entropy == pytest.approx(_norm_entropy(probs), abs=2e-6)
        z = torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
        assert layer.z_loss == pytest.approx(float(z), rel=1e-5)
    # The loads-based fallback would give another value: the check above really used the probabilities.
    loads = torch.tensor([report.layers[0].loads], dtype=torch.float64)
    assert report.layers[0].norm_entropy != pytest.approx(_norm_entropy(loads / loads.sum()), abs=1e-4)


# --- detaching ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "llama4", "dbrx", "switch"])
def test_close_removes_every_hook_and_leaves_outputs_unchanged(name: str) -> None:
    case, model = _build(name)
    inputs = _inputs(case, 0)
    hooks_before = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    torch.manual_seed(1)
    before = model(**inputs).logits.detach()
    watch = _attach(model)
    torch.manual_seed(1)
    during = model(**inputs).logits.detach()
    assert sum(watch.flush().layers[0].loads) > 0
    watch.close()
    torch.manual_seed(1)
    after = model(**inputs).logits.detach()
    assert torch.equal(before, during) and torch.equal(before, after)
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == hooks_before
    assert all(not m._forward_hooks for m in model.modules())
