"""Launches of the Triton kernels of :mod:`rotary.core.kernels.triton_kernel` (shapes and maths: see there).

Block sizes, strides (0 on broadcast axes), dummies for unused pointers, the partial sums of the Givens
gradients added up, empty inputs never launched. Imports triton: reached only through
:mod:`rotary.core.kernels.triton_ops`, when a Triton launch is wanted.

:data:`VARIANTS` lists every kernel the launcher can produce (its constexpr switches); a launch looks its switches
up there, so a new switch or value must be listed, and the ahead-of-time test (``tests/test_triton_aot.py``)
compiles every listed one for real GPUs through :func:`aot_launch`.
"""

from __future__ import annotations

from itertools import product
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from .triton_kernel import INTERPRETED, bwd_kernel, fwd_kernel

__all__ = ["VARIANTS", "Variant", "aot_launch", "backward", "forward"]


def _tile(x: Tensor, givens, need_trig: bool = False) -> int:
    """Elements of one (BLOCK_T, BLOCK_H, BLOCK_D) tile: one 128-bit access per thread (4 warps: 128 threads x 16
    bytes; 1024 elements of bf16, 512 of float32). At 4096 the Givens and per-head variants took up to 255
    registers and spilled. The Givens backward that also sums the cos/sin gradients keeps more tiles alive (150
    registers at 1024 bf16): half the tile (64-bit accesses) keeps it under 128. Registers per variant:
    tests/test_triton_aot.py, docs/speed.md."""
    tile = 128 * 16 // x.element_size()
    return tile // 2 if givens is not None and need_trig else tile


class Variant(NamedTuple):
    """The constexpr switches of one compiled kernel. Shapes aside: D, R2 and the block sizes follow the tensors,
    and the tensors' dtypes and alignment specialise it further."""

    backward: bool
    interleaved: bool
    trig: str  # "table" (gathered at positions), "given" (A|1, T, 1, R2) or "per_head" (A|1, T, H, R2)
    pos_mode: int  # table: 0 rows at offset + row, 1 at offset + offsets[a] + row, 2 at positions[a, row]; else 0
    givens: bool
    has_x2: bool  # q and k in one launch
    need_cs: bool = False  # backward: gradients of the Givens c, s
    need_trig: bool = False  # backward: gradients of cos/sin

    def constexprs(self) -> dict:
        out = dict(INTERLEAVED=self.interleaved, GIVENS=self.givens, TABLE=self.trig == "table",
                   POS_MODE=self.pos_mode, PER_HEAD=self.trig == "per_head", HAS_X2=self.has_x2)
        if self.backward:
            out.update(NEED_CS=self.need_cs, NEED_TRIG=self.need_trig)
        return out


def _variants() -> tuple[Variant, ...]:
    trigs = [("table", 0), ("table", 1), ("table", 2), ("given", 0), ("per_head", 0)]
    out = []
    for backward, interleaved, (trig, mode), givens, has_x2 in product((False, True), (False, True), trigs,
                                                                        (False, True), (False, True)):
        grads = [(False, False)]
        if backward:  # c/s gradients exist with Givens only
            grads = list(product((False, True) if givens else (False,), (False, True)))
        out += [Variant(backward, interleaved, trig, mode, givens, has_x2, cs, tr) for cs, tr in grads]
    return tuple(out)


VARIANTS = _variants()
_CONSTEXPRS = {v: v.constexprs() for v in VARIANTS}  # a launch outside VARIANTS is a KeyError


def _launch(kernel, grid, args: tuple, meta: dict, written: tuple[Tensor, ...], eager: bool) -> None:
    """``kernel[grid](*args, **meta)`` through ``torch.library.wrap_triton``: under tracing the launch becomes a
    node of the graph (the ops are triton_ops, whose eager calls launch directly); ``eager``: a call outside the
    ops, launched as it is (through wrap_triton outside an op, every launch would go through the higher-order op).

    Under ``TRITON_INTERPRET=1`` (the tests on CPU) wrap_triton hands the kernel back unwrapped, which tracing
    cannot see: a JITFunction of the same source that launches through the interpreter stands in. Tracing cannot
    lower it for a GPU to find what it writes, and then takes every tensor it is handed as written: there the
    kernel reads copies (and writes a copy of any dummy output), so that no input of a compiled graph looks
    mutated. ``written``: the tensors the launch writes (each once among the kernel's output arguments)."""
    if eager:
        kernel[grid](*args, **meta)
        return
    if INTERPRETED:
        kernel, kept, copied = _INTERPRETED_JIT[kernel], [], []
        for n, a in zip(kernel.arg_names, args):
            keep = n in _OUTPUTS and any(a is w for w in written) and all(a is not k for k in kept)
            kept += [a] if keep else []
            copied.append(_copy(a) if isinstance(a, Tensor) and not keep else a)
        args = tuple(copied)
    _wrap(kernel)[grid](*args, **meta)


_wrap = getattr(torch.library, "wrap_triton", lambda kernel: kernel)  # torch >= 2.6 (before: custom ops, opaque)


def _copy(t: Tensor) -> Tensor:
    """A copy with t's strides (the launch's arguments were computed from them); a broadcast view (a 0 stride,
    never written) as it is."""
    if 0 in t.stride():
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


_OUTPUTS = {"O1", "O2", "GX1", "GX2", "PARTIAL", "GCOS1", "GSIN1", "GCOS2", "GSIN2"}  # the kernels' output arguments


if INTERPRETED:
    class _InterpretedJIT(triton.runtime.jit.JITFunction):
        def __init__(self, interpreted):
            super().__init__(interpreted.fn)
            self.interpreted = interpreted

        def __getitem__(self, grid):
            return self.interpreted[grid]

        @property
        def cache_key(self):  # (a JITFunction's hashes its callees, which here are interpreted ones)
            return self.src

    _INTERPRETED_JIT = {k: _InterpretedJIT(k) for k in (fwd_kernel, bwd_kernel)}


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    """Strides of a 4-D view, 0 on size-1 axes (so that broadcast views and fresh ones index alike)."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def _interpreter_out(o: Tensor | None) -> Tensor | None:
    """Under the interpreter, bf16 results are written in float32 and rounded by torch: the interpreter's
    float32 -> bf16 cast truncates, where compiled Triton (and torch) round to nearest even."""
    if o is None or not INTERPRETED or o.dtype != torch.bfloat16:
        return None
    return torch.empty(o.shape, dtype=torch.float32, device=o.device)


def _blocks(D: int, H: int, rows: int, tile: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_D): every channel of a head in one tile; up to 4 rows, leaving room for 2 heads (1
    row when decoding: a test dynamo already makes, sizes 0 and 1 being specialised, so no new guard under
    compile), as many heads as fit. (At 512 elements of bf16, 4 rows of 1 head made ptxas spill 4 bytes in the
    Givens backward with cos/sin gradients, at 80 registers.)"""
    block_d = triton.next_power_of_2(D)
    block_t = 1 if rows == 1 else max(1, min(4, tile // (2 * block_d)))
    block_h = min(triton.next_power_of_2(max(H, 1)), max(1, tile // (block_d * block_t)))
    return block_t, block_h, block_d


def _trig_args(cos: Tensor, sin: Tensor, table: bool):
    """(cos, sin, scb, sct, sch, trig): a table ``(rows, R2)`` or given ``(A|1, ROWS|1, H|1, R2)``."""
    if table:
        return cos, sin, 0, cos.stride(0), 0, "table"
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    scb, sct, sch, _ = _strides(cos)
    return cos, sin, scb, sct, sch, "per_head" if cos.shape[2] > 1 else "given"


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
            givens: tuple[Tensor, Tensor, Tensor] | None = None, eager: bool = False) -> None:
    """Write ``R G x_n`` into ``o_n`` (n = 1, 2), all ``(A, T_n, H_n, D)`` views (``o_n`` may be ``x_n``: in
    place). cos/sin: a float32 table ``(rows, R2)`` (``table=True``; positions ``(A|1, ROWS)`` int, offsets
    ``(A,)`` int, offset int) or ``(A|1, ROWS|1, H|1, R2)``. givens: ``(c, s, partner)`` float32 ``(D,)``,
    ``(D,)``, int ``(D,)``. eager: called outside the registered ops (never traced). Inputs are not validated
    here: :mod:`rotary.core.kernels.apply` does that before launching."""
    if x2 is not None and x1.numel() == 0:  # nothing to read in x1 (no queries): k alone
        x1, o1, shift1, x2, o2 = x2, o2, shift2, None, None
    if x1.numel() == 0 or (x2 is not None and x2.numel() == 0):
        if x1.numel():
            forward(x1, o1, cos, sin, interleaved=interleaved, shift1=shift1, table=table, positions=positions,
                    offsets=offsets, offset=offset, givens=givens, eager=eager)
        return  # an empty launch would still hand the kernel pointers it must not touch
    o2_ = o1 if x2 is None else o2
    t1, t2 = _interpreter_out(o1), _interpreter_out(None if x2 is None else o2_)
    w1, w2 = (o1 if t1 is None else t1), (o2_ if t2 is None else t2)
    grid, args, meta = _fwd_args(x1, w1, x2, w2, cos, sin, interleaved=interleaved, shift1=shift1, shift2=shift2,
                                 table=table, positions=positions, offsets=offsets, offset=offset, givens=givens)
    _launch(fwd_kernel, grid, args, meta, (w1,) if x2 is None else (w1, w2), eager)
    for o, t in ((o1, t1), (o2_, t2)):
        if t is not None:
            o.copy_(t)


def _fwd_args(x1, o1, x2, o2, cos, sin, *, interleaved, shift1, shift2, table, positions, offsets, offset, givens):
    """(grid, arguments, constexprs) of the forward launch writing into o1 (and o2)."""
    A, T1, H1, D = x1.shape
    R2 = cos.shape[-1]
    rows = max(T1 + shift1, 0 if x2 is None else x2.shape[1] + shift2)
    x2_, o2_ = (x1, o1) if x2 is None else (x2, o2)
    cos, sin, scb, sct, sch, trig = _trig_args(cos, sin, table)
    POS, spa, spt, OFFS, mode = _pos_args(positions, offsets, x1.device)
    C, S, P = givens if givens is not None else (cos, cos, POS)
    block_t, block_h, block_d = _blocks(D, max(H1, x2_.shape[2]), rows, _tile(x1, givens))
    grid = (triton.cdiv(rows, block_t), A)
    args = (x1, o1, *x1.stride(), *o1.stride(), H1, T1, shift1,
            x2_, o2_, *x2_.stride(), *o2_.stride(), x2_.shape[2], x2_.shape[1], shift2,
            cos, sin, scb, sct, sch, POS, spa, spt, OFFS, offset, rows, C, S, P)
    variant = Variant(False, interleaved, trig, mode, givens is not None, x2 is not None)
    meta = dict(_CONSTEXPRS[variant], D=D, R2=R2, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d)
    return grid, args, meta


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
    rows = max(g1.shape[1] + shift1, 0 if g2 is None else g2.shape[1] + shift2)
    if g1.numel() == 0 or (g2 is not None and g2.numel() == 0):
        return _empty_backward(g1, gx1, x1, cos, sin, g2, gx2, x2, rows, shift1, shift2, need_cs, need_trig,
                               interleaved=interleaved, table=table, positions=positions, offsets=offsets,
                               offset=offset, givens=givens)
    gx2_ = gx1 if g2 is None else gx2
    t1, t2 = _interpreter_out(gx1), _interpreter_out(None if g2 is None else gx2_)
    w1, w2 = (gx1 if t1 is None else t1), (gx2_ if t2 is None else t2)
    grid, args, meta, (partial, gcos1, gsin1, gcos2, gsin2, per_head) = _bwd_args(
        g1, w1, x1, g2, w2, x2, cos, sin, interleaved=interleaved, shift1=shift1, shift2=shift2, table=table,
        positions=positions, offsets=offsets, offset=offset, givens=givens, need_cs=need_cs, need_trig=need_trig)
    written = (w1,) + ((w2,) if g2 is not None else ()) + ((partial,) if need_cs else ())
    _launch(bwd_kernel, grid, args, meta, written + ((gcos1, gsin1, gcos2, gsin2) if need_trig else ()), False)
    for o, t in ((gx1, t1), (gx2_, t2)):
        if t is not None:
            o.copy_(t)
    grad_cs = partial.sum(0) if need_cs else None
    if not need_trig:
        return grad_cs, None, None
    if per_head and g2 is not None:
        gcos1, gsin1 = gcos1 + gcos2, gsin1 + gsin2
    return grad_cs, gcos1, gsin1


def _bwd_args(g1, gx1, x1, g2, gx2, x2, cos, sin, *, interleaved, shift1, shift2, table, positions, offsets, offset,
              givens, need_cs, need_trig):
    """(grid, arguments, constexprs, (partial, gcos1, gsin1, gcos2, gsin2, per_head)) of the backward launch: the
    last are the buffers it writes the gradients of c/s and cos/sin into."""
    A, T1, H1, D = g1.shape
    R2 = cos.shape[-1]
    rows = max(T1 + shift1, 0 if g2 is None else g2.shape[1] + shift2)
    x1 = g1 if x1 is None else x1  # never read unless needed; any pointer of the right kind
    g2_, gx2_, x2_ = (g1, gx1, x1) if g2 is None else (g2, gx2, g2 if x2 is None else x2)
    cos, sin, scb, sct, sch, trig = _trig_args(cos, sin, table)
    per_head = trig == "per_head"
    POS, spa, spt, OFFS, mode = _pos_args(positions, offsets, g1.device)
    C, S, P = givens if givens is not None else (cos, cos, POS)
    block_t, block_h, block_d = _blocks(D, max(H1, g2_.shape[2]), rows, _tile(g1, givens, need_trig))
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
    args = (g1, gx1, x1, *g1.stride(), *gx1.stride(), *x1.stride(), H1, T1, shift1,
            g2_, gx2_, x2_, *g2_.stride(), *gx2_.stride(), *x2_.stride(), g2_.shape[2], g2_.shape[1], shift2,
            cos, sin, scb, sct, sch, POS, spa, spt, OFFS, offset, rows, C, S, P, partial,
            gcos1, gsin1, gcos2, gsin2, rows * trig_heads * D, trig_heads * D, D)
    variant = Variant(True, interleaved, trig, mode, givens is not None, g2 is not None, need_cs, need_trig)
    meta = dict(_CONSTEXPRS[variant], D=D, R2=R2, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d)
    return grid, args, meta, (partial, gcos1, gsin1, gcos2, gsin2, per_head)


def aot_launch(variant: Variant, dtype: torch.dtype, *, B: int = 8, T: int = 4096, H: int = 32, D: int = 128,
               rotary_dim: int | None = None):
    """(kernel, arguments, constexprs) of the launch that produces ``variant`` for ``(B, T, H, D)`` contiguous
    tensors of ``dtype`` (q and k alike), built on meta tensors (no memory): what
    :func:`rotary.core.kernels.triton_aot.compile_launch` compiles."""
    meta = {"device": "meta"}
    r2 = (rotary_dim or D) // 2
    x = torch.empty(B, T, H, D, dtype=dtype, **meta)
    k = torch.empty(B, T, H, D, dtype=dtype, **meta) if variant.has_x2 else None
    shape = {"table": (2 * T, r2), "given": (B, T, 1, r2), "per_head": (B, T, H, r2)}[variant.trig]
    cos = torch.empty(shape, **meta)
    positions = torch.empty(B, T, dtype=torch.int64, **meta) if variant.pos_mode == 2 else None
    offsets = torch.empty(B, dtype=torch.int64, **meta) if variant.pos_mode == 1 else None
    givens = None
    if variant.givens:
        givens = (torch.empty(D, **meta), torch.empty(D, **meta), torch.empty(D, dtype=torch.int64, **meta))
    kw = dict(interleaved=variant.interleaved, shift1=0, shift2=0, table=variant.trig == "table",
              positions=positions, offsets=offsets, offset=0, givens=givens)
    y, yk = torch.empty_like(x), (None if k is None else torch.empty_like(k))
    if not variant.backward:
        _, args, constexprs = _fwd_args(x, y, k, yk, cos, cos, **kw)
        return fwd_kernel, args, constexprs
    _, args, constexprs, _ = _bwd_args(x, y, x, k, yk, k, cos, cos, need_cs=variant.need_cs,
                                       need_trig=variant.need_trig, **kw)
    return bwd_kernel, args, constexprs


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
