"""Triton kernels for the whole rotation ``y = R(cos, sin) G x``: Givens mixing G on fixed planes (or none),
then RoPE R, in one pass over x; and its backward, one pass over the upstream gradient.

This module imports triton and is itself imported only when a Triton launch is wanted (its launches are in
:mod:`rotary.core.kernels.triton_launch`), so that ``import rotary`` works without triton. Which kernel runs is
chosen in :func:`rotary.core.kernels.choose`.

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
are ``m[d]`` exactly.

Memory access. A tile holds whole head rows ``(BLOCK_T, BLOCK_H, BLOCK_D)``, read and written as the contiguous
rows they are (128-bit loads and stores where D's stride is 1); partners are taken from that tile in registers,
never loaded again: one read and one write of x whatever the plane pattern. The RoPE partner q(d) by a swap
(split and join) in the interleaved layout and in the half one when ``2 R2 == BLOCK_D``, the Givens partner p(d)
(any planes) by ``tl.gather`` along the channels (shuffles or shared memory). cos/sin are read as their
contiguous rows ``(.., R2)`` and gathered to channels (``i(d)``). Because every value stored at a channel depends
on the value loaded there, in place needs no barrier: no thread can overwrite a channel before it has been read.
Registers scale with the tile: the launcher sizes it for one 128-bit access per thread (1024 elements of bf16 at
4 warps, 512 of float32) and loops over the heads.

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
def _at(v, index):
    """``v[..., index]`` for a tile v ``(BLOCK_T, BLOCK_H | 1, N)`` and channels index ``(M,)``: taken from
    registers (shuffles or shared memory), not from global memory."""
    return tl.gather(v, tl.broadcast_to(index[None, None, :], (v.shape[0], v.shape[1], index.shape[0])), 2)


@triton.jit
def _rope_partner(v, q, R2: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr):
    """``v[..., q(d)]`` for a tile v ``(BLOCK_T, BLOCK_H, BLOCK_D)``: interleaved, each pair's two channels swapped
    (split and join: within a thread's registers); half with ``2 R2 == BLOCK_D``, the two halves swapped; otherwise
    a gather. Values on pass-through channels are never used."""
    if INTERLEAVED:
        a, b = tl.split(tl.reshape(v, (v.shape[0], v.shape[1], BLOCK_D // 2, 2)))
        return tl.reshape(tl.join(b, a), (v.shape[0], v.shape[1], BLOCK_D))
    elif 2 * R2 == BLOCK_D:
        a, b = tl.split(tl.permute(tl.reshape(v, (v.shape[0], v.shape[1], 2, R2)), (0, 1, 3, 2)))
        return tl.reshape(tl.permute(tl.join(b, a), (0, 1, 3, 2)), (v.shape[0], v.shape[1], BLOCK_D))
    else:
        return _at(v, q)


@triton.jit
def _trig(COS, SIN, a, rows, rmask, pos, h, hmask, i, sign, rot, scb, sct, sch, R2: tl.constexpr,
          TABLE: tl.constexpr, PER_HEAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """``cos_i`` and ``sign(d) sin_i`` of pair i(d) per channel d ``(BLOCK_T, 1, BLOCK_D)``, or with per-head
    cos/sin ``(BLOCK_T, BLOCK_H, BLOCK_D)``; 1 and 0 on pass-through channels (and masked rows), so that
    ``y = cos x + sin x[q]`` is two operations a channel. Read as contiguous rows of R2 (wide loads), spread to
    channels in registers."""
    j = tl.arange(0, BLOCK_D // 2)
    m = rmask[:, None, None] & (j < R2)[None, None, :]
    if TABLE:
        off = pos[:, None, None] * sct + j[None, None, :]
    elif PER_HEAD:
        off = a * scb + rows[:, None, None] * sct + h[None, :, None] * sch + j[None, None, :]
        m = m & hmask[None, :, None]
    else:
        off = a * scb + rows[:, None, None] * sct + j[None, None, :]
    cos = tl.load(COS + off, mask=m, other=1.0).to(tl.float32)  # (BLOCK_T, BLOCK_H | 1, BLOCK_D / 2)
    sin = tl.load(SIN + off, mask=m, other=0.0).to(tl.float32)
    r = rot[None, None, :]
    return tl.where(r, _at(cos, i), 1.0), tl.where(r, sign[None, None, :] * _at(sin, i), 0.0)


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
def _givens(C, S, P, d, dmask, GIVENS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The Givens coefficients c[d], s[d], partners p(d) and s[p(d)] (the identity without GIVENS)."""
    c_d = tl.full([BLOCK_D], 1.0, tl.float32)
    s_d = tl.zeros([BLOCK_D], dtype=tl.float32)
    p_d = d
    s_pd = s_d
    if GIVENS:
        c_d = tl.load(C + d, mask=dmask, other=1.0)
        s_d = tl.load(S + d, mask=dmask, other=0.0)
        p_d = tl.load(P + d, mask=dmask, other=0).to(tl.int32)
        s_pd = tl.load(S + p_d, mask=dmask, other=0.0)
    return c_d, s_d, p_d, s_pd


@triton.jit
def _fwd_tensor(X, O, sxa, sxt, sxh, sxd, soa, sot, soh, sod, H, T_x, shift,
                a, rows, rmask, pos, cos, sin, COS, SIN, scb, sct, sch,
                d, dmask, i, q, sign, rot, c_d, s_d, p_d,
                D: tl.constexpr, R2: tl.constexpr, INTERLEAVED: tl.constexpr, GIVENS: tl.constexpr,
                TABLE: tl.constexpr, PER_HEAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = rows - shift  # this tensor's tokens; rows outside [shift, shift + T_x) are masked
    tmask = rmask & (t >= 0) & (t < T_x)
    xrow = X + a * sxa + t.to(tl.int64)[:, None, None] * sxt
    orow = O + a * soa + t.to(tl.int64)[:, None, None] * sot
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hmask = h < H
        m = tmask[:, None, None] & hmask[None, :, None] & dmask[None, None, :]
        x = tl.load(xrow + h[None, :, None] * sxh + d[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        if GIVENS:  # m = G x
            x = c_d[None, None, :] * x + s_d[None, None, :] * _at(x, p_d)
        if PER_HEAD:  # (names of their own: a loop-carried variable must keep its shape)
            cos_h, sin_h = _trig(COS, SIN, a, rows, rmask, pos, h, hmask, i, sign, rot, scb, sct, sch, R2, TABLE,
                                 PER_HEAD, BLOCK_D)
        else:
            cos_h, sin_h = cos, sin
        y = cos_h * x + sin_h * _rope_partner(x, q, R2, INTERLEAVED, BLOCK_D)
        if 2 * R2 < D:  # pass-through channels exactly (their partner's value could be inf: 0 * inf)
            y = tl.where(rot[None, None, :], y, x)
        tl.store(orow + h[None, :, None] * soh + d[None, None, :] * sod, y.to(O.dtype.element_ty), mask=m)


@triton.jit
def fwd_kernel(X1, O1, sx1a, sx1t, sx1h, sx1d, so1a, so1t, so1h, so1d, H1, T1, shift1,
                X2, O2, sx2a, sx2t, sx2h, sx2d, so2a, so2t, so2h, so2d, H2, T2, shift2,
                COS, SIN, scb, sct, sch, POS, spa, spt, OFFS, offset, ROWS, C, S, P,
                D: tl.constexpr, R2: tl.constexpr, INTERLEAVED: tl.constexpr, GIVENS: tl.constexpr,
                TABLE: tl.constexpr, POS_MODE: tl.constexpr, PER_HEAD: tl.constexpr, HAS_X2: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: rows ``pid0 * BLOCK_T ...`` of batch row ``pid1``, every head of both tensors.

    POS_MODE (table only): 0 rows at ``offset + row``, 1 at ``offset + OFFS[a] + row``, 2 at ``POS[a, row]``.
    """
    a, rows, rmask, pos = _rows(POS, spa, spt, OFFS, offset, ROWS, TABLE, POS_MODE, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    i, q, sign, rot = _pair_of(d, R2, INTERLEAVED)
    c_d, s_d, p_d, _ = _givens(C, S, P, d, dmask, GIVENS, BLOCK_D)
    h = tl.arange(0, 1)
    cos, sin = _trig(COS, SIN, a, rows, rmask, pos, h, h < 1, i, sign, rot, scb, sct, sch, R2, TABLE, False, BLOCK_D)
    _fwd_tensor(X1, O1, sx1a, sx1t, sx1h, sx1d, so1a, so1t, so1h, so1d, H1, T1, shift1,
                a, rows, rmask, pos, cos, sin, COS, SIN, scb, sct, sch,
                d, dmask, i, q, sign, rot, c_d, s_d, p_d,
                D, R2, INTERLEAVED, GIVENS, TABLE, PER_HEAD, BLOCK_H, BLOCK_D)
    if HAS_X2:
        _fwd_tensor(X2, O2, sx2a, sx2t, sx2h, sx2d, so2a, so2t, so2h, so2d, H2, T2, shift2,
                    a, rows, rmask, pos, cos, sin, COS, SIN, scb, sct, sch,
                    d, dmask, i, q, sign, rot, c_d, s_d, p_d,
                    D, R2, INTERLEAVED, GIVENS, TABLE, PER_HEAD, BLOCK_H, BLOCK_D)


@triton.jit
def _bwd_tensor(G, GX, X, sga, sgt, sgh, sgd, soa, sot, soh, sod, sxa, sxt, sxh, sxd, H, T_x, shift,
                a, rows, rmask, pos, cos, sin, COS, SIN, scb, sct, sch,
                d, dmask, i, q, sign, rot, c_d, s_d, p_d, s_pd,
                acc_c, acc_s, acc_cos, acc_sin, GCOS, GSIN, sua, sut, suh,
                D: tl.constexpr, R2: tl.constexpr, INTERLEAVED: tl.constexpr, GIVENS: tl.constexpr,
                NEED_CS: tl.constexpr, NEED_TRIG: tl.constexpr, TABLE: tl.constexpr, PER_HEAD: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = rows - shift
    tmask = rmask & (t >= 0) & (t < T_x)
    t64 = t.to(tl.int64)[:, None, None]
    grow, orow, xrow = G + a * sga + t64 * sgt, GX + a * soa + t64 * sot, X + a * sxa + t64 * sxt
    dd = d[None, None, :]
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hmask = h < H
        m = tmask[:, None, None] & hmask[None, :, None] & dmask[None, None, :]
        if PER_HEAD:  # (names of their own: a loop-carried variable must keep its shape)
            cos_h, sin_h = _trig(COS, SIN, a, rows, rmask, pos, h, hmask, i, sign, rot, scb, sct, sch, R2, TABLE,
                                 PER_HEAD, BLOCK_D)
        else:
            cos_h, sin_h = cos, sin
        g = tl.load(grow + h[None, :, None] * sgh + dd * sgd, mask=m, other=0.0).to(tl.float32)
        v = cos_h * g - sin_h * _rope_partner(g, q, R2, INTERLEAVED, BLOCK_D)  # R^T g
        if 2 * R2 < D:
            v = tl.where(rot[None, None, :], v, g)
        gx = v
        if GIVENS:  # (G^T v)[d] = c[d] v[d] + s[p(d)] v[p(d)]
            gx = c_d[None, None, :] * v + s_pd[None, None, :] * _at(v, p_d)
        tl.store(orow + h[None, :, None] * soh + dd * sod, gx.to(GX.dtype.element_ty), mask=m)
        if NEED_CS or NEED_TRIG:
            x = tl.load(xrow + h[None, :, None] * sxh + dd * sxd, mask=m, other=0.0).to(tl.float32)
            x_p = x
            if GIVENS:
                x_p = _at(x, p_d)
            if NEED_CS:  # dL/dc[d] = sum v[d] x[d], dL/ds[d] = sum v[d] x[p(d)] (summed over the tile at the end)
                acc_c += v * x
                acc_s += v * x_p
            if NEED_TRIG:  # per channel: g[d] m[d] (-> cos of pair i(d)) and sign(d) g[d] m[q(d)] (-> its sin)
                mx = x
                if GIVENS:
                    mx = c_d[None, None, :] * x + s_d[None, None, :] * x_p
                u_c = tl.where(rot[None, None, :], g * mx, 0.0)
                mx_q = _rope_partner(mx, q, R2, INTERLEAVED, BLOCK_D)
                u_s = tl.where(rot[None, None, :], sign[None, None, :] * g * mx_q, 0.0)
                if PER_HEAD:
                    uoff = a * sua + rows.to(tl.int64)[:, None, None] * sut + h[None, :, None] * suh + dd
                    tl.store(GCOS + uoff, u_c, mask=m)
                    tl.store(GSIN + uoff, u_s, mask=m)
                else:
                    acc_cos += u_c
                    acc_sin += u_s
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
    c_d, s_d, p_d, s_pd = _givens(C, S, P, d, dmask, GIVENS, BLOCK_D)
    h = tl.arange(0, 1)
    cos, sin = _trig(COS, SIN, a, rows, rmask, pos, h, h < 1, i, sign, rot, scb, sct, sch, R2, TABLE, False, BLOCK_D)
    # per-thread sums of the gradients' terms, tile-shaped: one reduction across threads at the end, not per tile
    acc_c = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], dtype=tl.float32)
    acc_cos = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], dtype=tl.float32)
    acc_sin = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], dtype=tl.float32)
    acc_c, acc_s, acc_cos, acc_sin = _bwd_tensor(
        G1, GX1, X1, sg1a, sg1t, sg1h, sg1d, so1a, so1t, so1h, so1d, sx1a, sx1t, sx1h, sx1d, H1, T1, shift1,
        a, rows, rmask, pos, cos, sin, COS, SIN, scb, sct, sch,
        d, dmask, i, q, sign, rot, c_d, s_d, p_d, s_pd,
        acc_c, acc_s, acc_cos, acc_sin, GCOS1, GSIN1, sua, sut, suh,
        D, R2, INTERLEAVED, GIVENS, NEED_CS, NEED_TRIG, TABLE, PER_HEAD, BLOCK_H, BLOCK_D)
    if HAS_X2:
        acc_c, acc_s, acc_cos, acc_sin = _bwd_tensor(
            G2, GX2, X2, sg2a, sg2t, sg2h, sg2d, so2a, so2t, so2h, so2d, sx2a, sx2t, sx2h, sx2d, H2, T2, shift2,
            a, rows, rmask, pos, cos, sin, COS, SIN, scb, sct, sch,
            d, dmask, i, q, sign, rot, c_d, s_d, p_d, s_pd,
            acc_c, acc_s, acc_cos, acc_sin, GCOS2, GSIN2, sua, sut, suh,
            D, R2, INTERLEAVED, GIVENS, NEED_CS, NEED_TRIG, TABLE, PER_HEAD, BLOCK_H, BLOCK_D)
    if NEED_CS:
        program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(PARTIAL + program * 2 * D + d, tl.sum(tl.sum(acc_c, axis=1), axis=0), mask=dmask)
        tl.store(PARTIAL + program * 2 * D + D + d, tl.sum(tl.sum(acc_s, axis=1), axis=0), mask=dmask)
    if NEED_TRIG and not PER_HEAD:
        uoff = a * sua + rows.to(tl.int64)[:, None] * sut + d[None, :]
        um = rmask[:, None] & dmask[None, :]
        tl.store(GCOS1 + uoff, tl.sum(acc_cos, axis=1), mask=um)
        tl.store(GSIN1 + uoff, tl.sum(acc_sin, axis=1), mask=um)


# Whether the kernels above were decorated under TRITON_INTERPRET=1 (which triton reads when it and they are first
# imported): then they run on CPU tensors, with numpy, for the tests; otherwise they need tensors on a Triton device.
INTERPRETED = type(fwd_kernel).__name__ == "InterpretedFunction"
