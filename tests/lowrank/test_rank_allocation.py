"""Rank choice: the energy threshold against a direct scan, the global allocator against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvtrain.lowrank.ranks import allocate_ranks, energy_rank, tail_energy


def _spectrum(gen: torch.Generator, d: int) -> torch.Tensor:
    return (torch.rand(d, generator=gen, dtype=torch.float64) * 3).sort(descending=True).values


def _tail(s: list[float], r: int) -> float:
    return sum(x * x for x in s[r:])


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.1, 0.5])
def test_energy_rank_is_smallest_rank_under_threshold(eps: float):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = _spectrum(gen, 8)
        values = s.tolist()
        total = _tail(values, 0)
        expected = next(r for r in range(1, 9) if _tail(values, r) <= eps**2 * total)
        assert energy_rank(s, eps) == expected
        assert tail_energy(s)[expected].item() == pytest.approx(_tail(values, expected), abs=1e-12)


def test_energy_rank_averages_head_spectra():
    gen = torch.Generator().manual_seed(1)
    heads = torch.stack([_spectrum(gen, 6) for _ in range(3)])
    assert energy_rank(heads) == energy_rank(heads.mean(0))
    with pytest.raises(ValueError, match="descending"):
        energy_rank(torch.tensor([1.0, 2.0]))


def _brute_force(spectra: list[list[float]], budget: int) -> float:
    best = float("inf")
    for ranks in itertools.product(*[range(1, len(s) + 1) for s in spectra]):
        if sum(ranks) <= budget:
            best = min(best, sum(_tail(s, r) for s, r in zip(spectra, ranks)))
    return best


def test_greedy_allocation_equals_brute_force_optimum():
    gen = torch.Generator().manual_seed(2)
    for trial in range(30):
        dims = [int(x) for x in torch.randint(1, 6, (3,), generator=gen)]
        spectra = [_spectrum(gen, d) for d in dims]
        if trial % 5 == 0:  # ties and exact zeros
            spectra[0] = torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0][: dims[0]], dtype=torch.float64)
        lists = [s.tolist() for s in spectra]
        for budget in range(3, sum(dims) + 2):
            ranks = allocate_ranks(spectra, budget)
            assert sum(ranks) <= budget and all(1 <= r <= d for r, d in zip(ranks, dims))
            got = sum(_tail(s, r) for s, r in zip(lists, ranks))
            assert got == pytest.approx(_brute_force(lists, budget), abs=1e-12)


def test_unequal_costs_respect_the_budget_and_errors():
    gen = torch.Generator().manual_seed(3)
    spectra = [_spectrum(gen, 5) for _ in range(3)]
    for budget in range(6, 40):
        ranks = allocate_ranks(spectra, budget, cost_per_rank=[1.0, 2.0, 3.0])
        assert sum(r * c for r, c in zip(ranks, [1, 2, 3])) <= budget
    with pytest.raises(ValueError, match="min_rank"):
        allocate_ranks(spectra, 2)
    with pytest.raises(ValueError, match="cost_per_rank"):
        allocate_ranks(spectra, 10, cost_per_rank=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"spectra\[1\] must be sorted"):
        allocate_ranks([spectra[0], spectra[1].flip(0)], 10)
