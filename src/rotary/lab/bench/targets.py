"""The core issue's speed targets, measured side by side in one process (``rotary targets`` prints them).

fp32 on the device given (the targets are stated for a 2-core CPU).
"""

from __future__ import annotations

import torch

from rotary import Rotary, apply_rotary
from rotary.lab.bench.seed import SeedRotary
from rotary.lab.bench.timing import Ratio, median, time_blocked, time_interleaved
from rotary.core.frequencies import inverse_frequencies, rotary_angles


def _fwd_bwd(fn, x, params, generator):
    g = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)

    def run():
        y = fn(x)
        torch.autograd.grad(y, [x, *params], g)

    return run


def _ratio(times, label, a, b, target, le=True) -> Ratio:
    r = median(times[a]) / median(times[b])
    return Ratio(label, r, f"{'<=' if le else '>='} {target}", r <= target if le else r >= target)


def measure(*, repeats: int = 15, device: str = "cpu", seed: int = 0) -> list[dict]:
    """Each section as ``{"title", "times", "ratios", "notes"}``: times maps a contender to its repeats in
    seconds, ratios is a list of :class:`rotary.bench.timing.Ratio`, notes lists what was skipped. Inputs and
    trained-looking angles come from a ``torch.Generator`` seeded with ``seed``."""
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    sections = []

    B, T, H, D = 8, 2048, 12, 64
    x = torch.randn(B, T, H, D, device=device, generator=gen)
    plain = Rotary(H * D, H, mixing=None).to(device)
    givens = Rotary(H * D, H).to(device)
    with torch.no_grad():
        givens.mixing.angles.normal_(generator=gen)
    angles = rotary_angles(torch.arange(T, device=device), inverse_frequencies(D, 10000.0, device=device))
    cos, sin = angles.cos().float(), angles.sin().float()
    xg = x.clone().requires_grad_()
    fns = {
        "clone": lambda: x.clone(),
        "apply_rotary fwd": lambda: apply_rotary(x, cos, sin),
        "Rotary(None) fwd+bwd": _fwd_bwd(plain, xg, [], gen),
        "Rotary(givens) fwd+bwd": _fwd_bwd(givens, xg, list(givens.parameters()), gen),
    }
    notes = []
    try:
        from rotary_embedding_torch import RotaryEmbedding

        ret = RotaryEmbedding(dim=D).to(device)
        xt = x.transpose(1, 2).contiguous().requires_grad_()  # its layout: (B, H, T, D)
        fns["rotary-embedding-torch fwd+bwd"] = _fwd_bwd(ret.rotate_queries_or_keys, xt, [], gen)
    except ImportError:
        notes.append("rotary-embedding-torch not installed: skipped (pip install 'rotary[bench]')")
    res = time_interleaved(fns, device=device, repeats=repeats)
    ratios = [
        _ratio(res, "apply_rotary fwd / clone", "apply_rotary fwd", "clone", 1.2),
        _ratio(res, "Rotary(None) fwd+bwd / clone", "Rotary(None) fwd+bwd", "clone", 3),
    ]
    if "rotary-embedding-torch fwd+bwd" in res:
        ratios.append(_ratio(res, "Rotary(None) fwd+bwd / rotary-embedding-torch fwd+bwd", "Rotary(None) fwd+bwd",
                             "rotary-embedding-torch fwd+bwd", 0.1))
    ratios.append(_ratio(res, "Rotary(givens) fwd+bwd / Rotary(None) fwd+bwd", "Rotary(givens) fwd+bwd",
                         "Rotary(None) fwd+bwd", 3))
    sections.append({"title": f"(B, T, H, D) = {(B, T, H, D)}, fp32", "times": res, "ratios": ratios,
                     "notes": notes})

    B, T, dims, H = 8, 512, 768, 12
    x = torch.randn(B, T, dims, device=device, generator=gen, requires_grad=True)
    ours = Rotary(dims, H).to(device)
    seed_module = SeedRotary(dims, H).to(device)

    def seed_step():
        seed_module.rebuild()  # the original module cannot run backward twice on its cached matrices
        y = seed_module(x)
        torch.autograd.grad(y, [x, seed_module.theta], torch.ones_like(y))

    fns = {"seed fwd+bwd": seed_step, "Rotary(givens) fwd+bwd": _fwd_bwd(ours, x, list(ours.parameters()), gen)}
    reps = max(3, repeats // 3)
    for label, timer in (("round-robin", time_interleaved), ("each in its own block", time_blocked)):
        res = timer(fns, device=device, repeats=reps)
        sections.append({
            "title": f"(B, T, dims, H) = {(B, T, dims, H)}, fp32, {label}", "times": res, "notes": [],
            "ratios": [_ratio(res, f"seed fwd+bwd / Rotary(givens) fwd+bwd, {label}", "seed fwd+bwd",
                              "Rotary(givens) fwd+bwd", 50, le=False)],
        })
    return sections
