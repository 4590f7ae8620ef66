"""``Rotary``: learned orthogonal mixing followed by standard RoPE, for one line in ``__init__`` and one in forward.

Shapes: B batch, T sequence, H heads, D head_dim = dims // heads, r rotary_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .directions import Directions, trig_gradient
from .frequencies import angle_dtype, inverse_frequencies, rotary_angles
from .functional import compute_dtype, rope_into, rotate
from .mixing import GivensMixing, make_mixing, resolve_kind
from .scaling import Scaling

__all__ = ["Rotary", "rotary"]

_INITIAL_TABLE = 2048  # rows of the cos/sin table built at construction; it doubles on demand in eager mode
_MAX_TABLE = 1 << 17  # the table never grows past this (8 MiB per 16 pairs); later positions are computed directly
LAYOUTS = ("BTHD", "BHTD")  # 4-D layouts: (batch, seq, heads, head_dim) or (batch, heads, seq, head_dim)
_INFERENCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class Rotary(nn.Module):
    """Rotary position embedding with a learned orthogonal mixing P shared by all heads: ``x -> R(m) P x``.

    Args:
        dims: model width, ``heads * head_dim``.
        heads: number of heads; ``head_dim = dims // heads``.
        base: RoPE base; pair i turns at frequency ``base ** (-2i / rotary_dim)``. Default: scaling's
            ``rope_theta`` if it has one, else 10000.
        mixing: ``"givens"`` (head_dim // 2 disjoint plane rotations; for 3-dimensional heads this family is the
            quaternion rotation), ``"quaternion"``, ``"orthogonal"`` (full SO(head_dim)) or None (plain RoPE).
            Every choice is the identity at initialisation.
        interleaved: pairs ``(2i, 2i+1)`` (GPT-J / Meta) if True, ``(i, i + r/2)`` (GPT-NeoX / HF) if False.
        rotary_dim: channels rotated by RoPE, even, at most head_dim; default head_dim rounded down to even.
            The rest pass through RoPE unchanged (P still mixes all head_dim channels).
        learned_freq: make the frequencies learnable, as ``w_i * exp(log_freq_scale_i)`` with the scale at zero.
        scaling: a context-extension scheme as a Hugging Face ``rope_parameters`` dict (see :mod:`rotary.scaling`),
            e.g. ``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 448}``. Its
            ``rope_theta`` and ``partial_rotary_factor`` set ``base`` and ``rotary_dim`` when those are not given
            (and must agree with them when they are). Schemes with an attention factor (yarn, longrope) multiply
            the rotated channels by it, as transformers multiplies cos and sin: ``x -> a R(m) P x`` on the first
            rotary_dim channels. Dynamic NTK and LongRoPE depend on the sequence length L, by default the last
            position plus one (``offset + T``; keys included in :meth:`rotate_qk`), or ``length=`` if given.
        axes: number of position axes n (1, 2 or 3): positions are then ``(T, n)`` or ``(B, T, n)`` (e.g. (row,
            column) of image patches, (t, h, w) of video), and pair i turns by ``<w_i, r>`` (see
            :mod:`rotary.directions` and docs/nd.md). With n > 1 and no ``positions=``, token t sits at
            ``offset + t`` on every axis (text tokens in M-RoPE). axes=1 is standard RoPE.
        directions: the frequency vectors w_i: ``"axial"`` (pairs split among the axes, each axis all
            frequencies), ``"sections"`` (``sections=[pairs per axis]`` of the 1-D frequencies: Qwen2-VL's M-RoPE
            with ``interleaved=False, sections=[16, 24, 24]``), ``"oblique"`` (fixed directions spread evenly
            over the circle/sphere) or ``"mixed"`` (learned per pair and head, RoPE-Mixed). With axes=1 the fixed
            kinds are all standard RoPE.
        sections: pairs per axis for ``directions="sections"``, summing to ``rotary_dim // 2``.

    The cos/sin table and the frequencies are kept in float32/float64 whatever ``module.to(dtype)`` does, and
    are rebuilt on the new device by ``to``/``to_empty``; they are not part of the state_dict.
    """

    def __init__(
        self,
        dims: int,
        heads: int,
        *,
        base: float | None = None,
        mixing: str | None = "givens",
        interleaved: bool = True,
        rotary_dim: int | None = None,
        learned_freq: bool = False,
        scaling: dict | None = None,
        axes: int = 1,
        directions: str = "axial",
        sections: list[int] | None = None,
    ):
        super().__init__()
        for name, value in (("dims", dims), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dims % heads != 0:
            raise ValueError(f"dims ({dims}) must be divisible by heads ({heads})")
        head_dim = dims // heads
        parsed = None if scaling is None else Scaling.from_dict(scaling)
        if parsed is not None and parsed.rope_theta is not None:
            if base is not None and float(base) != parsed.rope_theta:
                raise ValueError(f"base={base!r} disagrees with scaling['rope_theta']={parsed.rope_theta!r}")
            base = parsed.rope_theta
        base = 10000.0 if base is None else base
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
        if not base > 1:
            raise ValueError(f"base must be > 1, got {base!r}")
        if parsed is not None:
            parsed.check(rotary_dim)
        self.dims, self.heads, self.head_dim, self.rotary_dim = dims, heads, head_dim, rotary_dim
        self.base = float(base)
        self.interleaved = interleaved
        self.mixing_kind = resolve_kind(mixing, head_dim)
        self.mixing = make_mixing(mixing, head_dim, self.rope_pairs())
        self.log_freq_scale = nn.Parameter(torch.zeros(rotary_dim // 2)) if learned_freq else None
        self.scaling = parsed
        self.attention_factor = 1.0 if parsed is None else parsed.attention_factor
        self.axes, self.direction_kind = axes, directions
        nd = Directions(directions, axes, rotary_dim, heads, self.base, sections)  # validates all three
        # fixed directions on one axis are standard RoPE: those modules keep the 1-D path, unchanged
        self.directions = nd if axes > 1 or directions == "mixed" else None
        if self.directions is not None and parsed is not None:
            raise ValueError("scaling= is for 1-D positions; N-D directions take none")
        if directions == "mixed" and learned_freq:
            raise ValueError('directions="mixed" learns the frequency vectors already; drop learned_freq')
        # what the inference path needs to know, fixed at construction: angles that only the table holds (no
        # learned frequencies, no dependence on the length), and a layout that is one complex multiply
        self._fixed_angles = self.log_freq_scale is None and not self._length_dependent and self.directions is None
        self._full_complex = interleaved and rotary_dim == head_dim
        self.register_buffer("cos_cached", torch.empty(0, rotary_dim // 2), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0, rotary_dim // 2), persistent=False)
        # Length-dependent schemes compute cos/sin per call from the length, so they keep no table.
        self._build_tables(0 if self._length_dependent else _INITIAL_TABLE, device=self.cos_cached.device)

    # ----------------------------------------------------------------------------------------- set-up
    def rope_pairs(self) -> list[tuple[int, int]]:
        """The channel pairs RoPE rotates, in this module's layout."""
        half = self.rotary_dim // 2
        if self.interleaved:
            return [(2 * i, 2 * i + 1) for i in range(half)]
        return [(i, i + half) for i in range(half)]

    def reset_parameters(self) -> None:
        """Identity mixing, unscaled frequencies, default planes (e.g. after ``to_empty``)."""
        if self.mixing is not None:
            self.mixing.reset_parameters()
        if self.log_freq_scale is not None:
            with torch.no_grad():
                self.log_freq_scale.zero_()
        if self.directions is not None:
            self.directions.reset_parameters()

    @property
    def _length_dependent(self) -> bool:
        return self.scaling is not None and self.scaling.depends_on_length

    def _build_tables(self, length: int, device) -> None:
        with torch.inference_mode(False):  # growing under inference_mode must not leave inference tensors behind
            self._fill_tables(length, device)

    def _fill_tables(self, length: int, device) -> None:
        positions = torch.arange(length, device=device, dtype=angle_dtype(device))
        angles = rotary_angles(positions, self._base_freqs(device))
        self.cos_cached, self.sin_cached = self._scaled_cos_sin(angles, torch.float32)
        # The same table as complex cos + i sin, for the inference path. A plain attribute, not a buffer: a module
        # cast (``.to(bfloat16)``) would drop the imaginary part of a complex buffer before _apply rebuilds it.
        self.cis_cached = torch.complex(self.cos_cached, self.sin_cached)

    def _scaled_cos_sin(self, angles: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:  # yarn / longrope: transformers scales cos and sin, so do we
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def _apply(self, fn, recurse=True):
        # Casts (module.half(), .to(bfloat16)) would round the tables; to_empty() would leave garbage in them.
        # Both are rebuilt, always in float32, on whatever device the module now lives on.
        super()._apply(fn, recurse)
        self._build_tables(self.cos_cached.shape[0], device=self.cos_cached.device)
        return self

    def _base_freqs(self, device, length: Tensor | None = None) -> Tensor:
        if self.directions is not None:  # N-D: the magnitude of each w_i (its only axis' frequency if separable)
            return self.directions.magnitudes.to(device=device, dtype=angle_dtype(device))
        if self.scaling is not None:
            return self.scaling.frequencies(
                self.rotary_dim, self.base, length, device=device, dtype=angle_dtype(device)
            )
        return inverse_frequencies(self.rotary_dim, self.base, device=device, dtype=angle_dtype(device))

    def frequencies(self, length: int | Tensor | None = None) -> Tensor:
        """Current frequencies ``(rotary_dim // 2,)`` in the angle dtype (float64 where available).

        length: the sequence length at which length-dependent scaling (dynamic, longrope) is evaluated, an int,
        ``()`` or ``(B,)`` tensor (then the result is ``(B, rotary_dim // 2)``); None: the original context's.

        N-D (``axes > 1`` or ``directions="mixed"``): the frequency vectors w_i, ``(rotary_dim // 2, axes)``, or
        ``(heads, rotary_dim // 2, axes)`` for "mixed"; pair i turns by ``<w_i, r>``.
        """
        if self.directions is not None:
            return self.directions.vectors(self._freq_scale())
        device = self.cos_cached.device
        if length is not None and not isinstance(length, Tensor):
            length = torch.tensor(length, device=device)
        freqs = self._base_freqs(device, length)
        if self.log_freq_scale is not None:
            freqs = freqs * torch.exp(self.log_freq_scale.to(freqs.dtype))
        return freqs

    def _freq_scale(self) -> Tensor | None:
        if self.log_freq_scale is None:
            return None
        return torch.exp(self.log_freq_scale.to(angle_dtype(self.cos_cached.device)))

    def mixing_matrix(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The dense P ``(head_dim, head_dim)``, or None without mixing."""
        return None if self.mixing is None else self.mixing.matrix(dtype)

    def remove_mixing(self) -> Tensor | None:
        """Drop P from this module and return it dense, float64 ``(head_dim, head_dim)`` (None without mixing).

        For folding P into projection weights (:func:`rotary.fold.fold_mixing`): the module then computes plain
        RoPE on whatever already carries P.
        """
        if self.mixing is None:
            return None
        with torch.no_grad():
            P = self.mixing.matrix(torch.float64)
        self.mixing, self.mixing_kind = None, None
        return P

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        *,
        offset: int | Tensor = 0,
        positions: Tensor | None = None,
        length: int | Tensor | None = None,
        layout: str = "BTHD",
        mix: bool = True,
    ) -> Tensor:
        """Rotate x at positions ``offset + arange(T)`` (or ``positions``): ``R(m) P x``.

        Args:
            x: ``(B, T, dims)``, or 4-D in ``layout``: ``"BTHD"`` ``(B, T, H, D)`` or ``"BHTD"`` ``(B, H, T, D)``
                (Hugging Face, SDPA), where H is ``heads`` or any divisor of it (grouped-query keys share P).
                Floating point; any strides (a transposed view is read in place, not copied).
            offset: int, or ``(B,)`` integer tensor (per-row offsets, e.g. left-padded batches in a KV cache).
            positions: ``(T,)`` or ``(B, T)``, int or float; overrides offset. With ``axes=n``: ``(T, n)`` or
                ``(B, T, n)`` (for n = 1 both forms).
            length: only for length-dependent scaling (dynamic, longrope): the sequence length L to evaluate the
                frequencies at, int or ``()`` / ``(B,)`` integer tensor. Default: ``offset + T``, or
                ``positions.max(-1) + 1`` (per row). Fix it (e.g. to the longest length you will decode) to
                cache rotated keys; otherwise keep keys unrotated and use :meth:`rotate_qk`.
            layout: how a 4-D x is laid out (ignored for 3-D x).
            mix: False skips P, for inputs that already carry it (P applied to the projection weights).

        Returns:
            a tensor of x's shape and dtype.
        """
        if positions is None and length is None and not torch.is_grad_enabled():
            y = self._inference(x, offset, layout, mix)
            if y is not None:
                return y
        x4, time_dim = self._as_heads(x, layout, "x")
        B, T = x4.shape[0], x4.shape[time_dim]
        cos, sin = self._cos_sin(B, T, offset, positions, x4.dtype, x4.device, length)
        y = self._rotate(x4, cos, sin, time_dim, mix)
        return y.reshape(x.shape) if x.dim() == 3 else y

    def rotate_qk(
        self,
        q: Tensor,
        k: Tensor,
        *,
        offset: int | Tensor = 0,
        positions: Tensor | None = None,
        length: int | Tensor | None = None,
        layout: str = "BHTD",
        mix: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Rotate attention queries and keys, laid out ``(B, H, T, D)`` by default (``layout="BTHD"`` for the other).

        k may be longer than q (keys from a KV cache): keys sit at ``offset + arange(Tk)`` (or ``positions``,
        ``(Tk,)`` or ``(B, Tk)``; ``(Tk, n)`` or ``(B, Tk, n)`` with ``axes=n``) and the queries at the last ``Tq``
        of those positions. k may have fewer heads than q (grouped-query attention) when its head count divides
        q's, except with ``directions="mixed"`` (each head turns its own way). With length-dependent scaling the
        length defaults to ``offset + Tk``: passing the whole unrotated key cache each step gives exactly what a
        full forward over the same tokens gives.
        """
        time_dim = 2 if layout == "BHTD" else 1  # heads are the other middle axis, 3 - time_dim
        if positions is None and length is None and not torch.is_grad_enabled() and q.dim() == k.dim() == 4:
            if _qk_match(q, k, time_dim):
                k_rot = self._inference(k, offset, layout, mix)
                q_rot = self._inference(q, offset + (k.shape[time_dim] - q.shape[time_dim]), layout, mix)  # last Tq
                if q_rot is not None and k_rot is not None:
                    return q_rot, k_rot
        q4, time_dim = self._as_heads(q, layout, "q", need_3d=False)
        k4, _ = self._as_heads(k, layout, "k", need_3d=False)
        B, Tq, Tk = q4.shape[0], q4.shape[time_dim], k4.shape[time_dim]
        if not _qk_match(q4, k4, time_dim):
            raise ValueError(
                f"k must have q's batch, at least q's length and a number of heads dividing q's ({layout}), "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        cos, sin = self._cos_sin(B, Tk, offset, positions, k4.dtype, k4.device, length)
        k_rot = self._rotate(k4, cos, sin, time_dim, mix)
        last = (..., slice(Tk - Tq, None), slice(None)) + ((slice(None),) if self._per_head else ())  # the last Tq
        q_rot = self._rotate(q4, cos[last], sin[last], time_dim, mix)
        return q_rot, k_rot

    def cos_sin(self, positions: Tensor, *, length: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles at ``positions`` (any shape ``(...)``, int or float), float32 ``(..., r/2)``.

        What this module rotates with (learned frequencies and scaling included), for hosts that apply the
        rotation themselves. ``length``: as in :meth:`forward` (length-dependent scaling only).

        N-D (``axes > 1`` or ``directions="mixed"``): positions ``(..., axes)``; the result is ``(..., r/2)``, or
        ``(..., heads, r/2)`` for "mixed".
        """
        if not isinstance(positions, Tensor) or positions.dtype == torch.bool or positions.is_complex():
            raise ValueError(f"positions must be an integer or float tensor, got {positions!r}")
        if self.directions is not None:
            if length is not None:
                raise ValueError("length= is for length-dependent scaling, which N-D directions do not take")
            if positions.dim() == 0 or positions.shape[-1] != self.axes:
                raise ValueError(f"positions must have a trailing axis dimension of {self.axes} (Rotary(axes="
                                 f"{self.axes})), got shape {tuple(positions.shape)}")
            return self._at_nd(positions, torch.float32)
        length = self._check_length(positions.shape[0] if positions.dim() > 1 else 1, length)
        if length is None and self._length_dependent:
            length = positions.amax(dim=-1) + 1 if positions.numel() else None
        return self._at(positions, torch.float32, length)

    def _inference(self, x: Tensor, offset, layout: str, mix: bool) -> Tensor | None:
        """The no-grad path at the cost of the work: None where it does not apply (then forward takes the general
        path, which also raises every bad-input error).

        Applies to positions ``offset + arange(T)`` served by the table (int offsets, or ``(B,)`` offsets gathered
        from it), float32/bf16/fp16 input, frequencies that do not depend on a parameter or on the length. The cost
        at decode shapes is then what a bare complex multiply by a precomputed table row costs (Meta's
        ``freqs_cis``), plus a gather for tensor offsets and, unfolded, the Givens mixing: the general path's
        per-call validation, dtype juggling and autograd.Function dispatch are what dominate at one token.
        """
        # Every check here is a cheap attribute read: at one token, Python overhead is the whole cost.
        if not self._fixed_angles or x.dtype not in _INFERENCE_DTYPES or torch.compiler.is_compiling():
            return None
        rank = x.dim()
        if rank == 3:
            if x.shape[2] != self.dims:
                return None
            x4, time_dim = x.unflatten(-1, (self.heads, self.head_dim)), 1  # (B, T, H, D)
        elif rank == 4 and x.shape[3] == self.head_dim and (layout == "BTHD" or layout == "BHTD"):
            x4, time_dim = x, (1 if layout == "BTHD" else 2)
            if self.heads % x.shape[3 - time_dim] != 0:
                return None
            if time_dim == 2 and _transposed_buffer(x):
                y = self._inference(x.transpose(1, 2), offset, "BTHD", mix)
                return None if y is None else y.transpose(1, 2)
        else:
            return None
        T = x4.shape[time_dim]
        table = self.cis_cached  # (rows, r/2) complex
        if type(offset) is int:
            if not 0 <= offset <= table.shape[0] - T:
                return None  # the general path grows the table or computes these rows
            cis = table[offset : offset + T]  # (T, r/2)
            cis = cis.unsqueeze(-2) if time_dim == 1 else cis  # (T, 1, r/2) against (B, T, H, D); (T, r/2) for BHTD
        elif isinstance(offset, Tensor) and offset.dim() == 1 and offset.dtype in _INDEX_DTYPES:
            B = x4.shape[0]
            if offset.shape[0] != B:
                return None
            index = offset if T == 1 else (offset.view(B, 1) + torch.arange(T, device=offset.device)).view(-1)
            if table.is_cpu:
                try:  # index_select checks the range itself on CPU: no separate bounds pass
                    cis = table.index_select(0, index)  # (B * T, r/2)
                except (IndexError, RuntimeError):
                    return None
            else:  # on accelerators a bad index is an asynchronous device assert: check first (one sync)
                lo, hi = torch.aminmax(index)
                if int(lo) < 0 or int(hi) >= table.shape[0]:
                    return None
                cis = table[index.to(table.device)]
            # (B, T, 1, r/2) against (B, T, H, D); (B, 1, T, r/2) against (B, H, T, D)
            cis = cis.view(B, T, 1, -1) if time_dim == 1 else cis.view(B, 1, T, -1)
        else:
            return None
        xf = x4 if x4.dtype == torch.float32 else x4.float()
        if mix and self.mixing is not None:
            xf = self.mixing.apply_frozen(xf)
        if self._full_complex and xf.is_contiguous():
            y = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * cis).flatten(-2)
        else:
            y = torch.empty_like(xf)
            rope_into(y, xf, cis.real, cis.imag, self.interleaved, rot=cis)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(x.shape) if rank == 3 else y

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor, time_dim: int, mix: bool) -> Tensor:
        """``R P x`` for a 4-D x whose time axis is ``time_dim`` (1 or 2); cos/sin ``(T, r/2)`` or ``(B, T, r/2)``,
        or ``(T, H, r/2)`` or ``(B, T, H, r/2)`` for per-head directions."""
        if self._per_head and (cos.requires_grad or sin.requires_grad) and not torch.compiler.is_compiling():
            # learned directions, eager: the fast kernel on detached cos/sin, their gradient taken from its output
            y = self._rotate(x, cos.detach(), sin.detach(), time_dim, mix)
            if time_dim == 2:
                cos, sin = cos.transpose(-2, -3), sin.transpose(-2, -3)  # (.., H, T, r/2) against (B, H, T, D)
            return trig_gradient(y, cos, sin, interleaved=self.interleaved)
        if time_dim == 2 and _transposed_buffer(x):
            return self._rotate(x.transpose(1, 2), cos, sin, 1, mix).transpose(1, 2)
        if self._per_head:
            if x.shape[3 - time_dim] != self.heads:
                raise ValueError(f'directions="mixed" turns each head its own way: x needs all {self.heads} heads, '
                                 f"got {x.shape[3 - time_dim]} (grouped-query keys cannot share them)")
            if time_dim == 2:
                cos, sin = cos.transpose(-2, -3), sin.transpose(-2, -3)  # (.., H, T, r/2) against (B, H, T, D)
        elif time_dim == 1:
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T | B,T, 1, r/2) against (B, T, H, D)
        elif cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, r/2) against (B, H, T, D)
        mixing = self.mixing if mix else None
        if isinstance(mixing, GivensMixing):
            return rotate(x, cos, sin, interleaved=self.interleaved, givens=mixing.coefficients(x.dtype))
        if mixing is not None:  # dense P: one small matmul in float32+, rounded once after RoPE
            P = mixing.matrix(x.dtype)
            # contiguous first: a matmul's rounding depends on its input's strides, the result should not
            return rotate(x.to(P.dtype).contiguous() @ P.T, cos, sin, interleaved=self.interleaved, out_dtype=x.dtype)
        return rotate(x, cos, sin, interleaved=self.interleaved)

    # ----------------------------------------------------------------------------------------- inputs
    def _as_heads(self, x: Tensor, layout: str, name: str, need_3d: bool = True) -> tuple[Tensor, int]:
        """x as 4-D heads and the index of its time axis; validates shape, dtype and layout."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"Rotary expects a floating-point tensor {name}, got {getattr(x, 'dtype', type(x))}")
        if x.dim() == 3 and need_3d:
            if x.shape[-1] != self.dims:
                raise ValueError(f"expected {name} of shape (batch, seq, dims={self.dims}), got {tuple(x.shape)}")
            return x.unflatten(-1, (self.heads, self.head_dim)), 1  # (B, T, H, D)
        time_dim = 1 if layout == "BTHD" else 2
        heads = x.shape[3 - time_dim] if x.dim() == 4 else None
        if x.dim() != 4 or x.shape[-1] != self.head_dim or self.heads % heads != 0:
            ranks = "rank 3 (batch, seq, dims) or 4" if need_3d else "rank 4"
            dims = "(batch, seq, heads, head_dim)" if layout == "BTHD" else "(batch, heads, seq, head_dim)"
            raise ValueError(
                f"expected {name} of {ranks} {dims} with head_dim={self.head_dim} and heads={self.heads} or a "
                f"divisor of it (layout={layout!r}), got shape {tuple(x.shape)}"
            )
        return x, time_dim

    def _cos_sin(
        self, B: int, T: int, offset, positions, dtype: torch.dtype, device, length=None
    ) -> tuple[Tensor, Tensor]:
        """cos/sin ``(T, r/2)`` or ``(B, T, r/2)`` in the compute dtype of x."""
        cdtype = compute_dtype(dtype)
        if self.directions is not None:
            return self._cos_sin_nd(B, T, offset, positions, cdtype, device, length)
        length = self._check_length(B, length)
        if (
            isinstance(positions, Tensor) and positions.dim() in (2, 3) and positions.shape[-1] == 1
            and positions.shape[:-1] in ((T,), (B, T)) and positions.shape != (B, T)
        ):
            positions = positions.squeeze(-1)  # (T, 1) or (B, T, 1): one axis, given with its axis dimension
        if positions is not None:
            if not isinstance(positions, Tensor) or not (
                (positions.dim() == 1 and positions.shape[0] == T) or (positions.dim() == 2 and positions.shape == (B, T))
            ):
                shape = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
                raise ValueError(f"positions must be a tensor of shape ({T},) or ({B}, {T}) (or ({T}, 1), "
                                 f"({B}, {T}, 1)), got {shape}")
            if positions.dtype == torch.bool or positions.is_complex():
                raise ValueError(f"positions must be an integer or float tensor, got dtype {positions.dtype}")
            if length is None and self._length_dependent and T > 0:
                length = positions.amax(dim=-1) + 1  # () or (B,): transformers' max(position_ids) + 1, per row
            return self._at(positions, cdtype, length)
        if isinstance(offset, Tensor):
            pos = _offset_positions(B, T, offset)
            if length is None and self._length_dependent:
                length = offset + T
            return self._at(pos, cdtype, length)
        _check_int_offset(offset)
        if self._length_dependent:
            pos = torch.arange(offset, offset + T, device=device)
            if length is None:
                # a tensor, not a Python int: choosing a regime is then torch.where, with no guard to recompile on
                length = torch.arange(offset + T, offset + T + 1, device=device).squeeze(0)
            return self._direct(pos, cdtype, length)
        if self.log_freq_scale is not None or cdtype == torch.float64:
            return self._direct(torch.arange(offset, offset + T, device=device), cdtype)
        if offset + T > self.cos_cached.shape[0]:
            if torch.compiler.is_compiling() or not self._grow(offset + T):
                # no buffer growth inside a graph, nor past the largest table: compute these rows directly
                return self._direct(torch.arange(offset, offset + T, device=device), cdtype)
        return self.cos_cached[offset : offset + T], self.sin_cached[offset : offset + T]

    def _grow(self, rows: int) -> bool:
        """Grow the table (doubling) to hold ``rows`` rows, if that stays within ``_MAX_TABLE``; eager only.

        The one state change of forward: the table is a cache of constants, so results do not depend on it.
        """
        length = max(self.cos_cached.shape[0], 1)
        while length < rows:
            length *= 2
        if length > _MAX_TABLE:
            return False
        self._build_tables(length, device=self.cos_cached.device)
        return True

    def _at(self, positions: Tensor, cdtype: torch.dtype, length: Tensor | None) -> tuple[Tensor, Tensor]:
        """cos/sin at explicit positions ``(...)``: integer positions inside the table are gathered from it;
        float positions, positions past it, and whatever the table cannot serve are computed directly."""
        if (
            positions.is_floating_point()
            or self._length_dependent
            or self.log_freq_scale is not None
            or cdtype == torch.float64
            or torch.compiler.is_compiling()
            or positions.numel() == 0
        ):
            return self._direct(positions, cdtype, length)
        positions = positions.to(self.cos_cached.device)
        lo, hi = torch.aminmax(positions)
        lo, hi = int(lo), int(hi)  # one host sync, the price of choosing gather or direct per call
        if hi >= self.cos_cached.shape[0] and lo >= 0:
            self._grow(hi + 1)
        rows = self.cos_cached.shape[0]
        if lo >= 0 and hi < rows:
            return self.cos_cached[positions], self.sin_cached[positions]
        inside = (positions >= 0) & (positions < rows)
        index = torch.where(inside, positions, torch.zeros_like(positions))
        cos, sin = self.cos_cached[index], self.sin_cached[index]
        outside = ~inside
        c, s = self._direct(positions[outside], cdtype)
        cos[outside], sin[outside] = c, s
        return cos, sin

    def _check_length(self, B: int, length) -> Tensor | None:
        if length is None:
            return None
        if isinstance(length, Tensor):
            if length.dim() > 1 or (length.dim() == 1 and length.shape[0] != B):
                raise ValueError(f"a tensor length must have shape () or ({B},), got {tuple(length.shape)}")
            if length.is_floating_point() or length.is_complex() or length.dtype == torch.bool:
                raise ValueError(f"length must be an integer tensor, got dtype {length.dtype}")
            return length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int or an integer tensor, got {length!r}")
        return torch.tensor(length, device=self.cos_cached.device)

    def _direct(self, positions: Tensor, cdtype: torch.dtype, length: Tensor | None = None) -> tuple[Tensor, Tensor]:
        freqs = self.frequencies(length if self._length_dependent else None)  # (r/2,) or (B, r/2)
        positions = positions.to(self.cos_cached.device)
        if freqs.dim() == 2:  # per-row frequencies: (B, 1, r/2) against positions (T,) or (B, T)
            angles = rotary_angles(positions, freqs.unsqueeze(-2))
        else:
            angles = rotary_angles(positions, freqs)
        return self._scaled_cos_sin(angles, cdtype)

    # ----------------------------------------------------------------------------------------- N-D positions
    @property
    def _per_head(self) -> bool:
        return self.directions is not None and self.directions.per_head

    def _cos_sin_nd(self, B: int, T: int, offset, positions, cdtype: torch.dtype, device,
                    length) -> tuple[Tensor, Tensor]:
        """N-D cos/sin ``(T, r/2)`` or ``(B, T, r/2)``; ``(T, H, r/2)`` or ``(B, T, H, r/2)`` for per-head
        directions."""
        n = self.axes
        if length is not None:
            raise ValueError("length= is for length-dependent scaling, which N-D directions do not take")
        if positions is None:  # every axis at offset + t: text tokens in M-RoPE
            if isinstance(offset, Tensor):
                pos = _offset_positions(B, T, offset)  # (B, T) or (T,)
            else:
                _check_int_offset(offset)
                pos = torch.arange(offset, offset + T, device=device)
            return self._at_nd(pos.unsqueeze(-1).expand(*pos.shape, n), cdtype)
        if not isinstance(positions, Tensor):
            raise ValueError(f"positions must be a tensor of shape ({T}, {n}) or ({B}, {T}, {n}), got "
                             f"{type(positions).__name__}")
        if n == 1 and positions.shape in ((T,), (B, T)):
            positions = positions.unsqueeze(-1)  # one axis given without its axis dimension
        if positions.shape not in ((T, n), (B, T, n)):
            hint = ""
            if positions.dim() in (2, 3) and positions.shape[:-1] in ((T,), (B, T)):
                hint = f": {positions.shape[-1]} axes given, the module has axes={n}"
            raise ValueError(f"positions must be a tensor of shape ({T}, {n}) or ({B}, {T}, {n}), got "
                             f"{tuple(positions.shape)}{hint}")
        if positions.dtype == torch.bool or positions.is_complex():
            raise ValueError(f"positions must be an integer or float tensor, got dtype {positions.dtype}")
        return self._at_nd(positions, cdtype)

    def _at_nd(self, positions: Tensor, cdtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin of ``<w_i, r>`` at positions ``(..., n)``. Separable directions (axial, sections) at integer
        positions gather each pair's column of the table at its own axis' coordinate (one index_select, one gather
        each for cos and sin: no trigonometry per call); everything else is computed directly, angles in float64."""
        d = self.directions
        positions = positions.to(self.cos_cached.device)
        if (
            d.separable
            and not positions.is_floating_point()
            and self.log_freq_scale is None
            and cdtype == torch.float32
            and not torch.compiler.is_compiling()
            and positions.numel() > 0
        ):
            index = positions.index_select(-1, d.pair_axis)  # (..., r/2): each pair's own coordinate
            lo, hi = torch.aminmax(index)
            lo, hi = int(lo), int(hi)  # one host sync, as in the 1-D path
            if lo >= 0 and hi >= self.cos_cached.shape[0]:
                self._grow(hi + 1)
            if lo >= 0 and hi < self.cos_cached.shape[0]:
                flat = index.reshape(-1, index.shape[-1])  # (N, r/2)
                cos, sin = self.cos_cached.gather(0, flat), self.sin_cached.gather(0, flat)
                return cos.view(index.shape), sin.view(index.shape)
        if d.per_head:
            return d.cos_sin(positions, cdtype)  # no attention factor: N-D takes no scaling
        return self._scaled_cos_sin(d.angles(positions, self._freq_scale()), cdtype)

    def extra_repr(self) -> str:
        nd = "" if self.axes == 1 and self.direction_kind == "axial" else (
            f", axes={self.axes}, directions={self.direction_kind!r}"
            + (f", sections={self.directions.counts if self.directions is not None else [self.rotary_dim // 2]}"
               if self.direction_kind == "sections" else "")
        )
        return (
            f"dims={self.dims}, heads={self.heads}, head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
            f"base={self.base:g}, mixing={self.mixing_kind!r}, interleaved={self.interleaved}, "
            f"learned_freq={self.log_freq_scale is not None}"
            + ("" if self.scaling is None else f", scaling={self.scaling.rope_type!r}")
            + nd
        )


def _transposed_buffer(x: Tensor) -> bool:
    """Whether a (B, H, T, D) x is a (B, T, H, D) buffer seen transposed (``q_proj(x).view(...).transpose(1, 2)``).

    Both paths then work on the buffer in its own memory order: no copy, and the roundings of a contiguous input.
    """
    return not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def _qk_match(q: Tensor, k: Tensor, time_dim: int) -> bool:
    """k has q's batch, at least q's length, and a head count dividing q's (grouped-query attention)."""
    heads = 3 - time_dim
    return q.shape[0] == k.shape[0] and k.shape[time_dim] >= q.shape[time_dim] and q.shape[heads] % k.shape[heads] == 0


def _offset_positions(B: int, T: int, offset: Tensor) -> Tensor:
    """Positions ``offset + arange(T)`` for a ``()`` or ``(B,)`` integer tensor offset: ``(T,)`` or ``(B, T)``."""
    if offset.dim() > 1 or (offset.dim() == 1 and offset.shape[0] != B):
        raise ValueError(f"a tensor offset must have shape () or ({B},), got {tuple(offset.shape)}")
    if offset.is_floating_point() or offset.is_complex() or offset.dtype == torch.bool:
        raise ValueError(f"offset must be an integer tensor (use positions= for float), got {offset.dtype}")
    steps = torch.arange(T, device=offset.device)
    return offset.unsqueeze(-1) + steps if offset.dim() == 1 else offset + steps


def _check_int_offset(offset) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int or an integer tensor, got {offset!r}")


rotary = Rotary  # the original module's spelling: ``self.rotary = rotary(dims=dims, heads=heads)``
