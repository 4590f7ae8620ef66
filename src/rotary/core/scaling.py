"""Context-extension schemes: scaled RoPE frequencies and attention factors, in Hugging Face's ``rope_parameters`` form.

A scheme is given as the dict a transformers model config carries in ``config.rope_parameters`` (legacy
``config.rope_scaling``), e.g. ``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}``,
and produces the same numbers as transformers' ``ROPE_INIT_FUNCTIONS`` (computed here in float64):

    default       w_i = base ** (-2i / r)
    linear        w_i / factor                                   (position interpolation, Chen et al. 2023)
    ntk           base' = base * factor ** (r / (r - 2))          (static NTK-aware; not a transformers type)
    dynamic       ntk with factor' = max(factor * L / L0 - (factor - 1), 1) at sequence length L
    yarn          per-pair blend of w_i and w_i / factor by a linear ramp, and an attention factor (Peng et al.)
    llama3        w_i / factor below a wavelength band, w_i above it, smoothly blended inside it
    longrope      w_i / short_factor_i, or w_i / long_factor_i once the sequence length L exceeds L0
    proportional  the first floor(p * r / 2) pairs keep w_i, the rest get frequency 0 (p = partial_rotary_factor)
    p             the same, with the fraction under the key ``p`` (p-RoPE: Barbero et al., "Round and Round We
                  Go", 2024): the lowest frequencies stop rotating

L0 is ``original_max_position_embeddings`` (for ``dynamic``, transformers reads ``config.max_position_embeddings``;
either key is accepted here). ``yarn`` and ``longrope`` also scale cos and sin by an attention factor, as
transformers' ``attention_scaling`` does, so the rotated channels come out multiplied by it.

Shapes: r rotary_dim; L lengths ``()`` or ``(B,)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .frequencies import inverse_frequencies

__all__ = ["SCALING_TYPES", "Scaling"]

# rope_type -> (required keys, optional keys), besides rope_type/type, rope_theta, partial_rotary_factor and
# max_position_embeddings (the model config's, which some schemes fall back on), accepted by every type.
_KEYS: dict[str, tuple[frozenset, frozenset]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "ntk": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset({"original_max_position_embeddings"})),
    "yarn": (
        frozenset({"factor", "original_max_position_embeddings"}),
        frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    ),
    "llama3": (
        frozenset({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}),
        frozenset(),
    ),
    "longrope": (
        frozenset({"short_factor", "long_factor", "original_max_position_embeddings"}),
        frozenset({"factor", "attention_factor"}),
    ),
    "proportional": (frozenset(), frozenset({"factor"})),
    "p": (frozenset({"p"}), frozenset()),
}
_COMMON = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor", "max_position_embeddings"})
SCALING_TYPES = tuple(_KEYS)


def _number(params: Mapping, key: str, *, positive: bool = True) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"scaling[{key!r}] must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"scaling[{key!r}] must be > 0, got {value!r}")
    return float(value)


def _length(params: Mapping, key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"scaling[{key!r}] must be a positive int, got {value!r}")
    return value


def _factors(params: Mapping, key: str) -> tuple[float, ...]:
    value = params[key]
    if not isinstance(value, (list, tuple)) or not all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0 for v in value
    ):
        raise ValueError(f"scaling[{key!r}] must be a list of positive numbers, got {value!r}")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class Scaling:
    """A validated frequency-scaling scheme; build it with :meth:`from_dict`.

    ``rope_theta`` and ``partial_rotary_factor`` (None when absent) are for :class:`rotary.Rotary` to turn into
    ``base`` and ``rotary_dim``; every other field is the scheme's own parameter, with transformers' defaults.
    """

    rope_type: str
    rope_theta: float | None = None
    partial_rotary_factor: float | None = None
    factor: float = 1.0
    original_length: int | None = None
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    p: float = 1.0

    @classmethod
    def from_dict(cls, params: Mapping) -> Scaling:
        """Parse a ``rope_parameters`` dict; unknown keys, missing keys and bad values raise ``ValueError``."""
        if not isinstance(params, Mapping):
            raise ValueError(f"scaling must be a dict in Hugging Face's rope_parameters form, got {params!r}")
        rope_type, legacy = params.get("rope_type"), params.get("type")
        if rope_type is None and legacy is None:
            raise ValueError(f"scaling needs a 'rope_type' key (one of {', '.join(SCALING_TYPES)}), got {dict(params)}")
        if rope_type is not None and legacy is not None and rope_type != legacy:
            raise ValueError(f"scaling has rope_type={rope_type!r} and type={legacy!r}; give one")
        rope_type = rope_type if rope_type is not None else legacy
        if rope_type not in _KEYS:
            raise ValueError(f"unknown scaling rope_type {rope_type!r}; expected one of {', '.join(SCALING_TYPES)}")
        required, optional = _KEYS[rope_type]
        unknown = set(params) - required - optional - _COMMON
        if unknown:
            raise ValueError(
                f"unknown keys {sorted(unknown)} for scaling rope_type {rope_type!r}; "
                f"allowed: {sorted(required | optional | _COMMON)}"
            )
        missing = {k for k in required if params.get(k) is None}
        if missing:
            raise ValueError(f"scaling rope_type {rope_type!r} is missing required keys {sorted(missing)}")

        fields: dict = {"rope_type": rope_type, "rope_theta": _number(params, "rope_theta")}
        prf = _number(params, "partial_rotary_factor", positive=False)
        if rope_type == "proportional":  # here it is p-RoPE's fraction, not a smaller rotary_dim
            if prf is not None and not 0 <= prf <= 1:
                raise ValueError(f"scaling['partial_rotary_factor'] must be in [0, 1], got {prf!r}")
            fields["p"] = 1.0 if prf is None else prf
        else:
            if prf is not None and not 0 < prf <= 1:
                raise ValueError(f"scaling['partial_rotary_factor'] must be in (0, 1], got {prf!r}")
            fields["partial_rotary_factor"] = prf
        factor = _number(params, "factor")
        if factor is not None:
            fields["factor"] = factor
        max_positions = _length(params, "max_position_embeddings")
        original = _length(params, "original_max_position_embeddings")

        if rope_type == "dynamic":
            # transformers scales dynamic NTK from config.max_position_embeddings (the training length)
            if original is not None and max_positions is not None and original != max_positions:
                raise ValueError(
                    "scaling rope_type 'dynamic' takes its original length from one of max_position_embeddings / "
                    f"original_max_position_embeddings, got both ({max_positions} != {original})"
                )
            original = original or max_positions
            if original is None:
                raise ValueError(
                    "scaling rope_type 'dynamic' needs the training length: add 'max_position_embeddings' "
                    "(a transformers config's config.max_position_embeddings) or 'original_max_position_embeddings'"
                )
        fields["original_length"] = original

        if rope_type == "yarn":
            # transformers: `params.get(...) or default`, so 0 and None both mean the default
            fields["beta_fast"] = _number(params, "beta_fast", positive=False) or 32.0
            fields["beta_slow"] = _number(params, "beta_slow", positive=False) or 1.0
            truncate = params.get("truncate")
            if truncate is not None and not isinstance(truncate, bool):
                raise ValueError(f"scaling['truncate'] must be a bool, got {truncate!r}")
            fields["truncate"] = True if truncate is None else truncate
            attention = _number(params, "attention_factor", positive=False)
            if attention is None:
                mscale = _number(params, "mscale", positive=False)
                mscale_all_dim = _number(params, "mscale_all_dim", positive=False)
                if mscale and mscale_all_dim:  # DeepSeek: ratio of the two mscales
                    attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                else:
                    attention = _yarn_mscale(factor)
            fields["attention_factor"] = attention
        elif rope_type == "llama3":
            fields["low_freq_factor"] = _number(params, "low_freq_factor")
            fields["high_freq_factor"] = _number(params, "high_freq_factor")
            if not fields["high_freq_factor"] > fields["low_freq_factor"]:
                raise ValueError(
                    f"scaling['high_freq_factor'] must exceed low_freq_factor, got {fields['high_freq_factor']} "
                    f"and {fields['low_freq_factor']}"
                )
        elif rope_type == "longrope":
            fields["short_factor"] = _factors(params, "short_factor")
            fields["long_factor"] = _factors(params, "long_factor")
            attention = _number(params, "attention_factor", positive=False)
            if attention is None:
                if factor is None:  # Phi-3: the factor is the ratio of the two context lengths
                    if max_positions is None:
                        raise ValueError(
                            "scaling rope_type 'longrope' without 'factor' or 'attention_factor' needs "
                            "'max_position_embeddings' (factor = max_position_embeddings / "
                            "original_max_position_embeddings, as in transformers)"
                        )
                    factor = max_positions / original
                attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
            fields["attention_factor"] = attention
        elif rope_type == "p":
            p = _number(params, "p", positive=False)
            if not 0 <= p <= 1:
                raise ValueError(f"scaling['p'] must be in [0, 1], got {p!r}")
            fields["p"] = p
        return cls(**fields)

    @property
    def depends_on_length(self) -> bool:
        """True when the frequencies change with the sequence length (dynamic NTK, LongRoPE)."""
        return self.rope_type in ("dynamic", "longrope")

    def check(self, rotary_dim: int) -> None:
        """Errors that need rotary_dim: factor lists of the wrong length, NTK exponents that divide by zero."""
        if self.rope_type in ("ntk", "dynamic") and rotary_dim <= 2:
            raise ValueError(f"scaling rope_type {self.rope_type!r} needs rotary_dim > 2, got {rotary_dim}")
        for name in ("short_factor", "long_factor"):
            n = len(getattr(self, name))
            if self.rope_type == "longrope" and n != rotary_dim // 2:
                raise ValueError(f"scaling[{name!r}] must have rotary_dim / 2 = {rotary_dim // 2} entries, got {n}")

    def frequencies(
        self, rotary_dim: int, base: float, length: Tensor | None = None, *, device=None, dtype=torch.float64
    ) -> Tensor:
        """Scaled frequencies ``(r/2,)``, or ``(B, r/2)`` for lengths ``(B,)``.

        length: the sequence length L the schemes that depend on it (dynamic, longrope) are evaluated at, a
        tensor (so that choosing between regimes is a ``torch.where``, not Python control flow); None means
        L <= L0, i.e. the frequencies of the original context. Other schemes ignore it.
        """
        i = torch.arange(rotary_dim // 2, device=device, dtype=dtype)
        w = inverse_frequencies(rotary_dim, base, device=device, dtype=dtype)  # (r/2,)
        kind = self.rope_type
        if kind == "default":
            return w
        if kind == "linear":
            return w / self.factor
        if kind == "ntk":
            return w * self.factor ** (-2 * i / (rotary_dim - 2))
        if kind == "dynamic":
            if length is None:
                return w
            L = length.to(device=device, dtype=dtype).unsqueeze(-1)  # (..., 1)
            scale = (self.factor * L / self.original_length - (self.factor - 1)).clamp(min=1.0)
            return w * scale ** (-2 * i / (rotary_dim - 2))
        if kind == "yarn":
            return self._yarn(w, rotary_dim, base)
        if kind == "llama3":
            return self._llama3(w)
        if kind == "longrope":
            short = torch.tensor(self.short_factor, device=device, dtype=dtype)
            if length is None:
                return w / short
            long = torch.tensor(self.long_factor, device=device, dtype=dtype)
            is_long = length.to(device).unsqueeze(-1) > self.original_length  # (..., 1)
            return w / torch.where(is_long, long, short)
        # proportional / p: transformers' int(p * head_dim // 2) rotating pairs, the lowest frequencies dropped
        kept = int(self.p * rotary_dim // 2)
        return torch.where(i < kept, w, torch.zeros_like(w)) / self.factor

    def _yarn(self, w: Tensor, rotary_dim: int, base: float) -> Tensor:
        # Pairs that turn fewer than beta_slow times over the original context are interpolated (w / factor),
        # those turning more than beta_fast times are kept, and a linear ramp over pair index blends between.
        def correction_dim(rotations: float) -> float:
            return rotary_dim * math.log(self.original_length / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)  # transformers clamps to rotary_dim - 1, not r/2 - 1
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        i = torch.arange(w.shape[0], device=w.device, dtype=w.dtype)
        ramp = ((i - low) / (high - low)).clamp(0, 1)  # 0: keep w_i, 1: interpolate
        return w / self.factor * ramp + w * (1 - ramp)

    def _llama3(self, w: Tensor) -> Tensor:
        L0, lo, hi = self.original_length, self.low_freq_factor, self.high_freq_factor
        wavelength = 2 * math.pi / w
        scaled = torch.where(wavelength > L0 / lo, w / self.factor, w)
        smooth = (L0 / wavelength - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelength >= L0 / hi) & (wavelength <= L0 / lo)
        return torch.where(medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's ``0.1 * mscale * ln(s) + 1`` (1 for s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
