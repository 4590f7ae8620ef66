"""``rotary demo``: the module's promises checked on generated data, and its speed against the original module.

:func:`checks` returns the measured errors and :func:`timings` the medians; the CLI seeds, prints and picks the
sizes. Every check is against the float64 reference (:func:`rotary.rotary_reference`) or an invariant that holds
exactly in real arithmetic.
"""

from __future__ import annotations

import torch

from rotary import Rotary, rotary_reference
from rotary.lab.bench.original import OriginalRotary
from rotary.lab.bench.timing import median, time_interleaved

__all__ = ["checks", "timings", "trained_looking"]

FAR = 100_000  # the position of the bf16 check: far past where bf16 positions stop being integers (256)


def trained_looking(dims: int, heads: int) -> Rotary:
    """A givens Rotary with non-trivial angles (the identity at initialisation would hide mistakes)."""
    m = Rotary(dims, heads)
    with torch.no_grad():
        m.mixer.angles.uniform_(-3.14, 3.14)
    return m


def _reference(m: Rotary, x: torch.Tensor, start: int) -> torch.Tensor:
    B, T, _ = x.shape
    return rotary_reference(x.view(B, T, m.heads, m.head_dim), torch.arange(start, start + T),
                            mixing=m.mixing_matrix(torch.float64)).view(x.shape)


@torch.no_grad()
def checks(m: Rotary, x: torch.Tensor, offset: int) -> dict[str, float]:
    """x ``(B, T, dims)`` float32. Returns:

    - ``reference``: max |Rotary - float64 reference| at positions ``offset + arange(T)``;
    - ``shift``: max change of q.k scores when both positions move by 1000 (relative positions only: ~0);
    - ``incremental``: max |token by token - all at once| (KV-cache decoding: 0);
    - ``bf16``: median relative error of bf16 input at position 100 000, against float64 (bf16 rounds at 2^-9).
    """
    y = m(x, offset=offset)
    q, k = torch.randn(2, 1, m.heads, m.head_dim), torch.randn(2, 1, m.heads, m.head_dim)
    s0 = (m(q, offset=5, layout="BTHD") * m(k, offset=9, layout="BTHD")).sum(-1)
    s1 = (m(q, offset=1005, layout="BTHD") * m(k, offset=1009, layout="BTHD")).sum(-1)
    steps = torch.cat([m(x[:, t : t + 1], offset=offset + t) for t in range(x.shape[1])], dim=1)
    half = Rotary.from_options(m.options)
    half.load_state_dict(m.state_dict())
    yb = half.to(torch.bfloat16)(x.to(torch.bfloat16), offset=FAR)
    ref_far = _reference(half, x.to(torch.bfloat16).float(), FAR)  # P as the bf16 module holds it
    return {
        "reference": float((y.double() - _reference(m, x, offset)).abs().max()),
        "shift": float((s0 - s1).abs().max()),
        "incremental": float((steps - y).abs().max()),
        "bf16": float(((yb.double() - ref_far).abs() / ref_far.abs().clamp_min(1e-3)).median()),
    }


def timings(m: Rotary, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of one forward+backward over x ``(B, T, dims)``: ``Rotary(mixing=None)``, m (givens) and the
    original module, timed round-robin."""
    xg = x.clone().requires_grad_()
    plain = Rotary(m.dims, m.heads, mixing=None)
    original = OriginalRotary(m.dims, m.heads)  # its planes come from the global RNG: the CLI seeds it

    def step(module, rebuild=False):
        def run():
            if rebuild:
                module.rebuild()  # the original module cannot backward twice through its cached matrices
            out = module(xg)
            torch.autograd.grad(out, [xg, *module.parameters()], torch.ones_like(out))

        return run

    fns = {"Rotary(mixing=None)": step(plain), "Rotary(givens)": step(m), "original module": step(original, True)}
    return {k: median(v) for k, v in time_interleaved(fns, device=torch.device("cpu"), repeats=repeats).items()}
