"""WeLore's global-threshold allocation: reaches the ratio, respects min_saving, classifies LRC / N-LRC."""

from __future__ import annotations

import pytest
import torch

from rankwise.compression.allocation.welore import welore_allocation
from rankwise.errors import RankwiseError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spectra() -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    # three fast-decaying (low-rank-ish) 64×64 matrices and two flat ones
    fast = [torch.tensor([0.8**i for i in range(64)]) * (j + 1) for j in range(3)]
    flat = [torch.linspace(1.0, 0.6, 64) * 3 for _ in range(2)]
    return fast + flat, [(64, 64)] * 5


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4])
def test_welore_reaches_ratio_with_smallest_threshold(ratio: float) -> None:
    sp, shapes = _spectra()
    total = sum(m * n for m, n in shapes)
    alloc = welore_allocation(sp, shapes, ratio)
    saved = sum(m * n - k * (m + n) for k, (m, n) in zip(alloc.ranks, shapes) if k is not None)
    assert saved / total == pytest.approx(alloc.achieved_ratio)
    assert alloc.achieved_ratio >= ratio
    # every kept rank is the count of normalised σ at or above the threshold
    for s, k in zip(sp, alloc.ranks):
        if k is not None:
            assert k == max(1, int((s.double() / s.double().max() >= alloc.threshold).sum()))
    # a slightly lower threshold (the next candidate below) would not reach the ratio: t is minimal
    normed = torch.cat([s.double() / s.double().max() for s in sp]).unique().sort().values
    below = normed[normed < alloc.threshold]
    if len(below):
        t2 = float(below[-1])
        saved2 = 0
        for s, (m, n) in zip(sp, shapes):
            k = max(1, int((s.double() / s.double().max() >= t2).sum()))
            gain = m * n - k * (m + n)
            if gain >= 0.1 * m * n and gain > 0:
                saved2 += gain
        assert saved2 / total < ratio


def test_welore_flat_matrices_are_nlrc_and_min_saving_respected() -> None:
    sp, shapes = _spectra()
    alloc = welore_allocation(sp, shapes, 0.3, min_saving=0.1)
    assert alloc.lrc[:3] == [True, True, True]
    assert alloc.lrc[3:] == [False, False]
    assert alloc.ranks[3:] == [None, None]
    for k, (m, n) in zip(alloc.ranks, shapes):
        if k is not None:
            assert m * n - k * (m + n) >= 0.1 * m * n
    # a stricter min_saving turns borderline matrices dense
    strict = welore_allocation(sp, shapes, 0.3, min_saving=0.8)
    for k, (m, n) in zip(strict.ranks, shapes):
        if k is not None:
            assert m * n - k * (m + n) >= 0.8 * m * n


def test_welore_unreachable_ratio_is_a_user_error() -> None:
    sp, shapes = _spectra()
    with pytest.raises(RankwiseError, match="smaller --ratio"):
        welore_allocation(sp, shapes, 0.99)
