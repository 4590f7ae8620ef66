"""The lab layer: experiments (``rotary compare``), benchmarks (``rotary bench``) and the command line, the only
code that prints, parses argv, seeds RNGs or picks devices."""
