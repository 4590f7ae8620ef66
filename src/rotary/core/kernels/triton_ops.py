"""The Triton kernel as registered ops with autograd: ``torch.compile`` traces them without a graph break, and sees
the kernel.

``rotary::rope_fwd`` and ``rotary::rope_bwd`` are ``torch.library.triton_op``s: their bodies allocate with torch
ops and launch through ``torch.library.wrap_triton`` (:mod:`rotary.core.kernels.triton_launch`), so under
``torch.compile`` they decompose into those ops and a ``triton_kernel_wrapper_functional`` node Inductor can
schedule (a ``custom_op`` would stay opaque); eager calls launch directly. (wrap_triton outside a triton_op is
what broke compile in flash-attn#1680.) Their fake implementations (below) replace the bodies triton_op would
trace for shapes: shapes only, no kernel analysis. This module is imported only when a Triton launch is wanted
(:mod:`rotary.core.kernels.dispatch`).

Tensors are already in the kernel's orientation ``(A, T, H, D)`` (see :mod:`rotary.core.kernels.triton_kernel`) and
validated by :mod:`rotary.core.kernels.apply`. Outputs a call does not have (no keys, no Givens gradient) are empty
tensors: custom ops return tensors, not None.

cos/sin gradients (learned frequencies, learned N-D directions, a learned table): the kernel writes per-channel
terms ``(A, ROWS, 1 | H, D)``; here the two channels of each pair are added and the result reduced to cos's own
shape (given cos/sin) or added into the table rows the positions read (a table).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import triton_launch

__all__ = ["rope_forward", "rope_inplace"]

# torch.library.triton_op is torch >= 2.6; before it, the same bodies as custom ops (opaque, traced whole all the same)
_op = getattr(torch.library, "triton_op", torch.library.custom_op)


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _givens(c, s, partner):
    return None if c is None else (c.detach().float().contiguous(), s.detach().float().contiguous(), partner)


def _keys_shift(x: Tensor, k: Tensor | None) -> tuple[int, int]:
    """(shift of x, rows): queries are the last ``Tq`` of the key rows."""
    return (0, x.shape[1]) if k is None else (k.shape[1] - x.shape[1], k.shape[1])


@_op("rotary::rope_fwd", mutates_args=())
def _rope_fwd(x: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, positions: Tensor | None,
              offsets: Tensor | None, c: Tensor | None, s: Tensor | None, partner: Tensor | None, offset: int,
              table: bool, interleaved: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    y = torch.empty_like(x, dtype=out_dtype)  # x's memory order: a transposed view stays one
    yk = _empty(x) if k is None else torch.empty_like(k, dtype=out_dtype)
    shift, _ = _keys_shift(x, k)
    triton_launch.forward(x, y, cos, sin, interleaved=interleaved, x2=k, o2=None if k is None else yk,
                          shift1=shift, table=table, positions=positions, offsets=offsets, offset=offset,
                          givens=_givens(c, s, partner))
    return y, yk


@_rope_fwd.register_fake
def _(x, k, cos, sin, positions, offsets, c, s, partner, offset, table, interleaved, out_dtype):
    yk = _empty(x) if k is None else torch.empty_like(k, dtype=out_dtype)
    return torch.empty_like(x, dtype=out_dtype), yk


@_op("rotary::rope_bwd", mutates_args=())
def _rope_bwd(gy: Tensor, gk: Tensor | None, x: Tensor | None, k: Tensor | None, cos: Tensor, sin: Tensor,
              positions: Tensor | None, offsets: Tensor | None, c: Tensor | None, s: Tensor | None,
              partner: Tensor | None, offset: int, table: bool, interleaved: bool, need_cs: bool, need_trig: bool,
              x_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    gx = torch.empty_like(gy, dtype=x_dtype)
    gxk = _empty(gy) if gk is None else torch.empty_like(gk, dtype=x_dtype)
    shift, _ = _keys_shift(gy, gk)
    cs, tc, ts = triton_launch.backward(
        gy, gx, x, cos, sin, interleaved=interleaved, g2=gk, gx2=None if gk is None else gxk, x2=k, shift1=shift,
        table=table, positions=positions, offsets=offsets, offset=offset, givens=_givens(c, s, partner),
        need_cs=need_cs, need_trig=need_trig)
    def e():  # outputs must not alias one another: an empty tensor each
        return gy.new_empty(0, dtype=torch.float32)

    return gx, gxk, e() if cs is None else cs, e() if tc is None else tc, e() if ts is None else ts


@_rope_bwd.register_fake
def _(gy, gk, x, k, cos, sin, positions, offsets, c, s, partner, offset, table, interleaved, need_cs, need_trig,
      x_dtype):
    gxk = _empty(gy) if gk is None else torch.empty_like(gk, dtype=x_dtype)
    f32 = {"dtype": torch.float32, "device": gy.device}
    D = gy.shape[-1]
    _, rows = _keys_shift(gy, gk)
    heads = cos.shape[2] if (not table and cos.dim() == 4) else 1
    cs = torch.empty(2, D, **f32) if need_cs else torch.empty(0, **f32)
    tc = torch.empty(gy.shape[0], rows, heads, D, **f32) if need_trig else torch.empty(0, **f32)
    return torch.empty_like(gy, dtype=x_dtype), gxk, cs, tc, torch.empty_like(tc)


def _pairs_sum(terms: Tensor, r2: int, interleaved: bool) -> Tensor:
    """Per-channel terms ``(..., D)`` -> per pair ``(..., r/2)``: the two members of each pair added."""
    if interleaved:
        return terms[..., : 2 * r2].unflatten(-1, (r2, 2)).sum(-1)
    return terms[..., :r2] + terms[..., r2 : 2 * r2]


def _trig_grad(terms: Tensor, like: Tensor, table: bool, positions, offsets, offset: int, interleaved: bool):
    """The gradient of cos (or sin) from the kernel's terms ``(A, ROWS, 1 | H, D)``, in ``like``'s shape."""
    g = _pairs_sum(terms, like.shape[-1], interleaved)  # (A, ROWS, 1 | H, r/2)
    if not table:
        return g.sum_to_size(like.shape).to(like.dtype)
    A, rows = g.shape[0], g.shape[1]
    g = g.sum(2)  # (A, ROWS, r/2)
    if positions is not None:
        index = positions.expand(A, rows)
    else:
        base = torch.full((A, 1), offset, dtype=torch.long, device=g.device)
        index = (base if offsets is None else base + offsets.view(A, 1)) + torch.arange(rows, device=g.device)
    out = torch.zeros(like.shape, dtype=torch.float32, device=g.device)
    return out.index_put_((index.reshape(-1),), g.reshape(-1, g.shape[-1]), accumulate=True).to(like.dtype)


def _setup(ctx, inputs, output):
    x, k, cos, sin, positions, offsets, c, s, partner, offset, table, interleaved, _ = inputs
    ctx.need_cs = c is not None and (c.requires_grad or s.requires_grad)
    ctx.need_trig = cos.requires_grad or sin.requires_grad
    keep = ctx.need_cs or ctx.need_trig
    ctx.save_for_backward(x if keep else None, k if keep else None, cos, sin, positions, offsets, c, s, partner)
    ctx.offset, ctx.table, ctx.interleaved = offset, table, interleaved
    ctx.x_dtype, ctx.has_k = x.dtype, k is not None


def _backward(ctx, gy, gk):
    x, k, cos, sin, positions, offsets, c, s, partner = ctx.saved_tensors
    gk = gk if ctx.has_k else None  # (autograd materialises the gradient of an unused output as zeros)
    gx, gxk, cs, tc, ts = _rope_bwd(gy, gk, x, k, cos, sin, positions, offsets, c, s, partner, ctx.offset,
                                    ctx.table, ctx.interleaved, ctx.need_cs, ctx.need_trig, ctx.x_dtype)
    grad_c = grad_s = grad_cos = grad_sin = None
    if ctx.need_cs:
        grad_c, grad_s = cs[0].to(c.dtype), cs[1].to(s.dtype)
    if ctx.need_trig:
        args = (ctx.table, positions, offsets, ctx.offset, ctx.interleaved)
        grad_cos, grad_sin = _trig_grad(tc, cos, *args), _trig_grad(ts, sin, *args)
    return (gx, gxk if ctx.has_k else None, grad_cos, grad_sin, None, None, grad_c, grad_s, None, None, None,
            None, None)


_rope_fwd.register_autograd(_backward, setup_context=_setup)


def rope_forward(x, k, cos, sin, positions, offsets, givens, offset, table, interleaved, out_dtype):
    """``(R G x, R G k)`` (the second None without k) through the registered op."""
    c, s, partner = givens if givens is not None else (None, None, None)
    y, yk = _rope_fwd(x, k, cos, sin, positions, offsets, c, s, partner, offset, table, interleaved, out_dtype)
    return y, (yk if k is not None else None)


class _Inplace(torch.autograd.Function):
    """In place, eager: x (and k) overwritten by the launch; backward is the inverse rotation of the gradient,
    which needs neither x nor k (in place is refused where a gradient would need them)."""

    @staticmethod
    def forward(ctx, x, k, cos, sin, positions, offsets, givens, offset, table, interleaved):
        shift, _ = _keys_shift(x, k)
        triton_launch.forward(x, x, cos, sin, interleaved=interleaved, x2=k, o2=k, shift1=shift, table=table,
                              positions=positions, offsets=offsets, offset=offset, givens=_givens(*givens)
                              if givens is not None else None, eager=True)
        ctx.mark_dirty(*([x] if k is None else [x, k]))
        ctx.args = (cos, sin, positions, offsets, givens, offset, table, interleaved)
        ctx.has_k = k is not None
        return (x, k) if k is not None else (x, None)

    @staticmethod
    def backward(ctx, gy, gk):
        cos, sin, positions, offsets, givens, offset, table, interleaved = ctx.args
        c, s, partner = givens if givens is not None else (None, None, None)
        has_k = ctx.has_k
        gk = gk if has_k else None
        gx, gxk, _, _, _ = _rope_bwd(gy, gk, None, None, cos, sin, positions, offsets, c, s, partner, offset,
                                     table, interleaved, False, False, gy.dtype)
        return gx, (gxk if has_k else None), None, None, None, None, None, None, None, None


def rope_inplace(x, k, cos, sin, positions, offsets, givens, offset, table, interleaved):
    """``R G x`` (and k) written into x (and k); eager launches, a copy of the op's result under compile."""
    if torch.compiler.is_compiling():
        y, yk = rope_forward(x, k, cos, sin, positions, offsets, givens, offset, table, interleaved, x.dtype)
        x.copy_(y)
        if k is not None:
            k.copy_(yk)
        return x, k
    return _Inplace.apply(x, k, cos, sin, positions, offsets, givens, offset, table, interleaved)
