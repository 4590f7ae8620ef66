"""Speed of N-D rotary against 1-D rotary at the same tensor shape, forward + backward (issue 12's targets).

Fixed directions (axial, sections, oblique) at most 1.2x the 1-D time, learned per-head directions ("mixed") at
most 2x; stated for CPU fp32 at ``(8, 1024, 12, 64)`` = (B, T, H, D), positions the (row, column) of a 32 x 32
grid. The 1-D contender is ``Rotary`` at positions ``arange(T)`` (its table slice, the cheapest path it has).
No mixing P in either, so the positions-to-rotation path is what differs. ``benchmarks/nd_speed.py`` prints it.
"""

from __future__ import annotations

import math

import torch

from rotary import Rotary
from rotary.lab.bench.timing import Ratio, median, time_interleaved

SHAPE = (8, 1024, 12, 64)
TARGETS = {"axial": 1.2, "sections": 1.2, "oblique": 1.2, "mixed": 2.0}


def grid_positions(tokens: int, axes: int = 2, device="cpu") -> torch.Tensor:
    """``(tokens, axes)`` integer coordinates of the tokens of a square (or cubic) grid, row-major."""
    side = math.ceil(tokens ** (1 / axes) - 1e-9)
    coords = torch.cartesian_prod(*[torch.arange(side, device=device)] * axes).view(-1, axes)
    return coords[:tokens]


def _fwd_bwd(module, x, g, positions):
    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        y = module(x) if positions is None else module(x, positions=positions)
        torch.autograd.grad(y, [x, *params], g)

    return run


def measure(*, shape=SHAPE, axes: int = 2, repeats: int = 15, device: str = "cpu", seed: int = 0) -> dict:
    """``{"shape", "times": {contender: [seconds per repeat]}, "ratios": [Ratio]}``; inputs drawn from a
    ``torch.Generator`` seeded with ``seed``; contenders timed round-robin."""
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    B, T, H, D = shape
    x = torch.randn(shape, device=device, generator=gen).requires_grad_()
    g = torch.randn(shape, device=device, generator=gen)
    pos = grid_positions(T, axes, device)
    pairs = D // 2
    sections = [pairs // axes + (1 if a < pairs % axes else 0) for a in range(axes)]
    fns = {"1-D": _fwd_bwd(Rotary(H * D, H, mixing=None).to(device), x, g, None)}
    for kind in TARGETS:
        m = Rotary(H * D, H, mixing=None, axes=axes, directions=kind,
                   sections=sections if kind == "sections" else None).to(device)
        fns[f"{axes}-D {kind}"] = _fwd_bwd(m, x, g, pos)
    times = time_interleaved(fns, device=device, repeats=repeats)
    ratios = []
    for kind, target in TARGETS.items():
        r = median(times[f"{axes}-D {kind}"]) / median(times["1-D"])
        ratios.append(Ratio(f"{axes}-D {kind} / 1-D", r, f"<= {target}", r <= target))
    return {"shape": tuple(shape), "times": times, "ratios": ratios}
