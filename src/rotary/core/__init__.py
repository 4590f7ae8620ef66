"""The core layer: the rotation itself (kernel, angles, mixing, ``Rotary``, the float64 oracle, folding).

Imports torch and nothing else of rotary's; everything above it (integrations, lab) builds on it.
"""
