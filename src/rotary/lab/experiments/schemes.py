"""The positional schemes `rotary compare` trains, as DecoderConfig overrides."""

from __future__ import annotations

SCHEMES: dict[str, dict] = {
    "none": {"positional": "none"},
    "learned": {"positional": "learned"},
    "sinusoidal": {"positional": "sinusoidal"},
    "rope": {"positional": "rotary", "placement": "attention", "mixing": None},
    "rope-freq": {"positional": "rotary", "placement": "attention", "mixing": None, "learned_freq": True},
    "givens": {"positional": "rotary", "placement": "attention", "mixing": "givens"},
    "givens-freq": {"positional": "rotary", "placement": "attention", "mixing": "givens", "learned_freq": True},
    "orthogonal": {"positional": "rotary", "placement": "attention", "mixing": "orthogonal"},
    "orthogonal-freq": {"positional": "rotary", "placement": "attention", "mixing": "orthogonal", "learned_freq": True},
    "embedding-givens": {"positional": "rotary", "placement": "embedding", "mixing": "givens"},
}

# 2-D schemes (tasks grid and digits): scheme -> 2-D Rotary keyword arguments (None: no rotary; "learned-2d" adds an
# absolute table instead). "none" is the same idea as the 1-D one, for the 2-D classifier.
SCHEMES_2D: dict[str, dict | None] = {
    "none": None,
    "learned-2d": None,
    "axial": {"directions": "axial", "mixing": None},
    "axial-givens": {"directions": "axial", "mixing": "givens"},
    "oblique": {"directions": "oblique", "mixing": None},
    "mixed": {"directions": "mixed", "mixing": None},
}

DESCRIPTIONS = {
    "none": "no position information (the 1-D decoder still has its causal mask)",
    "learned": "Whisper's learned absolute table (cannot go past its length)",
    "sinusoidal": "fixed sinusoidal absolute table",
    "rope": "RoPE on q and k (attention placement), no mixing",
    "rope-freq": "RoPE on q and k, learned frequencies",
    "givens": "RoPE on q and k with learned Givens mixing",
    "givens-freq": "Givens mixing and learned frequencies",
    "orthogonal": "RoPE on q and k with a learned full orthogonal P",
    "orthogonal-freq": "full orthogonal P and learned frequencies",
    "embedding-givens": "the original module's placement: Givens + RoPE on token embeddings",
    "learned-2d": "learned absolute 2-D table (resized bilinearly to other sizes)",
    "axial": "2-D RoPE, pairs split between rows and columns",
    "axial-givens": "axial 2-D RoPE with learned Givens mixing P",
    "oblique": "2-D RoPE, fixed directions spread over the half circle",
    "mixed": "2-D RoPE, learned direction per pair and head (RoPE-Mixed)",
}


# Context-extension schemes applied at evaluation time only, to models trained with plain RoPE ("rope") and with
# Givens mixing ("givens"), when evaluating at ``factor`` x the training length L0. LongRoPE is left out: it
# needs per-frequency factors found by a search, which a generic setting cannot stand in for.
EVAL_SCALINGS = ("linear", "ntk", "dynamic", "yarn", "llama3", "p-rope")
SCALED_SCHEMES = ("rope", "givens")


def eval_scaling(name: str, factor: int, original: int) -> dict | None:
    """The ``rope_parameters`` dict for ``name`` at ``factor`` x the training length ``original``."""
    if name == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if name == "ntk":
        return {"rope_type": "ntk", "factor": float(factor)}
    if name == "dynamic":  # adapts to the length by itself: factor 1 scales by L / L0
        return {"rope_type": "dynamic", "factor": 1.0, "original_max_position_embeddings": original}
    if name == "yarn":
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original}
    if name == "llama3":
        return {"rope_type": "llama3", "factor": float(factor), "original_max_position_embeddings": original,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    if name == "p-rope":
        return {"rope_type": "p", "p": 0.75}
    raise ValueError(f"unknown evaluation scaling {name!r}")
