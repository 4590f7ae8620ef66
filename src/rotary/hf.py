"""``import rotary.hf``: the Hugging Face integration under its short name.

One module, two names: this entry makes ``rotary.hf`` the module :mod:`rotary.integrations.hf` itself.
"""

import sys

from .integrations import hf as _module

sys.modules[__name__] = _module  # the import system hands out this entry, so there is one set of classes
