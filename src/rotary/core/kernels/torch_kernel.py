"""The torch kernel: ``y = R(cos, sin) G x`` with an optional sparse Givens mixing G (which kernel runs:
:func:`rotary.core.kernels.choose`).

Shapes: B batch, T sequence, H heads, D head_dim, r rotary_dim (even, <= D). Inside this module cos/sin are
already shaped to broadcast against ``x[..., :r/2]`` (e.g. ``(T, 1, r/2)`` for x ``(B, T, H, D)``).

Why the eager path is hand-written: RoPE is memory-bound. Written as autograd-visible elementwise ops
(``x1 * cos - x2 * sin`` ...), forward and backward each make five to eight passes over x and keep temporaries
alive for backward. Here the forward is one complex multiply written into one fresh buffer (the interleaved
layout is exactly a complex multiply by ``cos + i sin``), and the backward is the same multiply by the
conjugate: nothing but the small cos/sin is saved. (On CPU, buffers above 32 MiB are first filled by a copy and
rotated in place: see ``_COPY_FIRST_BYTES``.) Low-precision inputs are upcast once, rotated in float32 and
rounded once, so bf16 output carries a single rounding.

Under ``torch.compile`` (and when cos/sin need gradients, i.e. learned frequencies) the same maths runs as plain
differentiable ops: Inductor fuses them into one kernel, better than any hand-written eager sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["complex_viewable", "compute_dtype", "rope_into", "rotate_torch"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is rotated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def complex_viewable(t: Tensor) -> bool:
    """Whether ``view_as_complex`` can read t's last dim as pairs (float32/64, unit stride, even strides)."""
    # view_as_complex needs unit stride on the pair axis and even strides/offset elsewhere.
    return (
        t.dtype in (torch.float32, torch.float64)
        and t.stride(-1) == 1
        and t.storage_offset() % 2 == 0
        and all(s % 2 == 0 for s in t.stride()[:-1])
    )


def rope_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, rot: Tensor | None = None) -> None:
    """``out[..., :r] = R x[..., :r]`` (out may be x, or alias it); channels past r are copied otherwise.

    Use ``-sin`` for the inverse rotation R^T. x and out are float32/float64 of equal shape. rot: ``cos + i sin``
    if the caller has it already (the inference path keeps a complex table).
    """
    half = cos.shape[-1]
    r = 2 * half
    # Aliased views (out[i] and x[i] of one buffer) are the in-place case too, whatever the Python objects.
    in_place = out is x or (out.data_ptr() == x.data_ptr() and out.stride() == x.stride())
    xr, outr = x[..., :r], out[..., :r]
    if not in_place and r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    if interleaved and complex_viewable(xr) and complex_viewable(outr):
        rot = torch.complex(cos.to(x.dtype), sin.to(x.dtype)) if rot is None or rot.real.dtype != x.dtype else rot
        xc = torch.view_as_complex(xr.unflatten(-1, (half, 2)))
        torch.mul(xc, rot, out=torch.view_as_complex(outr.unflatten(-1, (half, 2))))
        return
    a, b = _pair_views(xr, interleaved)
    oa, ob = _pair_views(outr, interleaved)
    a_in = a.clone() if in_place else a  # in place, a is overwritten before b' needs it
    torch.mul(a, cos, out=oa).addcmul_(b, sin, value=-1)  # a' = a cos - b sin
    torch.mul(b, cos, out=ob).addcmul_(a_in, sin)  # b' = b cos + a sin


def _pair_views(t: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    """The two members of every rotated pair, as views: (2i, 2i+1) or (i, i + r/2)."""
    half = t.shape[-1] // 2
    if interleaved:
        pairs = t.unflatten(-1, (half, 2))
        return pairs[..., 0], pairs[..., 1]
    return t[..., :half], t[..., half:]


def _givens_into(out: Tensor, x: Tensor, c: Tensor, s: Tensor, partner: Tensor) -> None:
    """``out = c * x + s * x[..., partner]``: disjoint plane rotations as one gather and two passes.

    x contiguous; out a different tensor of the same shape; c, s, partner ``(D,)``.
    """
    D = x.shape[-1]
    torch.index_select(x.view(-1, D), 1, partner, out=out.view(-1, D))
    out.mul_(s).addcmul_(x, c)


# On CPU, a fresh buffer above glibc's largest mmap threshold (32 MiB) is returned to the OS when freed, so every
# new one is faulted in page by page; taken inside memcpy those faults cost less than inside the complex-multiply
# kernel (measured on a 2-core x86 VM, (8, 2048, 12, 64) fp32: copy + in-place multiply 1.15x a clone, multiply
# into a fresh buffer 1.27x). Below that size, or on accelerators, the extra pass would only cost.
_COPY_FIRST_BYTES = 32 << 20


def _copy_first(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.numel() * t.element_size() > _COPY_FIRST_BYTES


def _rotated(src: Tensor, owned: bool, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """R src in a buffer of our own: src itself when owned (a fresh upcast or contiguous copy), else a new one."""
    if owned or _copy_first(src):
        out = src if owned else src.clone()
        rope_into(out, out, cos, sin, interleaved)
    else:
        out = torch.empty_like(src)
        rope_into(out, src, cos, sin, interleaved)
    return out


class _Rotary(torch.autograd.Function):
    """Eager fast path. Inputs: x, cos, sin (no grad), optional Givens coefficients c, s with partner."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, c, s, partner, out_dtype):
        cdtype = compute_dtype(x.dtype)
        xc = x.to(cdtype).contiguous()
        if c is not None:
            y = torch.empty_like(xc)
            _givens_into(y, xc, c.to(cdtype), s.to(cdtype), partner)
            rope_into(y, y, cos, sin, interleaved)
        else:
            y = _rotated(xc, xc is not x, cos, sin, interleaved)
        ctx.interleaved = interleaved
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(cos, sin, x if c is not None else None, c, s, partner)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: second derivatives need a differentiable backward
            return _Rotary._differentiable_backward(ctx, grad)
        cos, sin, x, c, s, partner = ctx.saved_tensors
        cdtype = compute_dtype(ctx.x_dtype)
        g = grad.to(cdtype).contiguous()
        if c is None:
            out = _rotated(g, g is not grad, cos, -sin, ctx.interleaved)  # R^T g
            return out.to(ctx.x_dtype), None, None, None, None, None, None, None
        out = g if g is not grad else torch.empty_like(g)  # becomes the gradient of x
        c, s = c.to(cdtype), s.to(cdtype)
        xc = x.to(cdtype).contiguous()
        D = g.shape[-1]
        want = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        grad_c = torch.zeros(D, dtype=cdtype, device=g.device) if want else None
        grad_s = torch.zeros(D, dtype=cdtype, device=g.device) if want else None
        lead = (1,) * (g.dim() - cos.dim())
        cos, sin = cos.reshape(lead + tuple(cos.shape)), sin.reshape(lead + tuple(sin.shape))  # x's rank
        tmp = prod = None
        for xi, ci in _blocks(g, cos):
            ob = out[xi]
            rope_into(ob, g[xi], cos[ci], -sin[ci], ctx.interleaved)  # v = R^T g, written where grad_x goes
            o2, x2 = ob.reshape(-1, D), xc[xi].reshape(-1, D)
            if tmp is None or tmp.numel() < o2.numel():
                tmp = torch.empty(o2.numel(), dtype=cdtype, device=g.device)
                prod = torch.empty_like(tmp) if want else None
            t = tmp[: o2.numel()].view(-1, D)
            torch.index_select(o2, 1, partner, out=t)  # v[partner]: needed for grad_x, and reused below
            if want:
                # dL/dc_d = sum_n v[n, d] x[n, d]; dL/ds_d = sum_n v[n, d] x[n, partner(d)], gathered from
                # sum_n v[n, partner(d)] x[n, d] at the end (partner is an involution): no second gather
                p = prod[: o2.numel()].view(-1, D)
                grad_c += torch.mul(o2, x2, out=p).sum(0)
                grad_s += torch.mul(t, x2, out=p).sum(0)
            # G^T v = c * v - s * v[partner]: the plane rotations by minus their angles, in place
            o2.mul_(c).addcmul_(t, s, value=-1)
        if want:
            grad_s = grad_s[partner]
        return out.to(ctx.x_dtype), None, None, None, grad_c, grad_s, None, None


    @staticmethod
    def _differentiable_backward(ctx, grad):
        """The same gradients as plain differentiable ops (gradient penalties, ``gradgradcheck``): ``R^T g``, and
        with Givens mixing the vector-Jacobian product of the composed forward, built on the saved inputs."""
        cos, sin, x, c, s, partner = ctx.saved_tensors
        none = (None, None, None)
        if c is None:  # R^T g: linear in g, and independent of x
            gx = _rotary_composed(grad, cos, -sin, ctx.interleaved, None, None, None, ctx.x_dtype)
            return gx, None, None, None, *none, None
        with torch.enable_grad():
            leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in (x, c, s)]
            y = _rotary_composed(leaves[0], cos, sin, ctx.interleaved, leaves[1], leaves[2], partner, grad.dtype)
            gx, gc, gs = torch.autograd.grad(y, leaves, grad, create_graph=True)
        return gx.to(ctx.x_dtype), None, None, None, gc, gs, None, None


# The Givens backward runs block by block: each block's gather and seven passes then hit cache, and its
# temporaries are small reused buffers rather than full-size allocations (on CPU, a fresh full-size buffer costs
# more in page faults than its passes cost in arithmetic). On accelerators one block covers everything.
_CPU_BLOCK = 1 << 19  # elements


def _blocks(x: Tensor, cos: Tensor):
    """``(x_index, cos_index)`` pairs tiling x ``(B, T, ...)`` along its first two dims; cos must have x's rank
    (size-1 dims broadcast) and is indexed alike, keeping its size-1 dims whole."""
    cos_shape = list(cos.shape)
    if x.device.type != "cpu" or x.numel() == 0:  # (an empty x: one empty block)
        yield (Ellipsis,), (Ellipsis,)
        return
    step = max(1, _CPU_BLOCK // max(1, x[0, 0].numel()))
    for i in range(x.shape[0]):
        for j in range(0, x.shape[1], step):
            rows = slice(j, j + step)
            ci = (i if cos_shape[0] != 1 else 0, rows if cos_shape[1] != 1 else slice(None))
            yield (i, rows), ci


def _rotary_composed(x, cos, sin, interleaved, c, s, partner, out_dtype):
    """The same maths as plain differentiable ops (torch.compile, learned frequencies)."""
    cdtype = compute_dtype(x.dtype)
    xc = x.to(cdtype)
    if c is not None:
        xc = c.to(cdtype) * xc + s.to(cdtype) * xc.index_select(-1, partner)
    r = 2 * cos.shape[-1]
    cos, sin = cos.to(cdtype), sin.to(cdtype)
    a, b = _pair_views(xc[..., :r], interleaved)
    ya, yb = a * cos - b * sin, b * cos + a * sin
    if interleaved:
        y = torch.stack((ya, yb), dim=-1).flatten(-2)
    else:
        y = torch.cat((ya, yb), dim=-1)
    if r < x.shape[-1]:
        y = torch.cat((y, xc[..., r:]), dim=-1)
    return y.to(out_dtype)


def rotate_torch(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool, givens=None, out_dtype=None) -> Tensor:
    """``R G x`` with cos/sin broadcastable to ``x[..., :r/2]``; no validation (the caller:
    :func:`rotary.core.kernels.rotate`).

    givens: None or ``(c, s, partner)`` from :meth:`rotary.core.mixing.GivensMixing.coefficients`.
    out_dtype: dtype of the result (default x's): lets a float32 intermediate be rounded only once.
    """
    c, s, partner = givens if givens is not None else (None, None, None)
    out_dtype = out_dtype or x.dtype
    if torch.compiler.is_compiling() or cos.requires_grad or sin.requires_grad:
        return _rotary_composed(x, cos, sin, interleaved, c, s, partner, out_dtype)
    return _Rotary.apply(x, cos, sin, interleaved, c, s, partner, out_dtype)
