"""Launches of the Triton kernels of :mod:`rotary.core.triton_kernel` (shapes and maths: see there).

Block sizes, strides (0 on broadcast axes), dummies for unused pointers, the partial sums of the Givens
gradients added up, empty inputs never launched. Imports triton: reached only through
:mod:`rotary.core.triton_ops`, when a Triton launch is wanted.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .triton_kernel import INTERPRETED, bwd_kernel, fwd_kernel

__all__ = ["backward", "forward"]

_TILE = 4096  # elements of one (BLOCK_T, BLOCK_H, BLOCK_D) tile: a few registers per value per thread at 4 warps


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    """Strides of a 4-D view, 0 on size-1 axes (so that broadcast views and fresh ones index alike)."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def _interpreter_out(o: Tensor | None) -> Tensor | None:
    """Under the interpreter, bf16 results are written in float32 and rounded by torch: the interpreter's
    float32 -> bf16 cast truncates, where compiled Triton (and torch) round to nearest even."""
    if o is None or not INTERPRETED or o.dtype != torch.bfloat16:
        return None
    return torch.empty(o.shape, dtype=torch.float32, device=o.device)


def _blocks(D: int, H: int, rows: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_D): every channel of a head in one tile; a few rows, as many heads as fit."""
    block_d = triton.next_power_of_2(D)
    block_t = min(triton.next_power_of_2(max(rows, 1)), 4)
    block_h = min(triton.next_power_of_2(max(H, 1)), max(1, _TILE // (block_d * block_t)))
    return block_t, block_h, block_d


def _trig_args(cos: Tensor, sin: Tensor, table: bool):
    """(cos, sin, scb, sct, sch, per_head): a table ``(rows, R2)`` or given ``(A|1, ROWS|1, H|1, R2)``."""
    if table:
        return cos, sin, 0, cos.stride(0), 0, False
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    scb, sct, sch, _ = _strides(cos)
    return cos, sin, scb, sct, sch, cos.shape[2] > 1


def _pos_args(positions: Tensor | None, offsets: Tensor | None, device):
    """(POS, spa, spt, OFFS, mode) for the table gather; dummies where unused."""
    if positions is not None:
        spa, spt = (0 if positions.shape[0] == 1 else positions.stride(0)), positions.stride(1)
        return positions, spa, spt, positions, 2
    if offsets is not None:
        return offsets, 0, 0, offsets, 1
    dummy = torch.empty(1, dtype=torch.int64, device=device)
    return dummy, 0, 0, dummy, 0


def forward(x1: Tensor, o1: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool, x2: Tensor | None = None,
            o2: Tensor | None = None, shift1: int = 0, shift2: int = 0, table: bool = False,
            positions: Tensor | None = None, offsets: Tensor | None = None, offset: int = 0,
            givens: tuple[Tensor, Tensor, Tensor] | None = None, inplace: bool = False) -> None:
    """Write ``R G x_n`` into ``o_n`` (n = 1, 2), all ``(A, T_n, H_n, D)`` views (``o_n`` may be ``x_n``: then
    ``inplace=True``). cos/sin: a float32 table ``(rows, R2)`` (``table=True``; positions ``(A|1, ROWS)`` int,
    offsets ``(A,)`` int, offset int) or ``(A|1, ROWS|1, H|1, R2)``. givens: ``(c, s, partner)`` float32 ``(D,)``,
    ``(D,)``, int ``(D,)``. Inputs are not validated here: :mod:`rotary.core.kernel` does that before launching."""
    if x2 is not None and x1.numel() == 0:  # nothing to read in x1 (no queries): k alone
        x1, o1, shift1, x2, o2 = x2, o2, shift2, None, None
    if x1.numel() == 0 or (x2 is not None and x2.numel() == 0):
        if x1.numel():
            forward(x1, o1, cos, sin, interleaved=interleaved, shift1=shift1, table=table, positions=positions,
                    offsets=offsets, offset=offset, givens=givens, inplace=inplace)
        return  # an empty launch would still hand the kernel pointers it must not touch
    A, T1, H1, D = x1.shape
    R2 = cos.shape[-1]
    rows = max(T1 + shift1, 0 if x2 is None else x2.shape[1] + shift2)
    x2_, o2_ = (x1, o1) if x2 is None else (x2, o2)
    cos, sin, scb, sct, sch, per_head = _trig_args(cos, sin, table)
    POS, spa, spt, OFFS, mode = _pos_args(positions, offsets, x1.device)
    C, S, P = givens if givens is not None else (cos, cos, POS)
    block_t, block_h, block_d = _blocks(D, max(H1, x2_.shape[2]), rows)
    grid = (triton.cdiv(rows, block_t), A)
    t1, t2 = _interpreter_out(o1), _interpreter_out(None if x2 is None else o2_)
    w1, w2 = (o1 if t1 is None else t1), (o2_ if t2 is None else t2)
    fwd_kernel[grid](
        x1, w1, *x1.stride(), *w1.stride(), H1, T1, shift1,
        x2_, w2, *x2_.stride(), *w2.stride(), x2_.shape[2], x2_.shape[1], shift2,
        cos, sin, scb, sct, sch, POS, spa, spt, OFFS, offset, rows, C, S, P,
        D=D, R2=R2, INTERLEAVED=interleaved, GIVENS=givens is not None, TABLE=table, POS_MODE=mode,
        PER_HEAD=per_head, HAS_X2=x2 is not None, INPLACE=inplace and t1 is None,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
    )
    for o, t in ((o1, t1), (o2_, t2)):
        if t is not None:
            o.copy_(t)


def backward(g1: Tensor, gx1: Tensor, x1: Tensor | None, cos: Tensor, sin: Tensor, *, interleaved: bool,
             g2: Tensor | None = None, gx2: Tensor | None = None, x2: Tensor | None = None, shift1: int = 0,
             shift2: int = 0, table: bool = False, positions: Tensor | None = None, offsets: Tensor | None = None,
             offset: int = 0, givens: tuple[Tensor, Tensor, Tensor] | None = None, need_cs: bool = False,
             need_trig: bool = False) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Write ``G^T R^T g_n`` into ``gx_n``; x_n (the forward's inputs) are read only for ``need_cs`` (gradients of
    the Givens c, s) and ``need_trig`` (of cos/sin, given ones only).

    Returns ``(grad_cs, grad_cos, grad_sin)``: ``(2, D)`` float32 (c then s) or None; per-channel cos/sin terms
    ``(A, ROWS, 1 | H, D)`` float32 or None, for tensor 1 and 2 together (per-head cos/sin: summed here). The
    caller adds the two channels of each pair and reduces to cos's own shape.
    """
    A, T1, H1, D = g1.shape
    R2 = cos.shape[-1]
    rows = max(T1 + shift1, 0 if g2 is None else g2.shape[1] + shift2)
    if g1.numel() == 0 or (g2 is not None and g2.numel() == 0):
        return _empty_backward(g1, gx1, x1, cos, sin, g2, gx2, x2, rows, shift1, shift2, need_cs, need_trig,
                               interleaved=interleaved, table=table, positions=positions, offsets=offsets,
                               offset=offset, givens=givens)
    x1 = g1 if x1 is None else x1  # never read unless needed; any pointer of the right kind
    g2_, gx2_, x2_ = (g1, gx1, x1) if g2 is None else (g2, gx2, g2 if x2 is None else x2)
    cos, sin, scb, sct, sch, per_head = _trig_args(cos, sin, table)
    POS, spa, spt, OFFS, mode = _pos_args(positions, offsets, g1.device)
    C, S, P = givens if givens is not None else (cos, cos, POS)
    block_t, block_h, block_d = _blocks(D, max(H1, g2_.shape[2]), rows)
    grid = (triton.cdiv(rows, block_t), A)
    f32 = {"dtype": torch.float32, "device": g1.device}
    partial = torch.empty(grid[0] * grid[1], 2, D, **f32) if need_cs else cos
    gcos1 = gsin1 = gcos2 = gsin2 = cos
    trig_heads = H1 if per_head else 1
    if need_trig:
        gcos1, gsin1 = (torch.empty(A, rows, trig_heads, D, **f32) for _ in range(2))
        gcos2, gsin2 = (gcos1, gsin1)
        if per_head and g2 is not None:
            gcos2, gsin2 = (torch.empty(A, rows, trig_heads, D, **f32) for _ in range(2))
    if need_trig and per_head and g2 is not None and shift2 != shift1:
        gcos1.zero_(), gsin1.zero_(), gcos2.zero_(), gsin2.zero_()  # rows one tensor does not cover stay 0
    t1, t2 = _interpreter_out(gx1), _interpreter_out(None if g2 is None else gx2_)
    w1, w2 = (gx1 if t1 is None else t1), (gx2_ if t2 is None else t2)
    bwd_kernel[grid](
        g1, w1, x1, *g1.stride(), *w1.stride(), *x1.stride(), H1, T1, shift1,
        g2_, w2, x2_, *g2_.stride(), *w2.stride(), *x2_.stride(), g2_.shape[2], g2_.shape[1], shift2,
        cos, sin, scb, sct, sch, POS, spa, spt, OFFS, offset, rows, C, S, P, partial,
        gcos1, gsin1, gcos2, gsin2, rows * trig_heads * D, trig_heads * D, D,
        D=D, R2=R2, INTERLEAVED=interleaved, GIVENS=givens is not None, NEED_CS=need_cs, NEED_TRIG=need_trig,
        TABLE=table, POS_MODE=mode, PER_HEAD=per_head, HAS_X2=g2 is not None,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
    )
    for o, t in ((gx1, t1), (gx2_, t2)):
        if t is not None:
            o.copy_(t)
    grad_cs = partial.sum(0) if need_cs else None
    if not need_trig:
        return grad_cs, None, None
    if per_head and g2 is not None:
        gcos1, gsin1 = gcos1 + gcos2, gsin1 + gsin2
    return grad_cs, gcos1, gsin1



def _empty_backward(g1, gx1, x1, cos, sin, g2, gx2, x2, rows, shift1, shift2, need_cs, need_trig, **kw):
    """:func:`backward` where a tensor has no elements: the other one alone, zeros for whatever it misses."""
    A, D = g1.shape[0], g1.shape[-1]
    f32 = {"dtype": torch.float32, "device": g1.device}
    heads = cos.shape[2] if (not kw["table"] and cos.dim() == 4 and cos.shape[2] > 1) else 1
    cs, tc, ts = (torch.zeros(2, D, **f32) if need_cs else None), None, None
    if need_trig:
        tc, ts = torch.zeros(A, rows, heads, D, **f32), torch.zeros(A, rows, heads, D, **f32)
    for g, gx, x, shift in ((g1, gx1, x1, shift1), (g2, gx2, x2, shift2)):
        if g is None or g.numel() == 0:
            continue
        c1, t1, s1 = backward(g, gx, x, cos, sin, shift1=shift, need_cs=need_cs, need_trig=need_trig, **kw)
        cs = c1 if cs is None else cs + c1
        if need_trig:
            tc[:, : t1.shape[1]] += t1
            ts[:, : s1.shape[1]] += s1
    return cs, tc, ts
