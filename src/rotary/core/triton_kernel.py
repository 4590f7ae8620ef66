"""Triton kernels for the whole rotation ``y = R(cos, sin) G x``: Givens mixing G on fixed planes (or none),
then RoPE R, in one pass over x; and its backward, one pass over the upstream gradient.

This module imports triton and is itself imported only by :mod:`rotary.core.kernel` when a Triton launch is
wanted, so that ``import rotary`` works without triton. Which kernel runs is chosen there.

Shapes. A rotated tensor is seen as 4-D ``(A, T, H, D)`` with arbitrary strides: A the batch, T its rows (tokens),
H the heads the kernel loops over, D head_dim; r = 2 * R2 rotary_dim (even, <= D). A ``(B, T, H, D)`` tensor is
read as it is and a ``(B, H, T, D)`` one through its transposed view: strides, never a copy. Two tensors (q and k)
go through one launch when they share cos/sin: tensor ``n`` is ``(A, T_n, H_n, D)`` with its rows at cos/sin
rows ``shift_n .. shift_n + T_n - 1`` (queries are the last ``Tq`` of the key rows: shift ``Tk - Tq``), and any
head count (grouped-query keys have fewer heads).

cos/sin come either from a table ``(rows, R2)`` float32 (contiguous) gathered inside the kernel at position
``offset + offsets[a] + row`` or ``positions[a, row]`` (no gather launched before the kernel), or as given tensors
``(A | 1, T, H | 1, R2)`` read through strides (0 on broadcast axes), which is how learned frequencies and N-D
directions arrive, and what their gradients are written for.

Maths per channel d (all in float32). Givens: ``m[d] = c[d] x[d] + s[d] x[p(d)]`` with the partner involution p
(see :meth:`rotary.core.mixing.GivensMixing.coefficients`). RoPE: channel d belongs to pair i(d) with partner
q(d) (``(2i, 2i+1)`` interleaved, ``(i, i + R2)`` half) and ``y[d] = cos_i m[d] + sign(d) sin_i m[q(d)]``, sign -1
on a pair's first member (``a' = a cos - b sin``) and +1 on its second (``b' = b cos + a sin``); channels >= r
are ``m[d]`` exactly. Working per output channel (rather than per pair) makes every channel's value a gather of
a few input channels of the same head: the extra loads hit L1, the kernel stays one read and one write of x.

Backward: ``v = R^T g`` (sin negated) and ``gx = G^T v``, ``G^T v[d] = c[d] v[d] + s[p(d)] v[p(d)]``; the gradients
of c and s are ``sum v[d] x[d]`` and ``sum v[d] x[p(d)]`` over tokens and heads (per-program partial sums, added
up by the caller: deterministic, no atomics), those of cos/sin ``g_a m_a + g_b m_b`` and ``g_b m_a - g_a m_b`` per
pair (a, b), summed over heads inside the program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["INTERPRETED", "backward", "forward"]

_TILE = 4096  # elements of one (BLOCK_T, BLOCK_H, BLOCK_D) tile: a few registers per value per thread at 4 warps


@triton.jit
def _pair_of(d, R2: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Channel index tile d -> (pair i, RoPE partner q, sign of sin, rotated?); past 2 * R2: (0, d, 1, False)."""
    rotated = d < 2 * R2
    if INTERLEAVED:
        i = d // 2
        q = d ^ 1
        first = (d % 2) == 0
    else:
        first = d < R2
        i = tl.where(first, d, d - R2)
        q = tl.where(first, d + R2, d - R2)
    i = tl.where(rotated, i, 0)
    q = tl.where(rotated, q, d)
    sign = tl.where(first, -1.0, 1.0)
    return i, q, sign, rotated


@triton.jit
def _trig(COS, SIN, a, rows, rmask, pos, h, i, rot, scb, sct, sch, TABLE: tl.constexpr, PER_HEAD: tl.constexpr):
    """cos/sin at rows ``(BLOCK_T,)`` and pair indices i ``(BLOCK_D,)``: ``(BLOCK_T, 1, BLOCK_D)``, or with per-head
    cos/sin ``(BLOCK_T, BLOCK_H, BLOCK_D)``; 1 and 0 on channels that are not rotated (and on masked rows)."""
    if TABLE:
        off = pos[:, None, None] * sct + i[None, None, :]
        m = rmask[:, None, None] & rot[None, None, :]
    elif PER_HEAD:
        off = a * scb + rows[:, None, None] * sct + h[None, :, None] * sch + i[None, None, :]
        m = rmask[:, None, None] & rot[None, None, :]
    else:
        off = a * scb + rows[:, None, None] * sct + i[None, None, :]
        m = rmask[:, None, None] & rot[None, None, :]
    return tl.load(COS + off, mask=m, other=1.0).to(tl.float32), tl.load(SIN + off, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _fwd_tensor(X, O, sxa, sxt, sxh, sxd, soa, sot, soh, sod, H, T_x, shift,
                a, rows, rmask, pos, cos, sin, COS, SIN, scb, sct, sch,
                d, dmask, i, q, sign, rot, c_d, s_d, p_d, c_q, s_q, p_q,
                GIVENS: tl.constexpr, TABLE: tl.constexpr, PER_HEAD: tl.constexpr, INPLACE: tl.constexpr,
                BLOCK_H: tl.constexpr):
    t = rows - shift  # this tensor's tokens; rows outside [shift, shift + T_x) are masked
    tmask = rmask & (t >= 0) & (t < T_x)
    xrow = X + a * sxa + t.to(tl.int64)[:, None, None] * sxt
    orow = O + a * soa + t.to(tl.int64)[:, None, None] * sot
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = tmask[:, None, None] & (h < H)[None, :, None] & dmask[None, None, :]
        xh = xrow + h[None, :, None] * sxh
        if GIVENS:
            x_d = tl.load(xh + d[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            x_p = tl.load(xh + p_d[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            x_q = tl.load(xh + q[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            x_pq = tl.load(xh + p_q[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            m_d = c_d[None, None, :] * x_d + s_d[None, None, :] * x_p
            m_q = c_q[None, None, :] * x_q + s_q[None, None, :] * x_pq
        else:
            m_d = tl.load(xh + d[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            m_q = tl.load(xh + q[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        if PER_HEAD:  # (names of their own: a loop-carried variable must keep its shape)
            cos_h, sin_h = _trig(COS, SIN, a, rows, rmask, pos, h, i, rot, scb, sct, sch, TABLE, PER_HEAD)
        else:
            cos_h, sin_h = cos, sin
        y = tl.where(rot[None, None, :], cos_h * m_d + sign[None, None, :] * sin_h * m_q, m_d)
        if INPLACE:
            tl.debug_barrier()  # every thread has read its channels (and their partners) before any is overwritten
        tl.store(orow + h[None, :, None] * soh + d[None, None, :] * sod, y.to(O.dtype.element_ty), mask=m)


@triton.jit
def _fwd_kernel(X1, O1, sx1a, sx1t, sx1h, sx1d, so1a, so1t, so1h, so1d, H1, T1, shift1,
                X2, O2, sx2a, sx2t, sx2h, sx2d, so2a, so2t, so2h, so2d, H2, T2, shift2,
                COS, SIN, scb, sct, sch, POS, spa, spt, OFFS, offset, ROWS, C, S, P,
                D: tl.constexpr, R2: tl.constexpr, INTERLEAVED: tl.constexpr, GIVENS: tl.constexpr,
                TABLE: tl.constexpr, POS_MODE: tl.constexpr, PER_HEAD: tl.constexpr, HAS_X2: tl.constexpr,
                INPLACE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: rows ``pid0 * BLOCK_T ...`` of batch row ``pid1``, every head of both tensors.

    POS_MODE (table only): 0 rows at ``offset + row``, 1 at ``offset + OFFS[a] + row``, 2 at ``POS[a, row]``.
    """
    a = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < ROWS
    pos = rows
    if TABLE:
        if POS_MODE == 0:
            pos = rows.to(tl.int64) + offset
        elif POS_MODE == 1:
            pos = rows.to(tl.int64) + offset + tl.load(OFFS + a)
        else:
            pos = tl.load(POS + a * spa + rows * spt, mask=rmask, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    i, q, sign, rot = _pair_of(d, R2, INTERLEAVED)
    c_d = tl.full([BLOCK_D], 1.0, tl.float32)
    s_d = tl.zeros([BLOCK_D], dtype=tl.float32)
    c_q = c_d
    s_q = s_d
    p_d = d
    p_q = d
    if GIVENS:
        c_d = tl.load(C + d, mask=dmask, other=1.0)
        s_d = tl.load(S + d, mask=dmask, other=0.0)
        p_d = tl.load(P + d, mask=dmask, other=0).to(tl.int32)
        c_q = tl.load(C + q, mask=dmask, other=1.0)
        s_q = tl.load(S + q, mask=dmask, other=0.0)
        p_q = tl.load(P + q, mask=dmask, other=0).to(tl.int32)
    h = tl.arange(0, BLOCK_H)
    cos, sin = _trig(COS, SIN, a, rows, rmask, pos, h, i, rot, scb, sct, sch, TABLE, False)
    _fwd_tensor(X1, O1, sx1a, sx1t, sx1h, sx1d, so1a, so1t, so1h, so1d, H1, T1, shift1,
                a, rows, rmask, pos, cos, sin, COS, SIN, scb, sct, sch,
                d, dmask, i, q, sign, rot, c_d, s_d, p_d, c_q, s_q, p_q,
                GIVENS, TABLE, PER_HEAD, INPLACE, BLOCK_H)
    if HAS_X2:
        _fwd_tensor(X2, O2, sx2a, sx2t, sx2h, sx2d, so2a, so2t, so2h, so2d, H2, T2, shift2,
                    a, rows, rmask, pos, cos, sin, COS, SIN, scb, sct, sch,
                    d, dmask, i, q, sign, rot, c_d, s_d, p_d, c_q, s_q, p_q,
                    GIVENS, TABLE, PER_HEAD, INPLACE, BLOCK_H)


@triton.jit
def _bwd_tensor(G, GX, X, sga, sgt, sgh, sgd, soa, sot, soh, sod, sxa, sxt, sxh, sxd, H, T_x, shift,
                a, rows, rmask, pos, cos, sin, cos_p, sin_p, COS, SIN, scb, sct, sch,
                d, dmask, i, q, sign, rot, ip, qp, sign_p, rot_p, c_d, s_d, p_d, c_q, s_q, p_q, s_pd,
                acc_c, acc_s, acc_cos, acc_sin, GCOS, GSIN, sua, sut, suh,
                GIVENS: tl.constexpr, NEED_CS: tl.constexpr, NEED_TRIG: tl.constexpr, TABLE: tl.constexpr,
                PER_HEAD: tl.constexpr, BLOCK_H: tl.constexpr):
    t = rows - shift
    tmask = rmask & (t >= 0) & (t < T_x)
    t64 = t.to(tl.int64)[:, None, None]
    grow, orow, xrow = G + a * sga + t64 * sgt, GX + a * soa + t64 * sot, X + a * sxa + t64 * sxt
    dd = d[None, None, :]
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = tmask[:, None, None] & (h < H)[None, :, None] & dmask[None, None, :]
        gh = grow + h[None, :, None] * sgh
        if PER_HEAD:  # (names of their own: a loop-carried variable must keep its shape)
            cos_h, sin_h = _trig(COS, SIN, a, rows, rmask, pos, h, i, rot, scb, sct, sch, TABLE, PER_HEAD)
            cos_ph, sin_ph = _trig(COS, SIN, a, rows, rmask, pos, h, ip, rot_p, scb, sct, sch, TABLE, PER_HEAD)
        else:
            cos_h, sin_h, cos_ph, sin_ph = cos, sin, cos_p, sin_p
        g_d = tl.load(gh + dd * sgd, mask=m, other=0.0).to(tl.float32)
        g_q = tl.load(gh + q[None, None, :] * sgd, mask=m, other=0.0).to(tl.float32)
        v_d = tl.where(rot[None, None, :], cos_h * g_d - sign[None, None, :] * sin_h * g_q, g_d)  # (R^T g)[d]
        if GIVENS:
            g_p = tl.load(gh + p_d[None, None, :] * sgd, mask=m, other=0.0).to(tl.float32)
            g_pq = tl.load(gh + qp[None, None, :] * sgd, mask=m, other=0.0).to(tl.float32)
            v_p = tl.where(rot_p[None, None, :], cos_ph * g_p - sign_p[None, None, :] * sin_ph * g_pq, g_p)
            gx = c_d[None, None, :] * v_d + s_pd[None, None, :] * v_p  # (G^T v)[d]
        else:
            gx = v_d
        tl.store(orow + h[None, :, None] * soh + dd * sod, gx.to(GX.dtype.element_ty), mask=m)
        if NEED_CS or NEED_TRIG:
            xh = xrow + h[None, :, None] * sxh
            x_d = tl.load(xh + dd * sxd, mask=m, other=0.0).to(tl.float32)
            x_p = x_d
            if GIVENS:
                x_p = tl.load(xh + p_d[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            if NEED_CS:  # dL/dc[d] = sum v[d] x[d], dL/ds[d] = sum v[d] x[p(d)]
                acc_c += tl.sum(tl.sum(v_d * x_d, axis=1), axis=0)
                acc_s += tl.sum(tl.sum(v_d * x_p, axis=1), axis=0)
            if NEED_TRIG:  # per channel: g[d] m[d] (-> cos of pair i(d)) and sign(d) g[d] m[q(d)] (-> its sin)
                if GIVENS:
                    x_q = tl.load(xh + q[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
                    x_pq = tl.load(xh + p_q[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
                    m_d = c_d[None, None, :] * x_d + s_d[None, None, :] * x_p
                    m_q = c_q[None, None, :] * x_q + s_q[None, None, :] * x_pq
                else:
                    m_d = x_d
                    m_q = tl.load(xh + q[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
                u_c = tl.where(rot[None, None, :], g_d * m_d, 0.0)
                u_s = tl.where(rot[None, None, :], sign[None, None, :] * g_d * m_q, 0.0)
                if PER_HEAD:
                    uoff = a * sua + rows.to(tl.int64)[:, None, None] * sut + h[None, :, None] * suh + dd
                    tl.store(GCOS + uoff, u_c, mask=m)
                    tl.store(GSIN + uoff, u_s, mask=m)
                else:
                    acc_cos += tl.sum(u_c, axis=1)
                    acc_sin += tl.sum(u_s, axis=1)
    return acc_c, acc_s, acc_cos, acc_sin


@triton.jit
def _bwd_kernel(G1, GX1, X1, sg1a, sg1t, sg1h, sg1d, so1a, so1t, so1h, so1d, sx1a, sx1t, sx1h, sx1d, H1, T1, shift1,
                G2, GX2, X2, sg2a, sg2t, sg2h, sg2d, so2a, so2t, so2h, so2d, sx2a, sx2t, sx2h, sx2d, H2, T2, shift2,
                COS, SIN, scb, sct, sch, POS, spa, spt, OFFS, offset, ROWS, C, S, P, PARTIAL,
                GCOS1, GSIN1, GCOS2, GSIN2, sua, sut, suh,
                D: tl.constexpr, R2: tl.constexpr, INTERLEAVED: tl.constexpr, GIVENS: tl.constexpr,
                NEED_CS: tl.constexpr, NEED_TRIG: tl.constexpr, TABLE: tl.constexpr, POS_MODE: tl.constexpr,
                PER_HEAD: tl.constexpr, HAS_X2: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """The forward's program layout; writes gx, and per program the partial sums of the c/s gradients
    (``PARTIAL[program, 0|1, d]``), and the per-channel cos/sin gradient terms ``GCOS[a, row, 0 | h, d]``."""
    a = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < ROWS
    pos = rows
    if TABLE:
        if POS_MODE == 0:
            pos = rows.to(tl.int64) + offset
        elif POS_MODE == 1:
            pos = rows.to(tl.int64) + offset + tl.load(OFFS + a)
        else:
            pos = tl.load(POS + a * spa + rows * spt, mask=rmask, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    i, q, sign, rot = _pair_of(d, R2, INTERLEAVED)
    c_d = tl.full([BLOCK_D], 1.0, tl.float32)
    s_d = tl.zeros([BLOCK_D], dtype=tl.float32)
    c_q = c_d
    s_q = s_d
    s_pd = s_d
    p_d = d
    p_q = d
    if GIVENS:
        c_d = tl.load(C + d, mask=dmask, other=1.0)
        s_d = tl.load(S + d, mask=dmask, other=0.0)
        p_d = tl.load(P + d, mask=dmask, other=0).to(tl.int32)
        c_q = tl.load(C + q, mask=dmask, other=1.0)
        s_q = tl.load(S + q, mask=dmask, other=0.0)
        p_q = tl.load(P + q, mask=dmask, other=0).to(tl.int32)
        s_pd = tl.load(S + p_d, mask=dmask, other=0.0)
    ip, qp, sign_p, rot_p = _pair_of(p_d, R2, INTERLEAVED)
    h = tl.arange(0, BLOCK_H)
    cos, sin = _trig(COS, SIN, a, rows, rmask, pos, h, i, rot, scb, sct, sch, TABLE, False)
    cos_p, sin_p = cos, sin
    if GIVENS:
        cos_p, sin_p = _trig(COS, SIN, a, rows, rmask, pos, h, ip, rot_p, scb, sct, sch, TABLE, False)
    acc_c = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_cos = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    acc_sin = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    acc_c, acc_s, acc_cos, acc_sin = _bwd_tensor(
        G1, GX1, X1, sg1a, sg1t, sg1h, sg1d, so1a, so1t, so1h, so1d, sx1a, sx1t, sx1h, sx1d, H1, T1, shift1,
        a, rows, rmask, pos, cos, sin, cos_p, sin_p, COS, SIN, scb, sct, sch,
        d, dmask, i, q, sign, rot, ip, qp, sign_p, rot_p, c_d, s_d, p_d, c_q, s_q, p_q, s_pd,
        acc_c, acc_s, acc_cos, acc_sin, GCOS1, GSIN1, sua, sut, suh,
        GIVENS, NEED_CS, NEED_TRIG, TABLE, PER_HEAD, BLOCK_H)
    if HAS_X2:
        acc_c, acc_s, acc_cos, acc_sin = _bwd_tensor(
            G2, GX2, X2, sg2a, sg2t, sg2h, sg2d, so2a, so2t, so2h, so2d, sx2a, sx2t, sx2h, sx2d, H2, T2, shift2,
            a, rows, rmask, pos, cos, sin, cos_p, sin_p, COS, SIN, scb, sct, sch,
            d, dmask, i, q, sign, rot, ip, qp, sign_p, rot_p, c_d, s_d, p_d, c_q, s_q, p_q, s_pd,
            acc_c, acc_s, acc_cos, acc_sin, GCOS2, GSIN2, sua, sut, suh,
            GIVENS, NEED_CS, NEED_TRIG, TABLE, PER_HEAD, BLOCK_H)
    if NEED_CS:
        program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(PARTIAL + program * 2 * D + d, acc_c, mask=dmask)
        tl.store(PARTIAL + program * 2 * D + D + d, acc_s, mask=dmask)
    if NEED_TRIG and not PER_HEAD:
        uoff = a * sua + rows.to(tl.int64)[:, None] * sut + d[None, :]
        um = rmask[:, None] & dmask[None, :]
        tl.store(GCOS1 + uoff, acc_cos, mask=um)
        tl.store(GSIN1 + uoff, acc_sin, mask=um)


# Whether the kernels above were decorated under TRITON_INTERPRET=1 (which triton reads when it and they are first
# imported): then they run on CPU tensors, with numpy, for the tests; otherwise they need tensors on a Triton device.
INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"


# ------------------------------------------------------------------------------------------------- launches
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
    _fwd_kernel[grid](
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
    _bwd_kernel[grid](
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
