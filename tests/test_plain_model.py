"""A watched model is still a plain model (issue 28): deep copies and pickles carry no moewatch hook and count
nothing into the original, ``close()`` leaves nothing on any copy, and attaching next to a compiled model
leaves that model's compiled frames alone."""

from __future__ import annotations

import copy
import io
import logging
import pickle

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import MixtralConfig, MixtralForCausalLM

import moewatch
from moewatch.plain import HOOK_MARK
from tests.ci import require_module
from tests.fakes import quiet

X = torch.arange(16).reshape(2, 8) % 64  # 16 tokens per forward


def _mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
    )
    return MixtralForCausalLM(cfg).train()


def _moewatch_leftovers(model: torch.nn.Module) -> list[str]:
    """Every trace of moewatch on the modules: marked hooks and moewatch.plain's instance attributes."""
    found = []
    for name, m in model.named_modules():
        for d in (m._forward_hooks, m._forward_pre_hooks):
            found += [f"{name}: hook" for h in d.values() if getattr(h, HOOK_MARK, False)]
        found += [f"{name}: {k}" for k in ("__reduce_ex__", "forward", "_moewatch_forward") if k in m.__dict__]
    return found


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_deep_copy_is_an_unwatched_plain_model(with_optimizer):
    policy = _mixtral()
    opt = torch.optim.SGD(policy.parameters(), lr=0.0) if with_optimizer else None
    watch = moewatch.attach(policy, optimizer=opt, **quiet(window_steps=100))
    try:
        ref = copy.deepcopy(policy)  # TRL's create_reference_model does exactly this
        assert _moewatch_leftovers(ref) == []
        policy(X)
        ref(X)
        ref(X)
        opt.step() if opt is not None else watch.step()
        report = watch.flush()
        assert [layer.tokens for layer in report.layers] == [16, 16]  # the policy's one forward, not 48
        # a second monitor on the copy works and counts only the copy
        with moewatch.attach(ref, **quiet(window_steps=100)) as ref_watch:
            ref(X)
            ref_watch.step()
            assert [layer.tokens for layer in ref_watch.flush().layers] == [16, 16]
        assert _moewatch_leftovers(ref) == []
        # a copy's own hooks (another library's) survive the copy
        gate = policy.model.layers[0].mlp.gate
        gate.register_forward_hook(lambda *a: None)
        assert len(copy.deepcopy(policy).model.layers[0].mlp.gate._forward_hooks) == 1
    finally:
        watch.close()
    assert _moewatch_leftovers(policy) == [] and _moewatch_leftovers(ref) == []


def test_trl_create_reference_model_is_an_unwatched_plain_model():
    """TRL's own reference-model factory (a deep copy, parameters frozen, eval mode) on a watched policy."""
    trl = require_module("trl", "install the test extras: pip install -e '.[test]'")
    policy = _mixtral()
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    with moewatch.attach(policy, optimizer=opt, **quiet(window_steps=100, count_eval=True)) as watch:
        ref = trl.create_reference_model(policy)
        assert ref is not policy and _moewatch_leftovers(ref) == []
        assert not any(p.requires_grad for p in ref.parameters())
        policy(X)
        with torch.no_grad():
            ref(X)  # eval mode, and count_eval=True: a reference forward would be counted if it were hooked
        opt.step()
        assert [layer.tokens for layer in watch.flush().layers] == [16, 16]
    assert _moewatch_leftovers(ref) == []


def test_torch_save_and_pickle_round_trip_to_a_plain_model():
    model = _mixtral()
    watch = moewatch.attach(model, **quiet(window_steps=100))  # no optimizer: the root pre-hook too
    try:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        unpickled = pickle.loads(pickle.dumps(model))
        for m in (loaded, unpickled):
            assert _moewatch_leftovers(m) == []
            torch.testing.assert_close(m(X).logits, model(X).logits)
        watch.step()
        # the two forwards of model above (16 tokens each); the loaded copies counted nothing
        assert [layer.tokens for layer in watch.flush().layers] == [32, 32]
    finally:
        watch.close()


def test_shallow_copy_does_not_share_moewatch_hooks():
    model = _mixtral()
    with moewatch.attach(model, **quiet(window_steps=100)) as watch:
        gate_copy = copy.copy(model.model.layers[0].mlp.gate)
        assert _moewatch_leftovers(gate_copy) == [] and len(gate_copy._forward_hooks) == 0
        assert watch.routers[0].module == "model.layers.0.mlp.gate"


def test_attach_next_to_a_compiled_model_keeps_its_frames(caplog):
    """The cached frames of a compiled Mixtral are guarded on the classes, not the instance: a fresh Mixtral
    compiled after attach used to reuse them and count nothing, and attach used to reset every cache."""
    torch._dynamo.reset()
    counters.clear()
    compiled_a = torch.compile(_mixtral(), backend="eager")
    compiled_a(X)
    assert counters["stats"]["unique_graphs"] == 1
    b = _mixtral()
    with caplog.at_level(logging.INFO, logger="moewatch"):
        watch = moewatch.attach(b, **quiet(window_steps=100))
    try:
        assert "torch.compiler.reset()" not in caplog.text and "Nothing is reset" in caplog.text
        compiled_a(X)
        assert counters["stats"]["unique_graphs"] == 1  # a: no recompile
        compiled_b = torch.compile(b, backend="eager")
        compiled_b(X)
        assert counters["stats"]["unique_graphs"] == 2  # b: one graph of its own, with the hooks
        compiled_a(X)
        compiled_b(X)
        assert counters["stats"]["unique_graphs"] == 2
        watch.step()
        assert [layer.tokens for layer in watch.flush().layers] == [32, 32]  # b's two forwards, exactly
    finally:
        watch.close()
    compiled_b(X)  # closed: the hookless frame serves b again, no new graph
    assert counters["stats"]["unique_graphs"] == 2
    assert _moewatch_leftovers(b) == []
