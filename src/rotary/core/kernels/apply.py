"""The public kernel function :func:`rope` (``rotary.rope``): flash-attn's interface to the kernels.

Shapes: B batch, T tokens (Tq queries, Tk keys), H heads (Hk <= H keys, grouped-query), D head_dim, r rotary_dim.

- :func:`rope`: RoPE (after optional Givens mixing) from a cos/sin table gathered inside the kernel, or from
  per-token cos/sin that may carry gradients; q and k in one launch; varlen batches (``cu_seqlens``); in place;
  ``(B, H, T, D)`` like :class:`rotary.Rotary`, or flash-attn's ``(B, T, H, D)`` by ``layout="BTHD"``. The kernel
  is :func:`rotary.core.kernels.choose`'s (Triton on CUDA), the same call on the torch kernel elsewhere, so CPU
  users have all of it. :func:`apply_rotary` is it in flash-attn's layout (0.1's name).
- :func:`rope_qkv`: packed ``(B, T, 3, H, D)`` or ``(B, T, Hq + 2 Hk, D)`` input.
- :func:`varlen_positions`: ``cu_seqlens`` -> positions restarting at every sequence.
- :func:`rope_at`: the validated call (key rows resolved), which :class:`rotary.Rotary` enters directly.

Bad input raises the same ValueError on every kernel, before any launch; tables and positions on another device
than x are moved to x's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import check_layout
from ..positions import INDEX_DTYPES as _INDEX
from ..positions import check_offset, index_range
from .dispatch import choose
from .torch_kernel import rotate_torch

__all__ = ["apply_rotary", "rope", "rope_at", "rope_qkv", "varlen_positions"]


def varlen_positions(cu_seqlens: Tensor, total: int, offsets: int | Tensor = 0) -> Tensor:
    """Positions ``(total,)`` of a varlen batch: token j of sequence n at ``offsets[n] + j``.

    cu_seqlens: ``(N + 1,)`` int, ``cu_seqlens[n]`` the first token of sequence n, ``cu_seqlens[N] == total``.
    offsets: int or ``(N,)`` int tensor (sequences continuing a cache). No host synchronisation.
    """
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or (
        cu_seqlens.dtype not in _INDEX
    ):
        raise ValueError(f"cu_seqlens must be a (num_seqs + 1,) integer tensor, got {_describe(cu_seqlens)}")
    cu = cu_seqlens.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths, output_size=total)
    pos = torch.arange(total, device=cu.device) - starts[seq]
    if isinstance(offsets, Tensor):
        if offsets.shape != lengths.shape or offsets.dtype not in _INDEX:
            raise ValueError(f"offsets must be an int or a ({len(lengths)},) integer tensor, got "
                             f"{_describe(offsets)}")
        return pos + offsets.to(cu.device).long()[seq]
    check_offset(offsets)
    return pos + offsets


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


def _heads(x: Tensor, layout: str, name: str) -> Tensor:
    """x as ``(B, T, H, D)`` (a transposed view for BHTD), validated."""
    check_layout(layout)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D floating-point tensor in layout {layout}, got {_describe(x)}")
    return x if layout == "BTHD" else x.transpose(1, 2)


def _trig(cos: Tensor, sin: Tensor, B: int, T: int, H: int, D: int) -> tuple[Tensor, Tensor, bool]:
    """cos/sin validated: a table ``(rows, r/2)`` (True) or per token ``(B|1, T, H|1, r/2)`` (False)."""
    if not isinstance(cos, Tensor) or not isinstance(sin, Tensor) or cos.shape != sin.shape:
        raise ValueError(f"cos and sin must be tensors of one shape, got {_describe(cos)} and {_describe(sin)}")
    if not cos.is_floating_point() or not sin.is_floating_point():
        raise ValueError(f"cos/sin must be floating point, got {cos.dtype} and {sin.dtype}")
    if cos.dim() not in (2, 3, 4) or not 1 <= cos.shape[-1] <= D // 2:
        raise ValueError(f"cos/sin must be a table (rows, r/2) or per token (batch, seq, r/2) or (batch, seq, "
                         f"heads, r/2) with 1 <= r/2 <= head_dim/2 = {D // 2}, got shape {tuple(cos.shape)}")
    if cos.dim() == 2:
        return cos, sin, True
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B|1, T, 1, r/2)
    if cos.shape[0] not in (1, B) or cos.shape[1] != T or cos.shape[2] not in (1, H):
        raise ValueError(f"per-token cos/sin must have shape ({B} or 1, {T}, r/2) or ({B} or 1, {T}, {H} or 1, "
                         f"r/2), got {tuple(cos.shape)}")
    return cos, sin, False


def _table_positions(B: int, T: int, rows: int, offset, positions, device):
    """(positions (B|1, T) | None, offsets (B,) | None, offset int): the table rows of the T keys, range-checked
    (:func:`rotary.core.positions.index_range`: a bad index would be an illegal memory access in the kernel)."""
    if positions is not None:
        if not isinstance(positions, Tensor) or positions.dtype not in _INDEX or positions.shape not in ((T,), (B, T)):
            raise ValueError(f"positions must be a ({T},) or ({B}, {T}) integer tensor to index the cos/sin table, "
                             f"got {_describe(positions)}")
        pos = positions.to(device).view(-1, T)
        span, out = index_range(pos) if T > 0 else None, (pos, None, 0)
    elif isinstance(offset, Tensor):
        check_offset(offset, B)
        offsets = offset.to(device).expand(B).contiguous()
        span = index_range(offsets) if T > 0 else None
        span, out = None if span is None else (span[0], span[1] + T - 1), (None, offsets, 0)
    else:
        check_offset(offset)
        if offset + T > rows:
            raise ValueError(f"positions {offset}..{offset + T - 1} lie past the cos/sin table ({rows} rows)")
        return None, None, offset
    if span is not None and (span[0] < 0 or span[1] >= rows):
        raise ValueError(f"positions {span[0]}..{span[1]} lie outside the cos/sin table ({rows} rows)")
    return out


def _givens(givens, D: int, device):
    if givens is None:
        return None
    c, s, partner = givens
    if c.shape != (D,) or s.shape != (D,) or partner.shape != (D,):
        shapes = [tuple(t.shape) for t in givens]
        raise ValueError(f"givens must be (c, s, partner), each of shape ({D},), got {shapes}")
    return c.to(device), s.to(device), partner.to(device)


def rope(x: Tensor, cos: Tensor, sin: Tensor, *, k: Tensor | None = None, interleaved: bool = True,
         layout: str = "BHTD", offset: int | Tensor = 0, positions: Tensor | None = None,
         cu_seqlens: Tensor | None = None, givens=None, inplace: bool = False):
    """``R(m) G x`` (and ``R(m) G k``): RoPE after optional Givens mixing, through the kernel :func:`choose` picks.

    Args:
        x: ``(B, H, T, D)`` (``layout="BHTD"``, the default, as :class:`rotary.Rotary`) or ``(B, T, H, D)``
            (``"BTHD"``, flash-attn's), any strides; with
            ``cu_seqlens``: ``(total, H, D)``. float32/bf16/fp16 on the Triton kernel.
        cos, sin: a table ``(rows, r/2)``, token t at row ``offset + t`` (offset int or ``(B,)`` int tensor) or
            ``positions[..., t]`` (``(T,)`` or ``(B, T)`` int); or per token ``(B|1, T, r/2)`` /
            ``(B|1, T, H|1, r/2)`` (learned frequencies or directions: their gradient flows), then no offset.
            Rows past r/2 pairs: channels ``r:`` pass through exactly.
        k: keys in x's layout, ``(B, Tk, Hk, D)`` with ``Tk >= T`` and Hk dividing H, rotated in the same launch:
            keys at rows ``offset + T - Tk + arange(Tk)`` (offset is the first query's position), or
            ``positions`` (then ``(Tk,)`` / ``(B, Tk)``: key positions); queries at the last T of them.
        cu_seqlens: ``(N + 1,)`` int: x (and k) hold N sequences back to back, positions restarting at each
            (``offset``: int or ``(N,)``); cos/sin must then be a table.
        givens: ``(c, s, partner)`` of :meth:`rotary.core.mixing.GivensMixing.coefficients`, or None.
        inplace: write into x (and k); refused where a gradient would need the unrotated input.

    Returns:
        x's shape and dtype, or ``(q, k)`` with k.
    """
    if cu_seqlens is not None:
        return _varlen(x, cos, sin, k, interleaved, offset, positions, cu_seqlens, givens, inplace)
    xq = _heads(x, layout, "x")
    kk = None if k is None else _heads(k, layout, "k")
    B, T, H, D = xq.shape
    Tk, Hk = (T, H) if kk is None else kk.shape[1:3]
    if kk is not None and (kk.shape[0] != B or kk.shape[3] != D or Tk < T or H % Hk != 0):
        raise ValueError(f"k must have x's batch and head_dim, at least x's length and a head count dividing x's "
                         f"(layout {layout}), got x {tuple(x.shape)}, k {tuple(k.shape)}")
    cos, sin, table = _trig(cos, sin, B, Tk, H, D)
    if kk is not None and not table and cos.shape[2] > 1 and Hk != H:
        raise ValueError("per-head cos/sin turn each head its own way: k needs all of x's heads")
    if not table and (positions is not None or isinstance(offset, Tensor) or offset != 0):
        raise ValueError("offset/positions index a cos/sin table (rows, r/2); per-token cos/sin take neither")
    if not isinstance(offset, Tensor):
        check_offset(offset)
    device = xq.device
    cos, sin = cos.to(device), sin.to(device)
    pos, offs, off = (None, None, 0)
    if table:
        key_offset = offset  # offset is the first query's position; positions are the keys'
        if positions is None and Tk > T:
            key_offset = offset - (Tk - T)  # the keys start Tk - T rows before the first query
            if not isinstance(offset, Tensor) and key_offset < 0:
                raise ValueError(f"offset {offset} leaves {Tk - T} earlier keys before position 0")
        pos, offs, off = _table_positions(B, Tk, cos.shape[0], key_offset, positions, device)
    givens = _givens(givens, D, device)
    grads_need_input = (givens is not None and givens[0].requires_grad) or cos.requires_grad or sin.requires_grad
    if inplace and torch.is_grad_enabled() and grads_need_input:
        raise ValueError("inplace=True overwrites x, which the gradients of the Givens angles and of cos/sin need")
    yq, yk = rope_at(xq, kk, cos, sin, table=table, positions=pos, offsets=offs, offset=off, givens=givens,
                     interleaved=interleaved, inplace=inplace, kernel=choose(xq))
    if layout == "BHTD":
        yq, yk = yq.transpose(1, 2), (None if yk is None else yk.transpose(1, 2))
    return yq if k is None else (yq, yk)


def rope_at(xq: Tensor, kk: Tensor | None, cos: Tensor, sin: Tensor, *, table: bool, positions: Tensor | None,
            offsets: Tensor | None, offset: int, givens, interleaved: bool, inplace: bool = False,
            kernel: str) -> tuple[Tensor, Tensor | None]:
    """``(R G xq, R G kk)`` on ``kernel`` (:func:`choose`'s), everything validated: xq ``(B, T, H, D)`` and kk
    ``(B, Tk, Hk, D)`` or None (views of any strides); a table read at the key rows ``positions`` ``(B|1, Tk)``,
    or ``offset + offsets[b] + arange(Tk)`` (offsets ``(B,)`` or None), range-checked; or per-token cos/sin
    ``(B|1, Tk, H|1, r/2)``. The queries are the last T key rows."""
    if kernel != "triton":
        return _torch_path(xq, kk, cos, sin, table, positions, offsets, offset, givens, interleaved, inplace)
    if kk is not None and kk.dtype != xq.dtype:  # one launch reads one dtype: the keys, then the queries
        _, yk = _triton_path(None, kk, cos, sin, table, positions, offsets, offset, givens, interleaved, inplace)
        shift = kk.shape[1] - xq.shape[1]
        if table:
            positions = None if positions is None else positions[:, shift:]
            offset += shift
        else:
            cos, sin = cos[:, shift:], sin[:, shift:]
        _, yq = _triton_path(None, xq, cos, sin, table, positions, offsets, offset, givens, interleaved, inplace)
        return yq, yk
    return _triton_path(xq, kk, cos, sin, table, positions, offsets, offset, givens, interleaved, inplace)


def _triton_path(xq, kk, cos, sin, table, pos, offs, off, givens, interleaved, inplace):
    """Through the registered ops (:mod:`rotary.core.kernels.triton_ops`); xq None: k alone, returned second."""
    from .triton_ops import rope_forward, rope_inplace

    if table:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    x, k = (kk, None) if xq is None else (xq, kk)
    args = (cos, sin, pos, offs, givens, off, table, interleaved)
    y, yk = rope_inplace(x, k, *args) if inplace else rope_forward(x, k, *args, x.dtype)
    return (None, y) if xq is None else (y, yk)


def _torch_path(xq, kk, cos, sin, table, pos, offs, off, givens, interleaved, inplace):
    """The same call on the torch kernel: cos/sin gathered first, then rotated."""
    T, Tk = xq.shape[1], (xq.shape[1] if kk is None else kk.shape[1])
    if table:
        if pos is None:
            pos = torch.arange(off, off + Tk, device=cos.device).view(1, Tk)
            pos = pos if offs is None else pos + offs.view(-1, 1)
        cos, sin = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)  # (B|1, Tk, 1, r/2)
    out = []
    for t, c, s in ((xq, cos[:, Tk - T:], sin[:, Tk - T:]), (kk, cos, sin)):
        if t is None:
            out.append(None)
            continue
        y = rotate_torch(t, c, s, interleaved=interleaved, givens=givens)
        out.append(t.copy_(y) if inplace else y)
    return out[0], out[1]


def _varlen(x, cos, sin, k, interleaved, offset, positions, cu_seqlens, givens, inplace):
    if not isinstance(x, Tensor) or x.dim() != 3 or (k is not None and (k.dim() != 3 or k.shape[0] != x.shape[0])):
        raise ValueError(f"with cu_seqlens, x (and k) must be (total, heads, head_dim) with one total, got "
                         f"x {_describe(x)}" + ("" if k is None else f", k {_describe(k)}"))
    if cos.dim() != 2 or positions is not None:
        raise ValueError("with cu_seqlens, cos/sin must be a table (rows, r/2) and positions come from cu_seqlens")
    pos = varlen_positions(cu_seqlens.to(x.device), x.shape[0], offset)
    out = rope(x.unsqueeze(0), cos, sin, k=None if k is None else k.unsqueeze(0), interleaved=interleaved,
               layout="BTHD", positions=pos, givens=givens, inplace=inplace)
    return out.squeeze(0) if k is None else (out[0].squeeze(0), out[1].squeeze(0))


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, *, heads_q: int | None = None, interleaved: bool = True,
             offset: int | Tensor = 0, positions: Tensor | None = None, givens=None, inplace: bool = False) -> Tensor:
    """q and k of a packed projection rotated in one launch, v untouched.

    qkv: ``(B, T, 3, H, D)``, or ``(B, T, Hq + 2 Hk, D)`` with ``heads_q=Hq`` (grouped-query keys and values).
    Returns a tensor of qkv's shape (qkv itself with ``inplace=True``); cos/sin, offset, positions as in
    :func:`rope` (q and k share their positions).
    """
    if not isinstance(qkv, Tensor) or qkv.dim() not in (4, 5) or (qkv.dim() == 5 and qkv.shape[2] != 3):
        raise ValueError(f"qkv must be (batch, seq, 3, heads, head_dim) or (batch, seq, heads_q + 2 heads_k, "
                         f"head_dim), got {_describe(qkv)}")
    if qkv.dim() == 5:
        q, k, v = qkv.unbind(2)
    else:
        Hk = (qkv.shape[2] - (heads_q or 0)) // 2
        if heads_q is None or heads_q < 1 or Hk < 1 or heads_q + 2 * Hk != qkv.shape[2] or heads_q % Hk != 0:
            raise ValueError(f"a (batch, seq, heads_q + 2 heads_k, head_dim) qkv needs heads_q with heads_k dividing "
                             f"it, got heads_q={heads_q!r} for {qkv.shape[2]} heads")
        q, k, v = qkv.split([heads_q, Hk, Hk], dim=2)
    yq, yk = rope(q, cos, sin, k=k, interleaved=interleaved, layout="BTHD", offset=offset, positions=positions,
                  givens=givens, inplace=inplace)
    if inplace:
        return qkv
    return torch.stack((yq, yk, v), dim=2) if qkv.dim() == 5 else torch.cat((yq, yk, v), dim=2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = True) -> Tensor:
    """0.1's name for :func:`rope` in flash-attn's layout: ``rope(x, cos, sin, layout="BTHD",
    interleaved=interleaved)``. x ``(B, T, H, D)``; cos/sin ``(T, r/2)`` (a table read from row 0) or
    ``(B, T, r/2)``; channels ``r:`` pass through bit-exact."""
    return rope(x, cos, sin, layout="BTHD", interleaved=interleaved)
