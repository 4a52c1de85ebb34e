"""The accumulator's buffer layout, through pack and unpack, for routers of different widths in one model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moewatch.accumulator import Accumulator
from moewatch.adapters.base import RouterOutput


def _window(acc: Accumulator):
    tokens, prob_tokens = acc.take_host_counts()
    packed = acc.pack()
    assert packed is not None and packed.shape[1] == acc.packed_width
    return acc.unpack(packed.numpy(), tokens, prob_tokens)


def test_counts_of_routers_of_different_widths_with_invalid_ids() -> None:
    acc = Accumulator([4, 8, 3])
    with torch.no_grad():
        # Router 0 (E=4): -1 and 4 are invalid, 9 is invalid, the rest count.
        acc.update(0, RouterOutput(indices_TK=torch.tensor([[0, 3], [-1, 4], [9, 1]])), 2)
        # Router 1 (E=8): ids 4..7 are valid here (they are not for router 0); int32 ids are read as they are.
        acc.update(1, RouterOutput(indices_TK=torch.tensor([[7, 4], [7, -100]], dtype=torch.int32)), 2)
        # Router 2 (E=3): a Megatron-style routing map and a DeepSpeed-style per-expert count.
        acc.update(2, RouterOutput(routing_map_TE=torch.tensor([[True, False, True], [False, False, True]])), 2)
        acc.update(2, RouterOutput(counts_E=torch.tensor([5, 0, 1]), num_tokens=3), 2)
    counts = _window(acc)
    assert counts.counts_LE1.shape == (3, 9)
    assert counts.counts_LE1[0].tolist() == [1, 1, 0, 1, 3, 0, 0, 0, 0]  # E=4: column 4 holds 3 invalid ids
    assert counts.counts_LE1[1].tolist() == [0, 0, 0, 0, 1, 0, 0, 2, 1]  # E=8: column 8 holds -100
    assert counts.counts_LE1[2].tolist() == [6, 0, 3, 0, 0, 0, 0, 0, 0]
    assert counts.tokens_L.tolist() == [3, 2, 5]


def test_pack_zeroes_the_buffers_for_the_next_window() -> None:
    acc = Accumulator([4])
    out = RouterOutput(indices_TK=torch.tensor([[0, 1]]), logits_TE=torch.zeros(1, 4))
    with torch.no_grad():
        acc.update(0, out, 2)
        first = _window(acc)
        acc.update(0, out, 2)
        acc.update(0, out, 2)
        second = _window(acc)
    assert first.counts_LE1[0].tolist() == [1, 1, 0, 0, 0]
    assert second.counts_LE1[0].tolist() == [2, 2, 0, 0, 0]
    np.testing.assert_allclose(second.stats_LS[0, :4], [0.5, 0.5, 0.5, 0.5])  # two uniform rows
    assert second.prob_tokens_L.tolist() == [2]


def _reference(idx: torch.Tensor, logits: torch.Tensor, e: int) -> tuple[list[int], np.ndarray]:
    """Counts per column (below 0, experts 0..E-1, E and above) and (probability sums, z-loss sum, finite
    rows) in float64, row by row, by the definitions."""
    ids = idx.reshape(-1).tolist()
    counts = [sum(i < 0 for i in ids)] + [ids.count(j) for j in range(e)] + [sum(i >= e for i in ids)]
    x = logits.double()
    lse = torch.logsumexp(x, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.softmax(x[finite], dim=-1).sum(dim=0)
    z = (lse[finite] ** 2).sum()
    return counts, np.concatenate([probs.numpy(), [z.item(), finite.sum().item()]])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("t,e", [(64, 8), (1024, 8), (4096, 64), (3000, 40)])
def test_counts_and_statistics_equal_the_definitions(t: int, e: int, compiled: bool) -> None:
    """Exact counts (invalid ids in their edge columns) and float64-reference statistics, through both the
    bucketize and the CPU clamp count paths and both softmax layouts, with non-finite rows of every kind,
    for a router narrower than the widest (its statistics cells are not adjacent) and for the widest; and
    the same through the traced path compiled by inductor (add + clamp and an int32 histogram). With
    ``probs_every=2`` each router's second call is counted but not sampled."""
    widths = [e, e + 3]
    acc = Accumulator(widths, probs_every=2)
    if compiled:
        torch._dynamo.reset()
        acc.prepare(torch.device("cpu"))
    data = []
    for layer, width in enumerate(widths):
        g = torch.Generator().manual_seed(t + width)
        idx = torch.randint(0, width, (t, 2), generator=g)
        idx[:5, 0] = torch.tensor([-1, -7, width, width + 3, 10**6])  # invalid ids below and above
        logits = torch.randn(t, width, generator=g) * 4
        logits[1, 2] = float("nan")
        logits[2, 0] = float("inf")
        logits[3] = float("-inf")  # every expert -inf
        logits[4, : width // 2] = float("-inf")  # masked experts: a finite row
        logits[5] *= 1e4  # large but finite
        unsampled_idx = torch.randint(-1, width + 1, (t // 2 + 1, 2), generator=g)  # call 1: counts only

        def update(idx: torch.Tensor, logits: torch.Tensor, layer: int = layer) -> None:
            acc.update(layer, RouterOutput(indices_TK=idx, logits_TE=logits), 2)

        fn = torch.compile(update, backend="inductor", fullgraph=True) if compiled else update
        with torch.no_grad():
            fn(idx, logits)
            fn(unsampled_idx, torch.full((unsampled_idx.shape[0], width), float("nan")))
        data.append((idx, logits, unsampled_idx))
    assert acc.traced_calls == compiled
    counts = _window(acc)
    e_max = max(widths)
    for layer, (width, (idx, logits, unsampled_idx)) in enumerate(zip(widths, data, strict=True)):
        want_counts, want_stats = _reference(idx, logits, width)
        want_counts = [a + b for a, b in zip(want_counts, _reference(unsampled_idx, logits[:1], width)[0], strict=True)]
        below = int(counts.invalid_below_L[layer])
        got_counts = [below, *counts.counts_LE1[layer, :width].tolist(), int(counts.counts_LE1[layer, width]) - below]
        assert got_counts == want_counts
        assert counts.tokens_L[layer] == t + unsampled_idx.shape[0] and counts.prob_tokens_L[layer] == t
        got = np.concatenate([counts.stats_LS[layer, :width], counts.stats_LS[layer, e_max : e_max + 2]])
        assert got[-1] == want_stats[-1] == t - 3  # finite rows, exactly: the NaN, +inf and all -inf rows are not
        np.testing.assert_allclose(got[:width], want_stats[:width], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got[width], want_stats[width], rtol=1e-5)
        assert not counts.stats_LS[layer, width:e_max].any()  # nothing written between the two


def test_the_cpu_workspace_is_reused_across_calls_and_routers_without_mixing_them() -> None:
    """Routers with fewer than 16 experts on the CPU share one kept workspace per width: calls of the same size
    reuse it, another size replaces it, and each router's statistics are still its own calls' sums, with a
    narrower router's in-between columns untouched."""
    widths = [6, 6, 9]
    acc = Accumulator(widths)
    g = torch.Generator().manual_seed(3)
    calls = [(0, 32), (1, 32), (0, 32), (0, 17), (2, 32), (1, 32)]
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    with torch.no_grad():
        for layer, t in calls:
            logits = torch.randn(t, widths[layer], generator=g) * 3
            logits[0, 0] = float("nan")
            acc.update(layer, RouterOutput(indices_TK=torch.zeros(t, 2, dtype=torch.long), logits_TE=logits), 2)
            seen[layer].append(logits)
    assert acc.state_bytes() > 0 and set(acc._bufs[torch.device("cpu")].work) == {6, 9}
    counts = _window(acc)
    for layer, width in enumerate(widths):
        _, want = _reference(torch.zeros(1, 2, dtype=torch.long), torch.cat(seen[layer]), width)
        got = np.concatenate([counts.stats_LS[layer, :width], counts.stats_LS[layer, 9:11]])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert not counts.stats_LS[layer, width:9].any()
        assert counts.prob_tokens_L[layer] == sum(t for la, t in calls if la == layer)
