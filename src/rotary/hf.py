"""``import rotary.hf``: the Hugging Face integration, :mod:`rotary.integrations.hf` under its short name (one module, two names)."""

import sys

from .integrations import hf as _module

sys.modules[__name__] = _module  # ``rotary.hf is rotary.integrations.hf``: the import system returns this entry
