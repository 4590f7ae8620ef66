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
    "embedding-givens": "the original module's placement: Givens + RoPE on token embeddings",
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
