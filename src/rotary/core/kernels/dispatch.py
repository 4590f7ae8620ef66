"""Which kernel rotates: :func:`choose`, the one decision, and :func:`rotate`, the one rotation by given cos/sin.

Shapes: B batch, T tokens, H heads, D head_dim, r/2 rotated pairs.

Every caller (:class:`rotary.Rotary`, :func:`rotary.core.kernels.rope`) calls :func:`choose` once per call and
hands its answer down; nothing below decides again. ``ROTARY_KERNEL=auto|triton|torch`` (default ``auto``) is read
here and nowhere else.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from .torch_kernel import rotate_torch

__all__ = ["KERNEL_DTYPES", "MODES", "choose", "kernel_mode", "rotate", "triton_available"]

MODES = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the Triton and no-grad kernels' inputs
_DEVICES = ("cuda", "xpu")  # device types Triton compiles for

# found, not imported: importing triton costs a second and is left to the first launch
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def kernel_mode() -> str:
    """``ROTARY_KERNEL`` (default ``auto``), checked."""
    mode = os.environ.get("ROTARY_KERNEL", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"ROTARY_KERNEL must be one of {MODES}, got {mode!r}")
    return mode


def triton_available() -> bool:
    """Whether triton is installed."""
    return _HAS_TRITON


# ``"ROTARY_KERNEL" in os.environ`` costs about 2 µs (a KeyError inside os.environ); its backing dict answers the
# same question in 0.1 µs and follows setenv/monkeypatch all the same. Fallback: the public mapping.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("ROTARY_KERNEL") if _ENV_DATA is not None and hasattr(os.environ, "encodekey") \
    else None


def _switch_set() -> bool:
    if _ENV_KEY is not None:
        return _ENV_KEY in _ENV_DATA
    return "ROTARY_KERNEL" in os.environ


def choose(x: Tensor, table_rows: bool = False) -> str:
    """The kernel that rotates x: ``"no-grad"``, ``"triton"`` or ``"torch"``, the first row that applies.

    table_rows: the caller's cos/sin are rows of a fixed table at positions ``start + arange(T)`` (a
    :class:`rotary.Rotary` with fixed angles and an offset), the only case the no-grad kernel serves.

    ===========  ============================  ===================================================================
    kernel       when                          what runs
    ===========  ============================  ===================================================================
    ``no-grad``  table_rows, autograd off,     :func:`rotary.core.kernels.no_grad.rotate_no_grad`: a complex
                 not ``triton`` (below)        multiply by table rows, microseconds a decode step; where it cannot
                                               serve (rows past the table, float64, compiling) the caller rotates
                                               on ``torch``
    ``triton``   ``ROTARY_KERNEL=triton``, or  :mod:`rotary.core.kernels.triton_ops`: mixing and RoPE in one pass,
                 ``auto`` on a CUDA/ROCm/XPU   cos/sin gathered from the table in the kernel where they are table
                 tensor with triton installed; rows, q and k in one launch. On CPU ``triton`` is Triton's
                 float32/bf16/fp16             interpreter (``TRITON_INTERPRET=1`` set before the first launch:
                                               the tests' way in)
    ``torch``    everything else (CPU under    :mod:`rotary.core.kernels.torch_kernel`: one complex multiply per
                 ``auto``, float64,            pass, hand-written backward; plain differentiable ops when
                 ``ROTARY_KERNEL=torch``)      compiling or when cos/sin carry gradients
    ===========  ============================  ===================================================================
    """
    if not x.is_cpu or _switch_set():  # the common CPU case skips this in one lookup (is_cpu: no torch.device built)
        mode = kernel_mode()
        if mode != "torch" and x.dtype in KERNEL_DTYPES and (
                mode == "triton" or (x.device.type in _DEVICES and triton_available())):
            if mode == "triton":
                _check_forced(x)
            return "triton"
    return "no-grad" if table_rows and not torch.is_grad_enabled() else "torch"


def _check_forced(x: Tensor) -> None:
    """``ROTARY_KERNEL=triton`` needs triton, and Triton's interpreter for a tensor on a device it does not drive."""
    if not triton_available():
        raise ValueError("ROTARY_KERNEL=triton, but triton does not import: pip install triton")
    if x.device.type not in _DEVICES:
        from . import triton_kernel

        if not triton_kernel.INTERPRETED:
            raise ValueError(f"ROTARY_KERNEL=triton on a {x.device.type} tensor needs Triton's interpreter: set "
                             "TRITON_INTERPRET=1 before rotary's kernel is first used")


def rotate(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool, givens=None, out_dtype=None,
           kernel: str = "torch") -> Tensor:
    """``R G x`` on ``kernel`` (:func:`choose`'s answer; ``"no-grad"`` callers come here only as its fallback, on
    torch), for a 4-D x and cos/sin broadcastable to ``x[..., :r/2]`` (e.g. ``(T, 1, r/2)`` against
    ``(B, T, H, D)``, ``(B, 1, T, r/2)`` against ``(B, H, T, D)``, per head ``(B, T, H, r/2)``), validated by the
    caller; their gradients flow. givens: None or ``(c, s, partner)`` of
    :meth:`rotary.core.mixing.GivensMixing.coefficients`. out_dtype: the result's (default x's), so that a float32
    intermediate is rounded once."""
    if kernel != "triton":
        return rotate_torch(x, cos, sin, interleaved=interleaved, givens=givens, out_dtype=out_dtype)
    lead = (1,) * (4 - cos.dim())
    c4, s4 = cos.view(lead + tuple(cos.shape)), sin.view(lead + tuple(sin.shape))
    swap = c4.shape[1] == 1 and c4.shape[2] > 1  # time on axis 2: the kernel wants its rows on axis 1
    xv = x.transpose(1, 2) if swap else x
    if swap:
        c4, s4 = c4.transpose(1, 2), s4.transpose(1, 2)
    from .triton_ops import rope_forward

    y, _ = rope_forward(xv, None, c4, s4, None, None, givens, 0, False, interleaved, out_dtype or x.dtype)
    return y.transpose(1, 2) if swap else y
