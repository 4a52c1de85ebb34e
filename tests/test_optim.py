"""attach(optimizer=...) finds the real torch optimizer behind framework wrappers, or says what to pass."""

import pytest
import torch

import moewatch
from moewatch.optim import unwrap_optimizer
from tests.fakes import ToyMoE, quiet, tokens_for

A = [[0, 1], [1, 2], [2, 3]]


class ZeroStyleWrapper:
    """Shape of DeepSpeed's ZeRO / fp16 optimizer wrappers: not a torch Optimizer, inner one at .optimizer."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


class EngineStyle:
    """DeepSpeed's engine exposes its (possibly ZeRO-wrapped) optimizer as .optimizer."""

    def __init__(self, optimizer):
        self.optimizer = ZeroStyleWrapper(optimizer)

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad()


def _run(model, opt, steps):
    for _ in range(steps):
        model(tokens_for(A)).sum().backward()
        opt.step()
        opt.zero_grad()


def test_accelerate_optimizer_is_unwrapped_and_counts_steps():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    model = ToyMoE()
    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    model, wrapped = Accelerator(cpu=True).prepare(model, inner)
    assert isinstance(wrapped, AcceleratedOptimizer)
    assert unwrap_optimizer(wrapped) is inner
    with moewatch.attach(model, optimizer=wrapped, **quiet(window_steps=2)) as watch:
        _run(model, wrapped, 3)
        assert watch.step_count == 3


def test_zero_and_engine_style_wrappers_are_unwrapped():
    model = ToyMoE()
    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = EngineStyle(inner)
    assert unwrap_optimizer(engine) is inner
    with moewatch.attach(model, optimizer=engine, **quiet(window_steps=2)) as watch:
        _run(model, engine, 4)
        assert watch.step_count == 4


def test_plain_optimizer_is_itself():
    opt = torch.optim.SGD(ToyMoE().parameters(), lr=0.1)
    assert unwrap_optimizer(opt) is opt


def test_unknown_wrapper_names_the_wrapper_and_the_fix():
    class Mystery:
        def step(self):
            pass

    model = ToyMoE()
    with pytest.raises(ValueError, match=r"optimizer=Mystery .*watch\.step\(\)"):
        moewatch.attach(model, optimizer=Mystery(), **quiet())
    # the failed attach left no hooks behind: attaching again works
    moewatch.attach(model, **quiet()).close()


def test_wrapper_around_a_non_optimizer_names_the_chain():
    class Outer:
        def __init__(self):
            self.optimizer = object()

    with pytest.raises(ValueError, match="optimizer=Outer"):
        unwrap_optimizer(Outer())


def test_lightning_optimizer_is_unwrapped():
    from pytorch_lightning.core.optimizer import LightningOptimizer

    opt = torch.optim.SGD(ToyMoE().parameters(), lr=0.1)
    assert unwrap_optimizer(LightningOptimizer(opt)) is opt
