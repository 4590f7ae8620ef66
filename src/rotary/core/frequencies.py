"""Inverse frequencies and rotation angles of standard RoPE.

Precision: angles ``m * w_i`` are formed in float64 (float32 only where the device has no float64, e.g. MPS)
and only then rounded to float32. At position 100 000 a float32 product is already off by up to 4e-3 rad,
comparable to bf16's own rounding; float64 keeps the angle error at ~1e-11 rad. Libraries that build positions
in the input dtype (bf16 cannot even represent 257) lose far more.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["angle_dtype", "inverse_frequencies", "rotary_angles"]


def angle_dtype(device: torch.device | str | None) -> torch.dtype:
    """The dtype angles are computed in on ``device``: float64 wherever the backend has it."""
    kind = torch.device(device).type if device is not None else "cpu"
    return torch.float32 if kind == "mps" else torch.float64


def inverse_frequencies(rotary_dim: int, base: float, *, device=None, dtype=torch.float64) -> Tensor:
    """``w_i = base ** (-2i / rotary_dim)`` for ``i < rotary_dim // 2``; shape ``(rotary_dim // 2,)``."""
    exponents = torch.arange(0, rotary_dim, 2, device=device, dtype=dtype) / rotary_dim
    return torch.pow(torch.tensor(base, device=device, dtype=dtype), -exponents)


def rotary_angles(positions: Tensor, freqs: Tensor) -> Tensor:
    """Angles ``positions[..., None] * freqs``, in the dtype of ``freqs``.

    positions: ``(...)`` integer or float; freqs: ``(r/2,)``. Returns ``(..., r/2)``.
    """
    return positions.to(freqs.dtype).unsqueeze(-1) * freqs
