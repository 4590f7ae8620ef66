"""rotary: rotary position embeddings (RoPE) with learned orthogonal rotations.

    self.rotary = rotary.Rotary(dims=dims, heads=heads)   # in __init__
    q, k = self.rotary.rotate_qk(q, k, offset=offset)      # in forward: (B, H, T, D)

``import rotary`` loads the core (torch only). The integrations are reached by name and imported on first use:
``rotary.hf`` (transformers), ``rotary.whisper`` (openai-whisper), ``rotary.decoder`` (the reference decoder);
``import rotary.hf`` and ``from rotary import hf`` work too. They live in ``rotary.integrations``; the lab
(``rotary compare``, ``rotary bench``) in ``rotary.lab``.
"""

import importlib

from .core.fold import fold
from .core.kernels import apply_rotary, rope
from .core.module import Rotary, rotary
from .core.reference import apply_rotary_reference, rotary_reference

__all__ = ["Rotary", "apply_rotary", "apply_rotary_reference", "fold", "rope", "rotary", "rotary_reference"]
__version__ = "0.2.0"

_INTEGRATIONS = ("decoder", "hf", "whisper")


def __getattr__(name: str):
    # PEP 562: the integrations import their host packages, so they load on first use, not with ``import rotary``
    if name in _INTEGRATIONS:
        module = importlib.import_module(f"{__name__}.{name}")  # the short name: see rotary/hf.py
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_INTEGRATIONS])
