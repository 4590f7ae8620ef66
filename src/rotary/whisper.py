"""``import rotary.whisper``: the openai-whisper integration under its short name.

One module, two names: this entry makes ``rotary.whisper`` the module :mod:`rotary.integrations.whisper` itself.
"""

import sys

from .integrations import whisper as _module

sys.modules[__name__] = _module  # the import system hands out this entry, so there is one set of classes
