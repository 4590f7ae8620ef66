"""``InstallOptions``: everything an install was asked for, as one frozen, serialisable record.

The Rotary's own options are a :class:`rotary.core.options.RotaryOptions`; the host's (where the rotation acts,
whether the host's learned position table stays, one P per layer, how P is applied) sit next to it. The record is
validated once, here, before any host model is touched; :meth:`InstallOptions.to_dict` is what checkpoints store
(Hugging Face's ``config.rotary_install``, the install record's extra state) and :meth:`InstallOptions.from_dict`
rebuilds it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass

from ...core.options import RotaryOptions

__all__ = ["FORMAT", "MIX_NORM", "MIX_ON", "PLACEMENTS", "InstallOptions", "flag"]

PLACEMENTS = ("attention", "embedding")
MIX_ON = ("weights", "activations")
MIX_NORM = ("before", "after")
FORMAT = "rotary.install/1"  # the format tag of InstallOptions.to_dict (config.rotary_install, extra state)


def flag(name: str, value) -> None:
    """Refuse anything but True or False, naming it: 1, "yes" or None must not pass as a flag."""
    if value is not True and value is not False:
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class InstallOptions:
    """The options of one install, validated once (invalid values raise ``ValueError`` naming them).

    Fields:
        rotary: the :class:`RotaryOptions` of the rotation. With ``per_layer``, each layer's Rotary takes its
            mixing (and one shared Rotary its angles, if they are changed).
        placement: ``"attention"`` (q and k of every self-attention) or ``"embedding"`` (once, on the embedded
            tokens: the original module's placement).
        learned_positions: the host's learned absolute table is still added (Whisper hosts).
        per_layer: one P per attention instead of one shared by all (Hugging Face causal LMs).
        mix_on: how P is applied: ``"weights"`` (a plain ``nn.Linear`` q/k projection computes
            ``F.linear(x, P W, P b)``; any other projection, adapter-wrapped or quantised, gets P on its output) or
            ``"activations"`` (P multiplies the projections' outputs, or the Rotary applies ``R(m) P x`` itself
            where the host calls it on q and k, as both Whisper installs do). The same function and tensors
            either way: a state_dict of one loads into the other.
        mix_norm: where a per-head q/k norm sits between the projections and RoPE (Qwen3, OLMo 2): P acts
            ``"before"`` it (on the projections: ``R(m) norm(P q)``; folds into them whatever the norm's weight) or
            ``"after"`` it (``R(m) P norm(q)``; folds only while the norm's weight is uniform within each head).
            Records written before this field existed meant ``"after"``.

    Each host accepts the fields that apply to it and refuses the others.
    """

    rotary: RotaryOptions
    placement: str = "attention"
    learned_positions: bool = False
    per_layer: bool = False
    mix_on: str = "weights"
    mix_norm: str = "before"

    def __post_init__(self):
        if not isinstance(self.rotary, RotaryOptions):
            raise TypeError(f"rotary must be a RotaryOptions, got {type(self.rotary).__name__}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        flag("learned_positions", self.learned_positions)
        flag("per_layer", self.per_layer)
        if self.mix_on not in MIX_ON:
            raise ValueError(f"mix_on must be one of {MIX_ON}, got {self.mix_on!r}")
        if self.mix_norm not in MIX_NORM:
            raise ValueError(f"mix_norm must be one of {MIX_NORM}, got {self.mix_norm!r}")
        if self.placement == "embedding" and self.mix_on != "activations":
            raise ValueError("the embedding placement applies P to the embedded tokens: mix_on must be 'activations'")
        if self.per_layer and self.rotary.mixing is None:
            raise ValueError("per_layer=True needs a mixing: it gives each layer its own P")

    def to_dict(self) -> dict:
        """JSON values only (what ``config.json`` holds: tuples become lists), tagged with the format."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["rotary"] = self.rotary.to_dict()
        return json.loads(json.dumps({"format": FORMAT, **out}))

    @classmethod
    def from_dict(cls, data: Mapping) -> InstallOptions:
        """Rebuild from :meth:`to_dict` output; another format or unknown keys are refused, naming them."""
        if not is_record(data):
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"not a rotary install record (expected format {FORMAT!r}, found {found!r})")
        data = {k: v for k, v in data.items() if k != "format"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown install options {unknown}; expected some of {sorted(names)}")
        data.setdefault("mix_norm", "after")  # what records written before the field existed did
        return cls(**{**data, "rotary": RotaryOptions.from_dict(data.get("rotary"))})

    def without_mixing(self) -> InstallOptions:
        """The options after a fold: no P (and so no P per layer)."""
        return dataclasses.replace(self, rotary=dataclasses.replace(self.rotary, mixing=None), per_layer=False)


def is_record(data) -> bool:
    """Whether ``data`` is :meth:`InstallOptions.to_dict` output (older installs stored flat keyword dicts)."""
    return isinstance(data, Mapping) and data.get("format") == FORMAT
