"""The integrations layer: installs of :class:`rotary.Rotary` into host models (the reference decoder,
openai-whisper, Hugging Face transformers). Each builds on the core only, and each is imported by name
(``rotary.integrations.hf``, ``rotary.integrations.whisper``, ``rotary.integrations.decoder``), so that
``import rotary`` loads no host package.
"""
