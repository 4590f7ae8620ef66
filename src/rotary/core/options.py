"""``RotaryOptions``: everything that defines a :class:`rotary.Rotary`, validated once, in one frozen record.

The record is what checkpoints store: the reference decoder's config, Hugging Face's ``config.rotary_install`` and the
install records of the integrations all hold :meth:`RotaryOptions.to_dict` and rebuild with
:meth:`RotaryOptions.from_dict` (then ``Rotary.from_options``). Derived values (``base`` from a scaling's
``rope_theta``, ``rotary_dim`` from its ``partial_rotary_factor`` or from head_dim, Givens on 3-dimensional heads
being the quaternion rotation) are resolved here, so the stored record says exactly what was built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from .directions import DIRECTIONS, MAX_AXES
from .mixing import MIXINGS, resolve_kind
from .scaling import Scaling

__all__ = ["RotaryOptions"]


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _boolean(name: str, value) -> None:
    if not isinstance(value, bool):  # 1, "yes", None: a typo for a flag must not pass as one
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class RotaryOptions:
    """The options of :class:`rotary.Rotary` (see its docstring for what each means), validated and resolved.

    After construction ``base`` is a float, ``rotary_dim`` an int, ``mixing`` the family actually built, ``scaling``
    a plain dict copy (or None) and ``sections`` a tuple (or None). Invalid options raise ``ValueError``.
    """

    dims: int
    heads: int
    base: float | None = None
    mixing: str | None = "givens"
    interleaved: bool = True
    rotary_dim: int | None = None
    learned_freq: bool = False
    scaling: dict | None = None
    axes: int = 1
    directions: str = "axial"
    sections: tuple[int, ...] | None = None
    parsed_scaling: Scaling | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        set_ = object.__setattr__.__get__(self)  # frozen: resolved values are written once, here
        _positive_int("dims", self.dims)
        _positive_int("heads", self.heads)
        if self.dims % self.heads != 0:
            raise ValueError(f"dims ({self.dims}) must be divisible by heads ({self.heads})")
        head_dim = self.dims // self.heads
        _boolean("interleaved", self.interleaved)
        _boolean("learned_freq", self.learned_freq)
        if self.mixing is not None and self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS} or None, got {self.mixing!r}")
        set_("mixing", resolve_kind(self.mixing, head_dim))

        parsed = None if self.scaling is None else Scaling.from_dict(self.scaling)
        base, rotary_dim = self.base, self.rotary_dim
        if parsed is not None and parsed.rope_theta is not None:
            if base is not None and float(base) != parsed.rope_theta:
                raise ValueError(f"base={base!r} disagrees with scaling['rope_theta']={parsed.rope_theta!r}")
            base = parsed.rope_theta
        base = 10000.0 if base is None else base
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
            raise ValueError(f"base must be a number > 1, got {base!r}")
        if parsed is not None and parsed.partial_rotary_factor is not None:
            from_factor = int(head_dim * parsed.partial_rotary_factor)  # transformers' rotary dim
            if rotary_dim is not None and rotary_dim != from_factor:
                raise ValueError(
                    f"rotary_dim={rotary_dim!r} disagrees with scaling['partial_rotary_factor'] = "
                    f"{parsed.partial_rotary_factor!r} (rotary_dim {from_factor} for head_dim {head_dim})"
                )
            rotary_dim = from_factor
        if rotary_dim is None:
            rotary_dim = head_dim - head_dim % 2
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or not (
            2 <= rotary_dim <= head_dim and rotary_dim % 2 == 0
        ):
            raise ValueError(f"rotary_dim must be an even int in [2, head_dim = {head_dim}], got {rotary_dim!r}")
        if parsed is not None:
            parsed.check(rotary_dim)
        set_("base", float(base))
        set_("rotary_dim", rotary_dim)
        set_("scaling", None if self.scaling is None else dict(self.scaling))
        set_("parsed_scaling", parsed)
        self._check_positions()

    def _check_positions(self) -> None:
        axes, kind, sections, pairs = self.axes, self.directions, self.sections, self.rotary_dim // 2
        if kind not in DIRECTIONS:
            raise ValueError(f"directions must be one of {DIRECTIONS}, got {kind!r}")
        if isinstance(axes, bool) or not isinstance(axes, int) or not 1 <= axes <= MAX_AXES:
            raise ValueError(f"axes must be 1, 2 or 3, got {axes!r}")
        if kind == "sections":
            if sections is None:
                raise ValueError('directions="sections" needs sections=[pairs per axis], e.g. [16, 24, 24]')
            if isinstance(sections, (str, bytes)) or not hasattr(sections, "__iter__"):
                raise ValueError(f"sections must be a list of {axes} ints, got {sections!r}")
            sections = tuple(sections)
            if len(sections) != axes or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sections) \
                    or sum(sections) != pairs:
                raise ValueError(f"sections must be {axes} non-negative ints summing to rotary_dim // 2 = {pairs}, "
                                 f"got {list(sections)!r}")
            object.__setattr__(self, "sections", sections)
        elif sections is not None:
            raise ValueError(f'sections= is only for directions="sections", not {kind!r}')
        elif pairs < axes and kind != "mixed":
            raise ValueError(f"rotary_dim // 2 = {pairs} pairs cannot be split among {axes} axes")
        if self.nd and self.scaling is not None:
            raise ValueError("scaling= is for 1-D positions; N-D directions take none")
        if kind == "mixed" and self.learned_freq:
            raise ValueError('directions="mixed" learns the frequency vectors already; drop learned_freq')

    @property
    def head_dim(self) -> int:
        return self.dims // self.heads

    @property
    def nd(self) -> bool:
        """Whether positions are vectors (``axes > 1``) or directions are learned: fixed directions on one axis
        are standard RoPE and take the 1-D path."""
        return self.axes > 1 or self.directions == "mixed"

    def to_dict(self) -> dict:
        """The options as JSON values (what checkpoints and ``config.json`` store); :meth:`from_dict` inverts it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["sections"] = None if self.sections is None else list(self.sections)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> RotaryOptions:
        """Rebuild from :meth:`to_dict` output; unknown keys are refused, naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"rotary options must be a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown rotary options {unknown}; expected some of {sorted(names)}")
        return cls(**data)
