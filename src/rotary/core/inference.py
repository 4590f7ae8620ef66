"""The no-grad path of :class:`rotary.Rotary`: decode steps at the cost of the work.

Shapes: B batch, T tokens, H heads, D head_dim, r/2 rotated pairs.

At one token, Python overhead is the whole cost of a rotation: the general path's validation, dtype juggling
and autograd.Function dispatch dominate. This path applies where the answer is a complex multiply by rows of
the precomputed table (Meta's ``freqs_cis``): positions ``offset + arange(T)`` from an int offset or a ``(B,)``
offset tensor, float32/bf16/fp16 input, angles that depend on no parameter and no length. Everything else (and
every bad input, which the general path then reports) returns None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import rope_into
from .layout import transposed_buffer

__all__ = ["rotate_no_grad"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _table_rows(table: Tensor, offset, B: int, T: int, time_dim: int) -> Tensor | None:
    """Rows ``offset + arange(T)`` of the complex table, shaped to broadcast against x; None if it cannot serve."""
    if type(offset) is int:
        if not 0 <= offset <= table.shape[0] - T:
            return None  # the general path grows the table or computes these rows
        cis = table[offset : offset + T]  # (T, r/2)
        return cis.unsqueeze(-2) if time_dim == 1 else cis  # (T, 1, r/2) against BTHD; (T, r/2) against BHTD
    if not (isinstance(offset, Tensor) and offset.dim() == 1 and offset.dtype in _INDEX_DTYPES
            and offset.shape[0] == B):
        return None
    index = offset if T == 1 else (offset.view(B, 1) + torch.arange(T, device=offset.device)).view(-1)
    if table.is_cpu:
        try:  # index_select checks the range itself on CPU: no separate bounds pass
            cis = table.index_select(0, index)  # (B * T, r/2)
        except (IndexError, RuntimeError):
            return None
    else:  # on accelerators a bad index is an asynchronous device assert: check first (one sync)
        lo, hi = torch.aminmax(index)
        if int(lo) < 0 or int(hi) >= table.shape[0]:
            return None
        cis = table[index.to(table.device)]
    # (B, T, 1, r/2) against (B, T, H, D); (B, 1, T, r/2) against (B, H, T, D)
    return cis.view(B, T, 1, -1) if time_dim == 1 else cis.view(B, 1, T, -1)


def rotate_no_grad(rotary, x: Tensor, offset, layout: str, mix: bool) -> Tensor | None:
    """``R(m) P x`` (``R(m) x`` if not ``mix``) for a :class:`rotary.Rotary`, or None where this path does not
    apply. Every check here is a cheap attribute read."""
    # submodules read from _modules directly: nn.Module.__getattr__ costs about a microsecond a lookup
    angles, mixer = rotary._modules["angles"], rotary._modules.get("mixer")
    if not angles.fixed or x.dtype not in _DTYPES or torch.compiler.is_compiling():
        return None
    rank = x.dim()
    if rank == 3:
        if x.shape[2] != rotary.dims:
            return None
        x4, time_dim = x.unflatten(-1, (rotary.heads, rotary.head_dim)), 1  # (B, T, H, D)
    elif rank == 4 and x.shape[3] == rotary.head_dim and (layout == "BHTD" or layout == "BTHD"):
        x4, time_dim = x, (1 if layout == "BTHD" else 2)
        h = x.shape[3 - time_dim]
        if h == 0 or rotary.heads % h != 0:
            return None
        if time_dim == 2 and transposed_buffer(x):
            y = rotate_no_grad(rotary, x.transpose(1, 2), offset, "BTHD", mix)
            return None if y is None else y.transpose(1, 2)
    else:
        return None
    cis = _table_rows(angles.cis_table, offset, x4.shape[0], x4.shape[time_dim], time_dim)
    if cis is None:
        return None
    xf = x4 if x4.dtype == torch.float32 else x4.float()
    if mix and mixer is not None:
        xf = mixer.apply_frozen(xf)
    if rotary.interleaved and rotary.rotary_dim == rotary.head_dim and xf.is_contiguous():
        y = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * cis).flatten(-2)
    else:
        y = torch.empty_like(xf)
        rope_into(y, xf, cis.real, cis.imag, rotary.interleaved, rot=cis)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.reshape(x.shape) if rank == 3 else y
