"""``import rotary.whisper``: the openai-whisper integration, :mod:`rotary.integrations.whisper` under its short name (one module, two names)."""

import sys

from .integrations import whisper as _module

sys.modules[__name__] = _module  # ``rotary.whisper is rotary.integrations.whisper``: the import system returns this entry
