"""Triton kernels for the whole rotation ``y = R(cos, sin) G x``: Givens mixing G on fixed planes (or none),
then RoPE R, in one pass over x; and its backward, one pass over the upstream gradient.

This module imports triton and is itself imported only when a Triton launch is wanted (its launches are in
:mod:`rotary.core.triton_launch`), so that ``import rotary`` works without triton. Which kernel runs is chosen in
:mod:`rotary.core.kernel`.

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

import triton
import triton.language as tl

__all__ = ["INTERPRETED", "bwd_kernel", "fwd_kernel"]


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
def _rows(POS, spa, spt, OFFS, offset, ROWS, TABLE: tl.constexpr, POS_MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's batch row a, its rows (and their mask) and their positions: with TABLE, ``offset + row``
    (POS_MODE 0), ``offset + OFFS[a] + row`` (1) or ``POS[a, row]`` (2); without, the rows themselves."""
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
    return a, rows, rmask, pos


@triton.jit
def _givens(C, S, P, d, q, dmask, GIVENS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The Givens coefficients and partners of channels d and of their RoPE partners q (the identity, each
    channel its own partner, without GIVENS)."""
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
    return c_d, s_d, p_d, c_q, s_q, p_q


@triton.jit
def fwd_kernel(X1, O1, sx1a, sx1t, sx1h, sx1d, so1a, so1t, so1h, so1d, H1, T1, shift1,
                X2, O2, sx2a, sx2t, sx2h, sx2d, so2a, so2t, so2h, so2d, H2, T2, shift2,
                COS, SIN, scb, sct, sch, POS, spa, spt, OFFS, offset, ROWS, C, S, P,
                D: tl.constexpr, R2: tl.constexpr, INTERLEAVED: tl.constexpr, GIVENS: tl.constexpr,
                TABLE: tl.constexpr, POS_MODE: tl.constexpr, PER_HEAD: tl.constexpr, HAS_X2: tl.constexpr,
                INPLACE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: rows ``pid0 * BLOCK_T ...`` of batch row ``pid1``, every head of both tensors.

    POS_MODE (table only): 0 rows at ``offset + row``, 1 at ``offset + OFFS[a] + row``, 2 at ``POS[a, row]``.
    """
    a, rows, rmask, pos = _rows(POS, spa, spt, OFFS, offset, ROWS, TABLE, POS_MODE, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    i, q, sign, rot = _pair_of(d, R2, INTERLEAVED)
    c_d, s_d, p_d, c_q, s_q, p_q = _givens(C, S, P, d, q, dmask, GIVENS, BLOCK_D)
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
def bwd_kernel(G1, GX1, X1, sg1a, sg1t, sg1h, sg1d, so1a, so1t, so1h, so1d, sx1a, sx1t, sx1h, sx1d, H1, T1, shift1,
                G2, GX2, X2, sg2a, sg2t, sg2h, sg2d, so2a, so2t, so2h, so2d, sx2a, sx2t, sx2h, sx2d, H2, T2, shift2,
                COS, SIN, scb, sct, sch, POS, spa, spt, OFFS, offset, ROWS, C, S, P, PARTIAL,
                GCOS1, GSIN1, GCOS2, GSIN2, sua, sut, suh,
                D: tl.constexpr, R2: tl.constexpr, INTERLEAVED: tl.constexpr, GIVENS: tl.constexpr,
                NEED_CS: tl.constexpr, NEED_TRIG: tl.constexpr, TABLE: tl.constexpr, POS_MODE: tl.constexpr,
                PER_HEAD: tl.constexpr, HAS_X2: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """The forward's program layout; writes gx, and per program the partial sums of the c/s gradients
    (``PARTIAL[program, 0|1, d]``), and the per-channel cos/sin gradient terms ``GCOS[a, row, 0 | h, d]``."""
    a, rows, rmask, pos = _rows(POS, spa, spt, OFFS, offset, ROWS, TABLE, POS_MODE, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    i, q, sign, rot = _pair_of(d, R2, INTERLEAVED)
    c_d, s_d, p_d, c_q, s_q, p_q = _givens(C, S, P, d, q, dmask, GIVENS, BLOCK_D)
    s_pd = s_d
    if GIVENS:
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
INTERPRETED = type(fwd_kernel).__name__ == "InterpretedFunction"
