"""The kernels, by role, and the one decision of which runs (:func:`choose`, its table in its docstring).

- :mod:`.dispatch`: :func:`choose` (``ROTARY_KERNEL=auto|triton|torch``, device, dtype, autograd) and :func:`rotate`,
  the one rotation by given cos/sin on the kernel chosen;
- :mod:`.torch_kernel`: the torch kernel (one complex multiply a pass, hand-written backward);
- :mod:`.no_grad`: decode steps of :class:`rotary.Rotary`, a complex multiply by rows of its table;
- :mod:`.triton_kernel` (the Triton kernels), :mod:`.triton_launch` (their launches, every variant listed),
  :mod:`.triton_ops` (registered ``torch.library`` ops with autograd), :mod:`.triton_aot` (ahead-of-time compiles
  for a GPU that need not be there); these import triton and are imported only when a launch is wanted;
- :mod:`.apply`: :func:`rope`, the public kernel function (``rotary.rope``), with :func:`rope_qkv`,
  :func:`varlen_positions` and :func:`apply_rotary` (:func:`rope` in flash-attn's layout).

Speed and the measured figures: docs/speed.md.
"""

from .apply import apply_rotary, rope, rope_at, rope_qkv, varlen_positions
from .dispatch import KERNEL_DTYPES, MODES, choose, kernel_mode, rotate, triton_available
from .no_grad import rotate_no_grad
from .torch_kernel import compute_dtype

__all__ = ["KERNEL_DTYPES", "MODES", "apply_rotary", "choose", "compute_dtype", "kernel_mode", "rope", "rope_at",
           "rope_qkv", "rotate", "rotate_no_grad", "triton_available", "varlen_positions"]
