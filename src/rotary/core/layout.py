"""How q, k and x are laid out: ``(B, T, dims)``, ``"BHTD"`` ``(B, H, T, D)`` or ``"BTHD"`` ``(B, T, H, D)``.

Shapes: B batch, T sequence, H heads (``heads`` or a divisor of it: grouped-query keys), D head_dim.

``"BHTD"`` is what Hugging Face and ``scaled_dot_product_attention`` take, and the default of every call; a
``(B, T, dims)`` tensor is split into heads as ``(B, T, H, D)``. Both paths read a transposed buffer (a
``q_proj(x).view(B, T, H, D).transpose(1, 2)``) in its own memory order, without a copy.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["LAYOUTS", "as_heads", "check_layout", "qk_match", "transposed_buffer"]

LAYOUTS = ("BHTD", "BTHD")


def check_layout(layout: str) -> int:
    """The time axis of a 4-D tensor in ``layout``: 2 for BHTD, 1 for BTHD (the heads are the other, 3 - it)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return 2 if layout == "BHTD" else 1


def as_heads(x: Tensor, layout: str, name: str, dims: int, heads: int, head_dim: int,
             allow_3d: bool = True) -> tuple[Tensor, int]:
    """x as 4-D heads and the index of its time axis; checks shape, dtype and layout."""
    time_dim = 2 if layout == "BHTD" else 1 if layout == "BTHD" else check_layout(layout)  # (raises)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"Rotary expects a floating-point tensor {name}, got {getattr(x, 'dtype', type(x))}")
    shape = x.shape  # read once: every x.shape builds a new torch.Size
    if len(shape) == 3 and allow_3d:
        if shape[-1] != dims:
            raise ValueError(f"expected {name} of shape (batch, seq, dims={dims}), got {tuple(shape)}")
        return x.unflatten(-1, (heads, head_dim)), 1  # (B, T, H, D)
    h = shape[3 - time_dim] if len(shape) == 4 else None
    if len(shape) != 4 or shape[3] != head_dim or h == 0 or heads % h != 0:
        ranks = "rank 3 (batch, seq, dims) or 4" if allow_3d else "rank 4"
        order = "(batch, seq, heads, head_dim)" if layout == "BTHD" else "(batch, heads, seq, head_dim)"
        raise ValueError(
            f"expected {name} of {ranks} {order} with head_dim={head_dim} and heads={heads} or a divisor of it "
            f"(layout={layout!r}), got shape {tuple(x.shape)}"
        )
    return x, time_dim


def transposed_buffer(x: Tensor) -> bool:
    """Whether a (B, H, T, D) x is a (B, T, H, D) buffer seen transposed (``q_proj(x).view(...).transpose(1, 2)``).

    Both paths then work on the buffer in its own memory order: no copy, and the roundings of a contiguous input.
    """
    return not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def qk_match(q: Tensor, k: Tensor, time_dim: int) -> bool:
    """k has q's batch, at least q's length, and a head count dividing q's (grouped-query attention)."""
    h = 3 - time_dim
    return q.shape[0] == k.shape[0] and k.shape[time_dim] >= q.shape[time_dim] and k.shape[h] > 0 \
        and q.shape[h] % k.shape[h] == 0
