"""``Angles``: where a :class:`rotary.Rotary`'s rotation angles come from, and the one table that caches them.

Shapes: B batch, T tokens, n position axes, r rotary_dim, r/2 the rotated pairs, H heads.

The angle of pair i at position m is ``m * w_i`` (1-D) or ``<w_i, r>`` (N-D positions r, see
:mod:`rotary.core.directions`). The frequencies ``w_i`` are standard RoPE's ``base ** (-2i / r)``, reshaped by a
context-extension scheme (:mod:`rotary.core.scaling`), and times ``exp(log_freq_scale_i)`` when they are learned. What
the rotation needs is cos and sin of those angles (times a scheme's attention factor), in float32, for the
positions of a call (:mod:`rotary.core.positions`): :meth:`Angles.cos_sin` is the one place that decides whether the
table serves them (gathered or sliced) or they are computed directly.

The table (``cos_table``/``sin_table``, ``(rows, r/2)`` float32, and ``cis_table``, their complex form for the
no-grad path) holds rows ``0 .. rows - 1`` of fixed angles: it starts at 2048 rows, doubles on demand in eager
mode up to 2**17, and is rebuilt in float32 on the module's device after every ``.to()``/``to_empty()``. Angles
that depend on a parameter (learned frequencies, learned directions) or on the sequence length (dynamic NTK,
LongRoPE) are always computed directly, angles in float64, and keep no table.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .directions import Directions
from .frequencies import angle_dtype, inverse_frequencies, rotary_angles
from .options import RotaryOptions
from .positions import Span, index_range

__all__ = ["Angles"]

INITIAL_ROWS = 2048  # rows of the table built at construction
MAX_ROWS = 1 << 17  # the table never grows past this (8 MiB per 16 pairs); later positions are computed directly


class Angles(nn.Module):
    """The frequencies (base, scaling, learned scale, N-D directions) and the cos/sin table of one Rotary.

    Parameters: ``log_freq_scale`` ``(r/2,)`` with ``learned_freq`` (zero: the scale is 1), the direction weights
    of ``directions="mixed"`` (in ``directions``). Not in the state_dict: the table. ``fixed``: whether the table
    holds every angle there is (no parameter, no length dependence).
    """

    def __init__(self, options: RotaryOptions):
        super().__init__()
        self.rotary_dim, self.base, self.axes = options.rotary_dim, options.base, options.axes
        self.scaling = options.parsed_scaling  # a Scaling object (None: plain RoPE); options.scaling is its dict
        self.attention_factor = 1.0 if self.scaling is None else self.scaling.attention_factor
        pairs = options.rotary_dim // 2
        self.log_freq_scale = nn.Parameter(torch.zeros(pairs)) if options.learned_freq else None
        # fixed directions on one axis are standard RoPE: those modules keep the 1-D path
        self.directions = (
            Directions(options.directions, options.axes, options.rotary_dim, options.heads, options.base,
                       None if options.sections is None else list(options.sections))
            if options.nd else None
        )
        # Fixed at construction, and read at every call: plain attributes, not property chains (a microsecond each).
        # length_dependent: whether the angles depend on the sequence length (dynamic NTK, LongRoPE).
        self.length_dependent = self.scaling is not None and self.scaling.depends_on_length
        self.fixed = not self.learned and not self.length_dependent
        self.register_buffer("cos_table", torch.empty(0, pairs), persistent=False)
        self.register_buffer("sin_table", torch.empty(0, pairs), persistent=False)
        self.build_table(0 if self.length_dependent else INITIAL_ROWS)

    # ----------------------------------------------------------------------------------------- what kind
    @property
    def learned(self) -> bool:
        """Whether the angles depend on a parameter (learned frequencies or directions)."""
        return self.log_freq_scale is not None or (self.directions is not None and self.directions.per_head)

    @property
    def per_head(self) -> bool:
        """Whether each head turns its own way (``directions="mixed"``): cos/sin then carry a head axis."""
        return self.directions is not None and self.directions.per_head

    def reset_parameters(self) -> None:
        if self.log_freq_scale is not None:
            with torch.no_grad():
                self.log_freq_scale.zero_()
        if self.directions is not None:
            self.directions.reset_parameters()

    # ----------------------------------------------------------------------------------------- frequencies
    def _base_frequencies(self, device, length: Tensor | None = None) -> Tensor:
        dtype = angle_dtype(device)
        if self.directions is not None:  # N-D: the magnitude of each w_i (its only axis' frequency if separable)
            return self.directions.magnitudes.to(device=device, dtype=dtype)
        if self.scaling is not None:
            return self.scaling.frequencies(self.rotary_dim, self.base, length, device=device, dtype=dtype)
        return inverse_frequencies(self.rotary_dim, self.base, device=device, dtype=dtype)

    def scale(self) -> Tensor | None:
        """``exp(log_freq_scale)`` ``(r/2,)`` in the angle dtype, or None without learned frequencies."""
        if self.log_freq_scale is None:
            return None
        return torch.exp(self.log_freq_scale.to(angle_dtype(self.device)))

    def frequencies(self, length: int | Tensor | None = None) -> Tensor:
        """See :meth:`rotary.Rotary.frequencies`."""
        if self.directions is not None:
            return self.directions.vectors(self.scale())
        if length is not None and not isinstance(length, Tensor):
            length = torch.tensor(length, device=self.device)
        freqs = self._base_frequencies(self.device, length)
        scale = self.scale()
        return freqs if scale is None else freqs * scale

    # ----------------------------------------------------------------------------------------- the table
    def build_table(self, rows: int) -> None:
        """(Re)build rows ``0 .. rows - 1`` of the table on the module's device; 0 rows drops it."""
        self.device = self.cos_table.device  # where the table lives, a plain attribute: read at every call
        with torch.inference_mode(False):  # growing under inference_mode must not leave inference tensors behind
            positions = torch.arange(rows, device=self.device, dtype=angle_dtype(self.device))
            self.cos_table, self.sin_table = self._finish(rotary_angles(positions, self._base_frequencies(self.device)),
                                                          torch.float32)
            # Complex cos + i sin for the no-grad path. A plain attribute, not a buffer: a module cast
            # (``.to(bfloat16)``) would drop the imaginary part of a complex buffer before _apply rebuilds it.
            self.cis_table = torch.complex(self.cos_table, self.sin_table)
            # Views the decode steps read, so that none is made per step: a slice of (rows, 1, r/2) broadcasts
            # against (B, T, H, r/2); a gather of (rows, 1, 1, r/2) by a (B,) start against one token in either layout
            self.cis_rows = self.cis_table.unsqueeze(-2)
            self.cis_batch_rows = self.cis_rows.unsqueeze(-2)

    def _apply(self, fn, recurse=True):
        # Casts (module.half(), .to(bfloat16)) would round the table; to_empty() would leave garbage in it.
        # It is rebuilt, always in float32, on whatever device the module now lives on.
        super()._apply(fn, recurse)
        self.build_table(self.cos_table.shape[0])
        return self

    @property
    def rows(self) -> int:
        """Rows the table holds now."""
        return self.cos_table.shape[0]

    def grow(self, rows: int) -> bool:
        """Grow the table (doubling) to hold ``rows`` rows, if that stays within ``MAX_ROWS``; eager only.

        The one state change of a forward: the table is a cache of constants, so results do not depend on it.
        """
        if rows <= self.cos_table.shape[0]:
            return True
        if torch.compiler.is_compiling():  # no buffer growth inside a graph
            return False
        size = max(self.cos_table.shape[0], 1)
        while size < rows:
            size *= 2
        if size > MAX_ROWS:
            return False
        self.build_table(size)
        return True

    def holds(self, end) -> bool:
        """Whether the table holds rows ``0 .. end - 1``, grown to if need be (:meth:`grow`). A symbolic end
        (``torch.export`` with a dynamic length) only where it provably does, for every length the graph takes:
        a guard on it would pin the length; the rest is computed directly."""
        if type(end) is int:
            return self.grow(end)
        # imported here: symbolic_shapes loads sympy, and only a trace (which has loaded it) gets here
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return statically_known_true(end <= self.rows)

    def _finish(self, angles: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:  # yarn / longrope: transformers scales cos and sin, so do we
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    # ----------------------------------------------------------------------------------------- lookup
    def cos_sin(self, where: Span | Tensor, dtype: torch.dtype, length: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin at the positions of a call, in ``dtype`` (float32, or float64 for float64 input).

        where: a :class:`Span`, or positions ``(...)`` (1-D) / ``(..., n)`` (N-D), integer or float.
        length: the ``()``/``(B,)`` length of length-dependent scaling (None otherwise).
        Returns ``(..., r/2)``; with per-head directions ``(..., H, r/2)``; a ``(B,)`` length adds a leading B to
        :class:`Span` results (``(B, T, r/2)``).

        The table serves a call when its angles are fixed, the result is float32 and the positions are integers
        inside ``[0, MAX_ROWS)`` (it grows to hold them, in eager mode; a compiled or exported graph slices it for
        an int offset whose rows it provably holds and computes everything else); everything else is computed
        directly.
        """
        table = self.fixed and dtype == torch.float32
        if isinstance(where, Span) and not isinstance(where.start, Tensor):
            end = where.start + where.count
            # a slice of the table, also in a graph where the end provably lies inside it (it cannot grow there)
            if table and self.holds(end):
                return self.cos_table[where.start : end], self.sin_table[where.start : end]
        if isinstance(where, Span):
            where = where.tensor(self.device)
        where = where.to(self.device)
        if self.directions is not None:
            return self._cos_sin_nd(where, dtype, table)
        span = index_range(where) if table else None
        if span is None:
            return self._direct(where, dtype, length)
        lo, hi = span
        if lo >= 0:
            self.grow(hi + 1)
        rows = self.rows
        if lo >= 0 and hi < rows:
            return self.cos_table[where], self.sin_table[where]
        inside = (where >= 0) & (where < rows)  # some rows from the table, the rest computed
        index = torch.where(inside, where, torch.zeros_like(where))
        cos, sin = self.cos_table[index], self.sin_table[index]
        outside = ~inside
        cos[outside], sin[outside] = self._direct(where[outside], dtype)
        return cos, sin

    def _direct(self, positions: Tensor, dtype: torch.dtype, length: Tensor | None = None) -> tuple[Tensor, Tensor]:
        freqs = self.frequencies(length if self.length_dependent else None)  # (r/2,) or (B, r/2)
        if freqs.dim() == 2:  # per-row frequencies: (B, 1, r/2) against positions (T,) or (B, T)
            freqs = freqs.unsqueeze(-2)
        return self._finish(rotary_angles(positions, freqs), dtype)

    def _cos_sin_nd(self, positions: Tensor, dtype: torch.dtype, table: bool) -> tuple[Tensor, Tensor]:
        """cos/sin of ``<w_i, r>`` at positions ``(..., n)``. Separable directions (axial, sections) at integer
        positions gather each pair's column of the table at its own axis' coordinate (no trigonometry per call);
        everything else is computed directly, angles in float64."""
        d = self.directions
        index = positions.index_select(-1, d.pair_axis) if table and d.separable else None  # (..., r/2)
        span = None if index is None else index_range(index)  # each pair reads its own axis' coordinate
        if span is not None and span[0] >= 0 and self.grow(span[1] + 1):
            flat = index.reshape(-1, index.shape[-1])  # (N, r/2)
            cos, sin = self.cos_table.gather(0, flat), self.sin_table.gather(0, flat)
            return cos.view(index.shape), sin.view(index.shape)
        if d.per_head:
            return d.cos_sin(positions, dtype)  # no attention factor: N-D takes no scaling
        return self._finish(d.angles(positions, self.scale()), dtype)

    def extra_repr(self) -> str:
        return (f"rotary_dim={self.rotary_dim}, base={self.base:g}, learned_freq={self.log_freq_scale is not None}"
                + ("" if self.scaling is None else f", scaling={self.scaling.rope_type!r}"))
