"""The accumulator's buffer layout, through pack and unpack, for routers of different widths in one model."""

from __future__ import annotations

import numpy as np
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
