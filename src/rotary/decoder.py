"""``import rotary.decoder``: the reference decoder, :mod:`rotary.integrations.decoder` under its short name (one module, two names)."""

import sys

from .integrations import decoder as _module

sys.modules[__name__] = _module  # ``rotary.decoder is rotary.integrations.decoder``: the import system returns this entry
