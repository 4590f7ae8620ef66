"""rotary: rotary position embeddings (RoPE) with learned orthogonal rotations.

    self.rotary = rotary.Rotary(dims=dims, heads=heads)   # in __init__
    x = self.rotary(x, offset=offset)                      # in forward: (B, T, dims) or (B, T, H, D)
"""

from .fold import fold
from .functional import apply_rotary
from .module import Rotary, rotary
from .reference import apply_rotary_reference, rotary_reference

__all__ = ["Rotary", "apply_rotary", "apply_rotary_reference", "fold", "rotary", "rotary_reference"]
__version__ = "0.1.0"
