"""Suite ``core``: the core op and module against a tensor copy, rotary-embedding-torch and the original
module, timed side by side in one process (fp32; the targets are stated for a 2-core CPU).

Sections: (B, T, H, D) = (8, 2048, 12, 64): ``apply_rotary`` forward, ``Rotary(mixing=None)`` and
``Rotary(givens)`` forward+backward, rotary-embedding-torch forward+backward (skipped with a logged line when
not installed); (B, T, dims, H) = (8, 512, 768, 12): the original module against ``Rotary(givens)``,
forward+backward, round-robin and each in its own block (see :func:`rotary.lab.bench.timing.time_blocked`).
"""

from __future__ import annotations

import torch

from rotary import Rotary, apply_rotary
from rotary.core.frequencies import inverse_frequencies, rotary_angles
from rotary.lab.bench.original import OriginalRotary
from rotary.lab.bench.rows import Row, ratio_row, time_rows
from rotary.lab.bench.timing import time_blocked, time_interleaved

SUITE = "core"


def _fwd_bwd(fn, x, params, generator):
    g = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)

    def run():
        y = fn(x)
        torch.autograd.grad(y, [x, *params], g)

    return run


def suite(*, quick: bool, device: torch.device, seed: int, repeats: int | None, log) -> list[Row]:
    """Rows of both sections: each contender's median ms, and the ratios the targets table judges."""
    repeats = repeats or (2 if quick else 15)
    gen = torch.Generator(device).manual_seed(seed)
    dev = str(device)
    rows: list[Row] = []

    B, T, H, D = (2, 64, 4, 32) if quick else (8, 2048, 12, 64)
    x = torch.randn(B, T, H, D, device=device, generator=gen)
    plain = Rotary(H * D, H, mixing=None).to(device)
    givens = Rotary(H * D, H).to(device)
    with torch.no_grad():
        givens.mixer.angles.normal_(generator=gen)
    angles = rotary_angles(torch.arange(T, device=device), inverse_frequencies(D, 10000.0, device=device))
    cos, sin = angles.cos().float(), angles.sin().float()
    xg = x.clone().requires_grad_()
    fns = {
        "clone": lambda: x.clone(),
        "apply_rotary fwd": lambda: apply_rotary(x, cos, sin),
        "Rotary(None) fwd+bwd": _fwd_bwd(lambda x: plain(x, layout="BTHD"), xg, [], gen),
        "Rotary(givens) fwd+bwd": _fwd_bwd(lambda x: givens(x, layout="BTHD"), xg, list(givens.parameters()), gen),
    }
    try:
        from rotary_embedding_torch import RotaryEmbedding

        ret = RotaryEmbedding(dim=D).to(device)
        xt = x.transpose(1, 2).contiguous().requires_grad_()  # its layout: (B, H, T, D)
        fns["rotary-embedding-torch fwd+bwd"] = _fwd_bwd(ret.rotate_queries_or_keys, xt, [], gen)
    except ImportError:
        log("targets: rotary-embedding-torch not installed, its ratio skipped; pip install 'rotary[bench]'")
    res = time_interleaved(fns, device=device, repeats=repeats)
    section = f"(B, T, H, D) = {(B, T, H, D)}, fp32, median of {repeats}"
    rows += time_rows(SUITE, section, res, device=dev)
    ratios = [("apply_rotary fwd / clone", "apply_rotary fwd", "clone", "apply_rotary/clone"),
              ("Rotary(None) fwd+bwd / clone", "Rotary(None) fwd+bwd", "clone", "none/clone")]
    if "rotary-embedding-torch fwd+bwd" in res:
        ratios.append(("Rotary(None) / rotary-embedding-torch, fwd+bwd", "Rotary(None) fwd+bwd",
                       "rotary-embedding-torch fwd+bwd", "none/rotary-embedding-torch"))
    ratios.append(("Rotary(givens) / Rotary(None), fwd+bwd", "Rotary(givens) fwd+bwd", "Rotary(None) fwd+bwd",
                   "givens/none"))
    rows += [ratio_row(SUITE, section, name, res, a, b, key=key, device=dev) for name, a, b, key in ratios]

    B, T, dims, H = (2, 32, 128, 4) if quick else (8, 512, 768, 12)
    x = torch.randn(B, T, dims, device=device, generator=gen, requires_grad=True)
    ours = Rotary(dims, H).to(device)
    original = OriginalRotary(dims, H).to(device)  # its Givens planes come from the global RNG (the CLI seeds it)

    def original_step():
        original.rebuild()  # the original module cannot run backward twice on its cached matrices
        y = original(x)
        torch.autograd.grad(y, [x, original.theta], torch.ones_like(y))

    fns = {"original module fwd+bwd": original_step,
           "Rotary(givens) fwd+bwd": _fwd_bwd(ours, x, list(ours.parameters()), gen)}
    reps = max(1 if quick else 3, repeats // 3)
    for label, timer in (("round-robin", time_interleaved), ("each in its own block", time_blocked)):
        res = timer(fns, device=device, repeats=reps)
        section = f"(B, T, dims, H) = {(B, T, dims, H)}, fp32, {label}, median of {reps}"
        rows += time_rows(SUITE, section, res, device=dev)
        rows.append(ratio_row(SUITE, section, "original module / Rotary(givens), fwd+bwd", res,
                              "original module fwd+bwd", "Rotary(givens) fwd+bwd", key="original/givens", device=dev))
    return rows
