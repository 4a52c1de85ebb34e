"""Zero host synchronisation on training steps that do not end a window.

Two independent checks, both on the CPU (no GPU needed):

* every aten op is recorded with a ``TorchDispatchMode``; ops that synchronise a CUDA device with the host
  (``.item()``, ``nonzero``, ``bincount``, ``unique``, boolean-mask indexing, copies to the CPU, ...) are
  attributed to moewatch when a moewatch frame (outside the demo model) is on the Python stack;
* the same steps run with the model on the ``meta`` device, where anything that reads a value on the host
  (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, a Python ``if`` on a tensor) raises.

The last tests break the hot path on purpose and check that the detectors see it.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import moewatch
from moewatch.accumulator import Accumulator
from moewatch.adapters.base import RouterOutput
from moewatch.demo.model import DemoMoE
from tests.fakes import quiet

aten = torch.ops.aten
_PKG = str(Path(moewatch.__file__).parent) + "/"
_DEMO = _PKG + "demo/"

#: Ops that make the host wait for the device on CUDA, whatever their arguments.
ALWAYS_SYNC = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t), if t:
    aten.nonzero.default,
    aten.argwhere.default,
    aten.bincount.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.allclose.default,
}


def _is_sync(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if func in ALWAYS_SYNC:
        return True
    name = func.overloadpacket.__name__
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and not (len(args) > 2 and args[2] is not None)
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # boolean masks run nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ())
    if name == "histc":  # min == max: the range is read from the data
        lo = args[3] if len(args) > 3 else kwargs.get("min", 0)
        hi = args[4] if len(args) > 4 else kwargs.get("max", 0)
        return lo == hi
    if name in ("_to_copy", "to", "copy_"):
        src = args[1] if name == "copy_" else args[0]
        dst_dev = args[0].device if name == "copy_" else kwargs.get("device")
        return isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and (
            dst_dev is not None and torch.device(dst_dev).type == "cpu"
        )
    return False


def _moewatch_frame() -> str | None:
    """``file:line`` of the innermost moewatch frame on the stack (the demo model is not moewatch)."""
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if fn.startswith(_PKG) and not fn.startswith(_DEMO):
            return f"{fn[len(_PKG):]}:{f.f_lineno}"
        f = f.f_back
    return None


class OpRecorder(TorchDispatchMode):
    """Records every aten op: syncing ones (all, and moewatch's), and all of moewatch's."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()
        self.moewatch_syncs: list[tuple[str, str]] = []
        self.moewatch_ops: list[str] = []  # every op issued from moewatch code, views included

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        where = _moewatch_frame()
        if where is not None:
            self.moewatch_ops.append(str(func.overloadpacket.__name__) + ("" if not func.is_view else "(view)"))
        if _is_sync(func, args, kwargs):
            self.syncs[str(func)] += 1
            if where is not None:
                self.moewatch_syncs.append((str(func), where))
        return func(*args, **kwargs)

    def kernels(self) -> list[str]:
        return [op for op in self.moewatch_ops if not op.endswith("(view)")]


# --- models ---------------------------------------------------------------------------------------------------


def _demo_steps(device: str = "cpu", backend: Any = None) -> tuple[nn.Module, Callable[[], None]]:
    """The model and one forward/backward; with ``backend`` the step runs ``torch.compile(model)`` (compiled at
    its first call, so attach in between is attach-before-compile)."""
    torch.manual_seed(0)
    model = DemoMoE().to(device).train()
    run = model if backend is None else torch.compile(model, backend=backend)
    x = torch.randn(64, 64, device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        run(x).square().mean().backward()

    return model, step


def _qwen3_steps(device: str = "cpu", backend: Any = None) -> tuple[nn.Module, Callable[[], None]]:
    import transformers  # a test extra: missing it must fail, not skip
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).to(device).train()
    run = model if backend is None else torch.compile(model, backend=backend)
    ids = torch.randint(0, 64, (2, 8), device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        run(input_ids=ids, labels=ids).loss.backward()

    return model, step


MODELS = {"demo": _demo_steps, "qwen3_moe": _qwen3_steps}
TOKENS_PER_STEP = {"demo": 64, "qwen3_moe": 16}


def _record(step: Callable[[], None], n: int) -> OpRecorder:
    rec = OpRecorder()
    with rec:
        for _ in range(n):
            step()
    return rec


# --- the checks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_sync_ops_from_moewatch_on_steps_that_do_not_end_a_window(name: str) -> None:
    model, step = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step()  # first calls allocate moewatch's buffers; allocation is not a sync, but keep the steps alike
    plain = _record(lambda: (step(), opt.step()), 3)
    watch = moewatch.attach(model, optimizer=opt, **quiet(window_steps=1000))
    try:
        monitored = _record(lambda: (step(), opt.step()), 3)
        assert watch.step_count == 3 and sum(watch._acc.tokens_L) > 0  # the hooks did run
    finally:
        watch.close()
    assert monitored.moewatch_syncs == [], f"moewatch synchronises on the hot path: {monitored.moewatch_syncs}"
    assert monitored.syncs == plain.syncs  # whatever the model itself syncs, moewatch adds nothing
    assert monitored.moewatch_ops, "no op was attributed to moewatch: the recorder is not looking"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_steps_inside_capture_routes_do_not_sync(name: str) -> None:
    model, step = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step()
    plain = _record(lambda: (step(), opt.step()), 3)
    watch = moewatch.attach(model, optimizer=opt, **quiet(window_steps=1000))
    try:
        with watch.capture_routes() as cap:
            monitored = _record(lambda: (step(), opt.step()), 3)
        assert cap.num_tokens == 3 * TOKENS_PER_STEP[name]  # the capture did record
    finally:
        watch.close()
    assert monitored.moewatch_syncs == [], f"capture_routes synchronises: {monitored.moewatch_syncs}"
    assert monitored.syncs == plain.syncs
    assert "copy_" in monitored.kernels()  # the recorder saw the capture's writes


def test_capture_runs_on_the_meta_device() -> None:
    model, step = _demo_steps("meta")
    watch = moewatch.attach(model, **quiet(window_steps=1000))
    try:
        with watch.capture_routes(max_tokens=256) as cap:
            for _ in range(3):
                step()
                watch.step()
        assert watch.hook_errors == 0 and cap.error is None
        assert cap.tokens_L == [3 * 64, 3 * 64] and cap.routes.device.type == "meta"
    finally:
        watch._closed = True  # a window end copies to the host, which meta cannot; that is not the hot path
        watch._remove_hooks()


@pytest.mark.parametrize("case", ["indices", "routing map+probs", "routing map", "choice_fn"])
def test_every_capture_choice_path_is_sync_free(case: str) -> None:
    from moewatch.capture import choice_ids

    def out(device: str) -> RouterOutput:
        map_TE = torch.randn(16, 8, device=device) > 0
        return {
            "indices": RouterOutput(indices_TK=torch.randint(0, 8, (16, 2), device=device)),
            "routing map+probs": RouterOutput(routing_map_TE=map_TE, probs_TE=torch.rand(16, 8, device=device)),
            "routing map": RouterOutput(routing_map_TE=map_TE),
            "choice_fn": RouterOutput(counts_E=torch.ones(8, device=device), num_tokens=16,
                                      choice_fn=lambda: torch.zeros(16, 2, dtype=torch.long, device=device)),
        }[case]

    assert choice_ids(out("meta"), 8, 2).shape == (16, 2)  # raises if anything reads a value on the host
    rec = _record(lambda: choice_ids(out("cpu"), 8, 2), 1)
    assert rec.moewatch_syncs == []


def test_monitored_steps_run_on_the_meta_device() -> None:
    model, step = _demo_steps("meta")
    watch = moewatch.attach(model, **quiet(window_steps=1000))
    try:
        for _ in range(3):
            step()
            watch.step()
        assert watch.hook_errors == 0
        assert watch._acc.devices == [torch.device("meta")]
        assert watch._acc.tokens_L == [3 * 64, 3 * 64]
    finally:
        watch._closed = True  # a window end copies to the host, which meta cannot; that is not the hot path
        watch._remove_hooks()


def _outputs(device: str, e: int = 8, t: int = 16, k: int = 2) -> dict[str, RouterOutput]:
    def r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, device=device).to(dtype)

    idx = torch.randint(-1, e + 1, (t, k), device=device)
    return {
        "indices+softmax logits": RouterOutput(indices_TK=idx, logits_TE=r(t, e)),
        "indices+logits E>=16": RouterOutput(indices_TK=torch.randint(0, 32, (t, k), device=device),
                                             logits_TE=r(t, 32)),
        "int32 indices+bf16 3-D logits": RouterOutput(
            indices_TK=idx.int(), logits_TE=r(2, t // 2, e, dtype=torch.bfloat16)
        ),
        "sigmoid logits": RouterOutput(indices_TK=idx, logits_TE=r(t, e), score_func="sigmoid"),
        "probs": RouterOutput(indices_TK=idx, probs_TE=r(t, e).softmax(-1)),
        "routing map+probs": RouterOutput(routing_map_TE=r(t, e) > 0, probs_TE=r(t, e).softmax(-1)),
        "counts+dropped": RouterOutput(
            counts_E=torch.randint(0, 5, (e,), device=device), num_tokens=t,
            dropped=torch.tensor(3, device=device),
        ),
    }


@pytest.mark.parametrize("case", sorted(_outputs("cpu")))
def test_every_update_path_is_sync_free(case: str) -> None:
    e = 32 if "E>=16" in case else 8
    acc = Accumulator([e, e])
    with torch.no_grad():
        acc.update(0, _outputs("meta")[case], 2)  # raises if anything reads a value on the host
        rec = _record(lambda: acc.update(1, _outputs("cpu")[case], 2), 1)
    assert [s for s, _ in rec.moewatch_syncs] == []


@pytest.mark.parametrize("tokens,experts", [(64, 8), (4096, 64)])
def test_kernels_per_router_call(tokens: int, experts: int) -> None:
    """The budget of device kernels one router call launches (indices + softmax logits, the common case):
    2 to count on every call (3 on the CPU from 2048 ids on, where bucketize is slow), 11 more on the calls
    that sample the probability statistics (9 on the CPU with fewer than 16 experts)."""
    acc = Accumulator([experts], probs_every=2)
    out = RouterOutput(indices_TK=torch.randint(0, experts, (tokens, 2)), logits_TE=torch.randn(tokens, experts))
    kernels = []
    with torch.no_grad():
        acc.update(0, out, 2)
        acc.update(0, out, 2)
        for _ in range(2):  # a sampled call, then a count-only one
            rec = OpRecorder()
            with rec:
                acc.update(0, out, 2)
            kernels.append(rec.kernels())
    count = ["bucketize", "index_add_"] if tokens * 2 < 2048 else ["add", "clamp_", "index_add_"]
    assert kernels[1] == count
    assert kernels[0][: len(count)] == count
    if experts < 16:
        # CPU, E < 16: softmax, amax, amax, log, ceil_, sub_, square_ (pow_) into the kept workspace, one nansum and
        # one add_ for all the statistics columns. Before: 11.
        assert kernels[0][len(count) :] == ["softmax", "amax", "amax", "log", "ceil_", "sub_", "pow_",
                                            "nansum", "add_"], kernels[0]
    else:
        # softmax, nansum, add_ (probability sums); amax, amax, log_, sub (logsumexp); mul, addcmul, nansum, add_
        # (z-loss and finite rows together). Before: 13, earlier 14, 17 + composites.
        assert len(kernels[0]) <= len(count) + 11, kernels[0]


# --- the detectors detect -------------------------------------------------------------------------------------


@contextmanager
def _broken_update(bad: Callable[[RouterOutput], Any]) -> Iterator[None]:
    """Adds ``bad(out)`` after moewatch's count of every router call: the eager hooks' bound updaters and the
    traced ``update``."""
    orig_update, orig_updater = Accumulator.update, Accumulator.updater

    def update(self: Accumulator, layer: int, out: RouterOutput, top_k: int) -> None:
        orig_update(self, layer, out, top_k)
        bad(out)

    def updater(self: Accumulator, layer: int, top_k: int) -> Callable[[RouterOutput], None]:
        count = orig_updater(self, layer, top_k)

        def broken(out: RouterOutput) -> None:
            count(out)
            bad(out)

        return broken

    Accumulator.update = update  # type: ignore[method-assign]
    Accumulator.updater = updater  # type: ignore[method-assign]
    try:
        yield
    finally:
        Accumulator.update, Accumulator.updater = orig_update, orig_updater  # type: ignore[method-assign]


BREAKS: dict[str, Callable[[RouterOutput], Any]] = {
    "item": lambda out: out.indices_TK.max().item(),
    "bincount": lambda out: torch.bincount(out.indices_TK.reshape(-1)),
    "nonzero": lambda out: (out.indices_TK == 0).nonzero(),
    "bool mask": lambda out: out.indices_TK[out.indices_TK > 0],
    "if on a tensor": lambda out: bool((out.indices_TK < 0).any()),
    "unique": lambda out: torch.unique(out.indices_TK),
}


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_recorder_catches_a_sync_added_to_the_hot_path(how: str) -> None:
    model, step = _demo_steps()
    with _broken_update(BREAKS[how]):  # before attach: the hooks bind their updaters at attach
        watch = moewatch.attach(model, **quiet(window_steps=1000))
        try:
            rec = _record(step, 1)
        finally:
            watch.close()
    assert rec.moewatch_syncs, f"{how} was not caught"


@pytest.mark.parametrize("how", ["item", "tolist", "cpu", "numpy"])
def test_meta_run_catches_host_reads(how: str) -> None:
    bad = {
        "item": lambda out: out.indices_TK.sum().item(),
        "tolist": lambda out: out.indices_TK.tolist(),
        "cpu": lambda out: out.indices_TK.cpu(),
        "numpy": lambda out: out.indices_TK.numpy(),
    }[how]
    model, step = _demo_steps("meta")
    with _broken_update(bad):
        watch = moewatch.attach(model, **quiet(window_steps=1000))
        try:
            with pytest.raises(Exception):  # noqa: B017 - any error: meta has no data
                step()
        finally:
            watch._closed = True
            watch._remove_hooks()


# --- compiled: moewatch attached before torch.compile -----------------------------------------------------------
#
# A compiled graph runs no Python frame per op and there is no CUDA sync debug mode on the CPU, so the same
# classification (``_is_sync``) is applied to the graphs themselves: a torch.compile backend that runs like
# ``aot_eager`` records every aten op of the functionalised forward and backward graphs AOTAutograd builds,
# with the source lines it was traced from (``node.meta["stack_trace"]``), where moewatch's frames attribute
# an op to moewatch as the Python stack does in eager. A sync in traced code can only go two ways: into the
# graph (``.item()`` under ``capture_scalar_outputs``, ``nonzero`` under ``capture_dynamic_output_shape_ops``),
# where the graph check sees it, or out of it as a graph break (the default for both), which the break count
# sees. What runs eagerly around the compiled model (the optimizer step and moewatch's post-hook) is recorded
# with the dispatch-mode recorder as before, and the same compiled steps run on the meta device.


def _moewatch_trace(stack_trace: str | None) -> str | None:
    """``file:line`` of the innermost moewatch frame (outside the demo) in a node's ``stack_trace``."""
    where = None
    for line in (stack_trace or "").splitlines():
        line = line.strip()
        if line.startswith('File "') and line[6:].startswith(_PKG) and not line[6:].startswith(_DEMO):
            path, _, rest = line[6:].partition('", line ')
            where = f"{path[len(_PKG):]}:{rest.split(',')[0]}"
    return where


class GraphRecorder:
    """A torch.compile backend (AOTAutograd, graphs run op by op as ``aot_eager``) that records the aten ops
    of every compiled forward and backward graph: all of them, the syncing ones, and moewatch's."""

    def __init__(self) -> None:
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func

        self.syncs: Counter[str] = Counter()
        self.moewatch_syncs: list[tuple[str, str]] = []
        self.moewatch_ops: list[str] = []

        def compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            for node in gm.graph.nodes:
                if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                    continue
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
                where = _moewatch_trace(node.meta.get("stack_trace"))
                if where is not None:
                    self.moewatch_ops.append(node.target.overloadpacket.__name__)
                if _is_sync(node.target, args, kwargs):
                    self.syncs[str(node.target)] += 1
                    if where is not None:
                        self.moewatch_syncs.append((str(node.target), where))
            return make_boxed_func(gm.forward)

        self.backend = aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def _compiled_steps(name: str, monitored: bool, steps: int = 3, device: str = "cpu") -> dict[str, Any]:
    """``steps`` compiled training steps that do not end a window, moewatch attached before compiling or not."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs = GraphRecorder()
    model, step = MODELS[name](device=device, backend=graphs.backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    watch = moewatch.attach(model, optimizer=opt, **quiet(window_steps=1000)) if monitored else None
    if watch is not None and device == "meta":
        watch._acc._buffers(torch.device("meta"))  # as prepare() does at attach on every other device
    eager = OpRecorder()
    out: dict[str, Any] = {"graphs": graphs, "eager": eager}
    try:
        for _ in range(steps):
            step()
            with eager:  # the optimizer step runs eagerly, moewatch's post-hook (step counting) included
                opt.step()
        out["breaks"] = sum(counters["graph_break"].values())
        if watch is not None:
            assert watch.step_count == steps and watch.hook_errors == 0
            # The compiled graph counted (device-side token counters), not an eager run of the hooks.
            out["traced"] = watch._acc.traced_calls and not any(watch._acc.tokens_L)
            if device != "meta":
                out["tokens"] = [layer.tokens for layer in watch.flush().layers]
    finally:
        if watch is not None:
            if device == "meta":
                watch._closed = True  # a window end copies to the host, which meta cannot; not the hot path
                watch._remove_hooks()
            else:
                watch.close()
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_steps_that_do_not_end_a_window_do_not_sync(name: str) -> None:
    plain = _compiled_steps(name, monitored=False)
    monitored = _compiled_steps(name, monitored=True)
    graphs = monitored["graphs"]
    assert monitored["traced"] and monitored["tokens"] == [3 * TOKENS_PER_STEP[name]] * 2  # counted in the graph
    assert "clamp" in graphs.moewatch_ops and "index_add" in graphs.moewatch_ops, "the recorder is not looking"
    assert graphs.moewatch_syncs == [], f"moewatch synchronises in the compiled graph: {graphs.moewatch_syncs}"
    assert graphs.syncs == plain["graphs"].syncs  # whatever the model's graphs sync, moewatch adds nothing
    assert monitored["breaks"] == plain["breaks"]  # no sync left to eager through a graph break either
    assert monitored["eager"].moewatch_syncs == []  # the optimizer post-hook on steps that do not end a window


def test_compiled_monitored_steps_run_on_the_meta_device() -> None:
    run = _compiled_steps("demo", monitored=True, device="meta")  # raises if anything reads a value on the host
    assert run["traced"] and run["breaks"] == 0


@contextmanager
def _broken_traced_update(bad: Callable[[RouterOutput], Any]) -> Iterator[None]:
    orig = Accumulator._update_traced

    def update(self: Accumulator, layer: int, out: RouterOutput, top_k: int) -> None:
        orig(self, layer, out, top_k)
        # Into a buffer, or the graph would drop the result as dead code; the statistics do not matter here.
        self._bufs[out.indices_TK.device].stats_LS[layer, 0].add_(bad(out))

    Accumulator._update_traced = update  # type: ignore[method-assign]
    try:
        yield
    finally:
        Accumulator._update_traced = orig  # type: ignore[method-assign]


#: A sync added to the traced hot path, and whether dynamo is told to put it into the graph (else: a break).
COMPILED_BREAKS: dict[str, tuple[Callable[[RouterOutput], Any], bool]] = {
    "item in graph": (lambda out: out.indices_TK.max().item() + 1, True),
    "nonzero in graph": (lambda out: torch.nonzero(out.indices_TK == 0).sum(), True),
    "bool mask in graph": (lambda out: out.indices_TK[out.indices_TK > 0].sum(), True),
    "item as a graph break": (lambda out: out.indices_TK.max().item() + 1, False),
    "tolist as a graph break": (lambda out: len(out.indices_TK.tolist()), False),
}


@pytest.mark.parametrize("how", sorted(COMPILED_BREAKS))
def test_compiled_checks_catch_a_sync_added_to_the_traced_hot_path(how: str) -> None:
    bad, in_graph = COMPILED_BREAKS[how]
    capture = {"capture_scalar_outputs": in_graph, "capture_dynamic_output_shape_ops": in_graph}
    with torch._dynamo.config.patch(**capture), _broken_traced_update(bad):
        run = _compiled_steps("demo", monitored=True, steps=1)
    if in_graph:
        assert run["graphs"].moewatch_syncs, f"{how} was not caught"
        assert all(where.startswith(("accumulator.py", "monitor.py")) for _, where in run["graphs"].moewatch_syncs)
    else:
        assert run["breaks"] > 0, f"{how} was not caught"


@pytest.mark.parametrize("how", ["item", "cpu"])
def test_compiled_meta_run_catches_host_reads(how: str) -> None:
    bad = {"item": lambda out: out.indices_TK.sum().item(), "cpu": lambda out: out.indices_TK.cpu().sum()}[how]
    with _broken_traced_update(bad), pytest.raises(Exception):  # noqa: B017 - any error: meta has no data
        _compiled_steps("demo", monitored=True, steps=1, device="meta")
