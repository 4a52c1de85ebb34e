"""torch.compile: moewatch attached before compiling traces into the graph (no graph break, no recompile),
and the compiled statistics equal eager ones: counts exactly, probability statistics within float tolerance.

Unit tests use dynamo's ``aot_eager`` backend (dynamo + AOTAutograd, where the graph is built and
functionalised; inductor only generates kernels from it) to stay fast on a 2-core CPU; one test runs
inductor end to end on the demo model."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import MixtralConfig, MixtralForCausalLM

import moewatch
from moewatch.demo.model import DemoMoE
from tests.fakes import quiet

TINY_MIXTRAL = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
)


def _mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**TINY_MIXTRAL)).train()


def _mixtral_step(model: torch.nn.Module, g: torch.Generator) -> None:
    x = torch.randint(0, 128, (2, 16), generator=g)
    model(input_ids=x, labels=x).loss.backward()


def _demo() -> DemoMoE:
    torch.manual_seed(0)
    return DemoMoE(dim=32, num_experts=8, top_k=2, layers=2, hidden=64).train()


def _demo_step(model: torch.nn.Module, g: torch.Generator) -> None:
    x = torch.randn(64, 32, generator=g)
    model(x).square().mean().backward()


def _train(build, step, *, compile_backend=None, attach=True, steps=6, window=2, fullgraph=False, **overrides):
    """Train ``steps`` optimizer steps; returns (reports, frames compiled, graph breaks)."""
    torch._dynamo.reset()
    counters.clear()
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = moewatch.attach(model, optimizer=opt, **quiet(window_steps=window, **overrides)) if attach else None
    cc = None
    run = model
    if compile_backend is not None:
        cc = CompileCounterWithBackend(compile_backend)
        run = torch.compile(model, backend=cc, fullgraph=fullgraph)
    g = torch.Generator().manual_seed(1)
    reports = []
    for _ in range(steps):
        step(run, g)
        opt.step()
        opt.zero_grad()
        if watch is not None and watch.latest is not None and (not reports or reports[-1] is not watch.latest):
            reports.append(watch.latest)
    if watch is not None:
        watch.close()
    breaks = sum(counters["graph_break"].values())
    return reports, (cc.frame_count if cc else 0), breaks


def _assert_same_windows(eager, compiled):
    assert len(eager) == len(compiled) == 3
    for re, rc in zip(eager, compiled, strict=True):
        for le, lc in zip(re.layers, rc.layers, strict=True):
            assert lc.module == le.module
            assert lc.loads == le.loads and lc.tokens == le.tokens  # exact
            assert lc.nonfinite == le.nonfinite == 0
            assert lc.z_loss == pytest.approx(le.z_loss, rel=1e-5)
            assert lc.norm_entropy == pytest.approx(le.norm_entropy, abs=1e-6)


@pytest.mark.parametrize("probs_every", [1, 3])
def test_compiled_mixtral_equals_eager(probs_every):
    # Before: 64 non-finite rows in layer 0 and z_loss None in layer 1 (a false `nonfinite` page): the
    # per-layer views of one stats buffer reached the graph as aliased inputs and updates were lost.
    eager, _, _ = _train(_mixtral, _mixtral_step, probs_every=probs_every)
    compiled, _, _ = _train(_mixtral, _mixtral_step, compile_backend="aot_eager", probs_every=probs_every)
    _assert_same_windows(eager, compiled)


@pytest.mark.parametrize("build,step", [(_mixtral, _mixtral_step), (_demo, _demo_step)], ids=["mixtral", "demo"])
def test_no_graph_break_or_recompile_added(build, step):
    _, frames_plain, breaks_plain = _train(build, step, compile_backend="aot_eager", attach=False)
    _, frames_watched, breaks_watched = _train(build, step, compile_backend="aot_eager", probs_every=2)
    # frame_count counts every graph compiled: a recompile or a graph break adds one.
    assert (frames_watched, breaks_watched) == (frames_plain, breaks_plain)


def test_demo_fullgraph_with_moewatch():
    eager, _, _ = _train(_demo, _demo_step)
    compiled, frames, breaks = _train(_demo, _demo_step, compile_backend="aot_eager", fullgraph=True)
    assert (frames, breaks) == (1, 0)
    _assert_same_windows(eager, compiled)


def test_demo_inductor_equals_eager():
    eager, _, _ = _train(_demo, _demo_step)
    compiled, _, _ = _train(_demo, _demo_step, compile_backend="inductor")
    _assert_same_windows(eager, compiled)


def test_attach_after_compile_names_modules_as_in_eager():
    torch._dynamo.reset()
    model = _demo()
    compiled = torch.compile(model, backend="aot_eager")
    eager_names = [r.module for r in moewatch.attach(_demo(), **quiet()).routers]
    watch = moewatch.attach(compiled, **quiet())
    try:
        assert [r.module for r in watch.routers] == eager_names
        assert not any("_orig_mod" in n for n in eager_names)
        g = torch.Generator().manual_seed(1)
        _demo_step(compiled, g)
        watch.step()
        report = watch.flush()
        assert [layer.tokens for layer in report.layers] == [64, 64]
    finally:
        watch.close()


def test_compiled_without_step_source_warns(caplog):
    torch._dynamo.reset()
    model = _demo()
    watch = moewatch.attach(model, **quiet())  # no optimizer=, no watch.step()
    compiled = torch.compile(model, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        _demo_step(compiled, g)
    with caplog.at_level(logging.WARNING, logger="moewatch"):
        watch.close()
    assert "torch.compile" in caplog.text and "optimizer=" in caplog.text
    assert watch.latest is not None and [layer.tokens for layer in watch.latest.layers] == [128, 128]


def _eager_tokens(steps: int) -> list[int]:
    return [64 * steps, 64 * steps]


@pytest.mark.parametrize("how", ["torch.compile(model)", "block.compile()"])
def test_attach_after_the_compiled_model_ran_counts_every_call(how, caplog):
    """Dynamo does not guard on hooks added after its first call (skip_nnmodule_hook_guards): without
    moewatch.plain's instance forward, the compiled graphs run on and the monitor counts 0 tokens. Nothing
    is reset: only this model's frames recompile."""
    torch._dynamo.reset()
    model = _demo()
    if how == "block.compile()":
        for layer in model.layers:
            layer.compile(backend="aot_eager")
        run = model
    else:
        run = torch.compile(model, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    _demo_step(run, g)  # compiled and run before attach
    with caplog.at_level(logging.INFO, logger="moewatch"):
        watch = moewatch.attach(run, **quiet())
    try:
        for _ in range(2):
            _demo_step(run, g)
            watch.step()
        report = watch.flush()
        assert [layer.tokens for layer in report.layers] == _eager_tokens(2)
        assert sum(report.layers[0].loads) == 2 * 64 * 2
        assert "recompiles once, for this model only" in caplog.text and "DemoMoE" in caplog.text
        assert "torch.compiler.reset()" not in caplog.text
    finally:
        watch.close()


def test_attach_to_a_compiled_model_that_has_not_run_resets_nothing(caplog):
    torch._dynamo.reset()
    compiled = torch.compile(_demo(), backend="aot_eager")
    with caplog.at_level(logging.WARNING, logger="moewatch"):
        watch = moewatch.attach(compiled, **quiet())
    watch.close()
    assert "torch.compiler.reset()" not in caplog.text


def test_window_with_no_router_call_warns_once(caplog):
    """The second line of defence, for what attach cannot see (e.g. a compiled training-step function):
    training steps whose windows hold no router call are named once."""
    model = _demo()
    watch = moewatch.attach(model, **quiet(window_steps=1))
    with caplog.at_level(logging.WARNING, logger="moewatch"):
        for _ in range(3):
            watch.step()  # steps with no forward: the hooks never run
    watch.close()
    assert caplog.text.count("counted no router call") == 1
    assert "torch.compiler.reset()" in caplog.text
