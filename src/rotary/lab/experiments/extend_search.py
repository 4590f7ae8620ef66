"""LongRoPE's gradient-free search (Ding et al., 2024) of a rescale factor per rotated pair, for the extend task.

LongRoPE evolves per-pair factors ``lambda_i`` (pair i turns at ``w_i / lambda_i``) under two constraints: no
pair is sped up (``lambda_i >= 1``) and lower frequencies are slowed at least as much as higher ones (``lambda``
non-decreasing with the pair index). Its initial population holds the known zero-shot rules (position
interpolation, NTK, YaRN), and each generation keeps the best and fills up with mutations and crossovers of them.
Here the search runs in log factors, with a fixed budget of loss evaluations, and each generation scores every
candidate on the same training batch (a fresh one per generation), so that candidates compare on equal terms and
the survivors are scored again on new data rather than kept on one lucky batch.

Shapes: r/2 rotated pairs; a candidate is ``(r/2,)`` float64 of ``log lambda``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["longrope_search", "repair"]


def repair(log_factors: Tensor, highest: float) -> Tensor:
    """The nearest candidate LongRoPE allows, cheaply: clamped to ``[0, highest]`` (``1 <= lambda <= e^highest``)
    then made non-decreasing by a running maximum."""
    return torch.cummax(log_factors.clamp(0.0, highest), dim=0).values


def longrope_search(loss_of: Callable[[Tensor, int], float], starts: list[Tensor], *, evaluations: int,
                    population: int, highest: float, generator: torch.Generator, sigma: float = 0.3,
                    on_evaluation: Callable[[], None] | None = None) -> tuple[Tensor, float]:
    """The best candidate (log factors) and its loss after ``evaluations // population`` generations of
    ``population`` candidates (``evaluations`` is rounded down to whole generations).

    loss_of(candidate, generation): the loss with the candidate's factors on that generation's batch. starts: the
    first candidates (repaired; the population is filled with mutations of them). The survivors of a generation
    are its best third; the rest of the next are children: half a crossover of two survivors (each pair's factor
    from either) then a mutation, half a mutation of one (each log factor moved by ``N(0, sigma)`` with
    probability 1/2). ``generator`` draws everything, so the search is a function of it."""
    population = max(2, min(population, evaluations))
    generations = evaluations // population
    keep = max(1, population // 3)

    def mutate(x: Tensor) -> Tensor:
        moved = torch.rand(x.shape, generator=generator, dtype=x.dtype) < 0.5
        return repair(x + moved * sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype), highest)

    def pick(options: list[Tensor]) -> Tensor:
        return options[int(torch.randint(len(options), (), generator=generator))]

    pool = [repair(s.double(), highest) for s in starts][:population]
    while len(pool) < population:
        pool.append(mutate(pick(pool)))
    best, best_loss = pool[0], float("inf")
    for generation in range(generations):
        losses = []
        for candidate in pool:
            losses.append(loss_of(candidate, generation))
            if on_evaluation is not None:
                on_evaluation()
        order = sorted(range(len(pool)), key=losses.__getitem__)
        survivors = [pool[i] for i in order[:keep]]
        best, best_loss = survivors[0], losses[order[0]]
        children = []
        while len(children) < population - keep:
            if len(children) % 2 == 0 and len(survivors) > 1:
                a, b = pick(survivors), pick(survivors)
                either = torch.rand(a.shape, generator=generator, dtype=a.dtype) < 0.5
                children.append(mutate(torch.where(either, a, b)))
            else:
                children.append(mutate(pick(survivors)))
        pool = survivors + children
    return best, best_loss
