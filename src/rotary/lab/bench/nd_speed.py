"""Suite ``nd``: N-D rotary against 1-D rotary at the same tensor shape, forward + backward.

Fixed directions (axial, sections, oblique) and learned per-head directions ("mixed"), at ``(8, 1024, 12, 64)``
= (B, T, H, D) fp32, positions the coordinates of a 32 x 32 grid (2-D) and of a 11 x 11 x 11 cube (3-D, first
1024 points). The 1-D contender is ``Rotary`` at positions ``arange(T)`` (its table slice, the cheapest path it
has). No mixing P in either, so the positions-to-rotation path is what differs. Targets: ``rotary.lab.bench.targets``.
"""

from __future__ import annotations

import math

import torch

from rotary import Rotary
from rotary.lab.bench.rows import Row, ratio_row, time_rows
from rotary.lab.bench.timing import time_interleaved

SUITE = "nd"
SHAPE = (8, 1024, 12, 64)
KINDS = ("axial", "sections", "oblique", "mixed")


def grid_positions(tokens: int, axes: int = 2, device="cpu") -> torch.Tensor:
    """``(tokens, axes)`` integer coordinates of the tokens of a square (or cubic) grid, row-major."""
    side = math.ceil(tokens ** (1 / axes) - 1e-9)
    coords = torch.cartesian_prod(*[torch.arange(side, device=device)] * axes).view(-1, axes)
    return coords[:tokens]


def _fwd_bwd(module, x, g, positions):
    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        y = module(x, layout="BTHD") if positions is None else module(x, positions=positions, layout="BTHD")
        torch.autograd.grad(y, [x, *params], g)

    return run


def measure(*, shape=SHAPE, axes: int = 2, repeats: int = 15, device="cpu", seed: int = 0) -> dict[str, list[float]]:
    """Seconds per repeat of each contender ("1-D", then f"{axes}-D {kind}" for each kind), timed round-robin;
    inputs drawn from a ``torch.Generator`` seeded with ``seed``."""
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    _, T, H, D = shape
    x = torch.randn(shape, device=device, generator=gen).requires_grad_()
    g = torch.randn(shape, device=device, generator=gen)
    pos = grid_positions(T, axes, device)
    pairs = D // 2
    sections = [pairs // axes + (1 if a < pairs % axes else 0) for a in range(axes)]
    fns = {"1-D": _fwd_bwd(Rotary(H * D, H, mixing=None).to(device), x, g, None)}
    for kind in KINDS:
        m = Rotary(H * D, H, mixing=None, axes=axes, directions=kind,
                   sections=sections if kind == "sections" else None).to(device)
        fns[f"{axes}-D {kind}"] = _fwd_bwd(m, x, g, pos)
    return time_interleaved(fns, device=device, repeats=repeats)


def suite(*, quick: bool, device: torch.device, seed: int, repeats: int | None, log, axes=(2, 3)) -> list[Row]:
    """For 2-D and 3-D positions: each contender's median ms and its ratio to 1-D (the targets judge those)."""
    shape = (1, 27, 2, 12) if quick else SHAPE
    repeats = repeats or (1 if quick else 15)
    rows: list[Row] = []
    for n in axes:
        times = measure(shape=shape, axes=n, repeats=repeats, device=device, seed=seed)
        section = f"{n}-D positions, x {shape} fp32, forward+backward, median of {repeats}"
        rows += time_rows(SUITE, section, times, device=str(device), axes=n, shape=shape)
        rows += [ratio_row(SUITE, section, f"{n}-D {kind} / 1-D", times, f"{n}-D {kind}", "1-D", key=f"{kind}/1-D",
                           device=str(device), axes=n, shape=shape) for kind in KINDS]
    return rows
