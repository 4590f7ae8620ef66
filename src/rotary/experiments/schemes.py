"""The positional schemes `rotary compare` trains, as DecoderConfig overrides."""

from __future__ import annotations

SCHEMES: dict[str, dict] = {
    "none": {"positional": "none"},
    "learned": {"positional": "learned"},
    "sinusoidal": {"positional": "sinusoidal"},
    "rope": {"positional": "rotary-attention", "mixing": None},
    "rope-freq": {"positional": "rotary-attention", "mixing": None, "learned_freq": True},
    "givens": {"positional": "rotary-attention", "mixing": "givens"},
    "givens-freq": {"positional": "rotary-attention", "mixing": "givens", "learned_freq": True},
    "orthogonal": {"positional": "rotary-attention", "mixing": "orthogonal"},
    "orthogonal-freq": {"positional": "rotary-attention", "mixing": "orthogonal", "learned_freq": True},
    "embedding-givens": {"positional": "rotary-embedding", "mixing": "givens"},
}

DESCRIPTIONS = {
    "none": "no position information (causal masking only)",
    "learned": "Whisper's learned absolute table (cannot go past its length)",
    "sinusoidal": "fixed sinusoidal absolute table",
    "rope": "RoPE on q and k (attention placement), no mixing",
    "rope-freq": "RoPE on q and k, learned frequencies",
    "givens": "RoPE on q and k with learned Givens mixing",
    "givens-freq": "Givens mixing and learned frequencies",
    "orthogonal": "RoPE on q and k with a learned full orthogonal P",
    "orthogonal-freq": "full orthogonal P and learned frequencies",
    "embedding-givens": "the request document's placement: Givens + RoPE on token embeddings",
}
