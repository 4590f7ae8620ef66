"""``import rotary.decoder``: the reference decoder under its short name.

One module, two names: this entry makes ``rotary.decoder`` the module :mod:`rotary.integrations.decoder` itself.
"""

import sys

from .integrations import decoder as _module

sys.modules[__name__] = _module  # the import system hands out this entry, so there is one set of classes
