"""``Rotary``: learned orthogonal mixing followed by standard RoPE, for one line in ``__init__`` and one in forward.

Shapes: B batch, T sequence, H heads, D head_dim = dims // heads, r rotary_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .frequencies import angle_dtype, inverse_frequencies, rotary_angles
from .functional import compute_dtype, rotate
from .mixing import GivensMixing, make_mixing, resolve_kind
from .scaling import Scaling

__all__ = ["Rotary", "rotary"]

_INITIAL_TABLE = 2048  # rows of the cos/sin table built at construction; it doubles on demand in eager mode


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

    @property
    def _length_dependent(self) -> bool:
        return self.scaling is not None and self.scaling.depends_on_length

    def _build_tables(self, length: int, device) -> None:
        positions = torch.arange(length, device=device, dtype=angle_dtype(device))
        angles = rotary_angles(positions, self._base_freqs(device))
        self.cos_cached, self.sin_cached = self._scaled_cos_sin(angles, torch.float32)

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
        if self.scaling is not None:
            return self.scaling.frequencies(
                self.rotary_dim, self.base, length, device=device, dtype=angle_dtype(device)
            )
        return inverse_frequencies(self.rotary_dim, self.base, device=device, dtype=angle_dtype(device))

    def frequencies(self, length: int | Tensor | None = None) -> Tensor:
        """Current frequencies ``(rotary_dim // 2,)`` in the angle dtype (float64 where available).

        length: the sequence length at which length-dependent scaling (dynamic, longrope) is evaluated, an int,
        ``()`` or ``(B,)`` tensor (then the result is ``(B, rotary_dim // 2)``); None: the original context's.
        """
        device = self.cos_cached.device
        if length is not None and not isinstance(length, Tensor):
            length = torch.tensor(length, device=device)
        freqs = self._base_freqs(device, length)
        if self.log_freq_scale is not None:
            freqs = freqs * torch.exp(self.log_freq_scale.to(freqs.dtype))
        return freqs

    def mixing_matrix(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The dense P ``(head_dim, head_dim)``, or None without mixing."""
        return None if self.mixing is None else self.mixing.matrix(dtype)

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        *,
        offset: int | Tensor = 0,
        positions: Tensor | None = None,
        length: int | Tensor | None = None,
    ) -> Tensor:
        """Rotate x at positions ``offset + arange(T)`` (or ``positions``).

        Args:
            x: ``(B, T, dims)`` or ``(B, T, heads, head_dim)``, floating point.
            offset: int, or ``(B,)`` integer tensor (per-row offsets, e.g. left-padded batches in a KV cache).
            positions: ``(T,)`` or ``(B, T)``, int or float; overrides offset.
            length: only for length-dependent scaling (dynamic, longrope): the sequence length L to evaluate the
                frequencies at, int or ``()`` / ``(B,)`` integer tensor. Default: ``offset + T``, or
                ``positions.max(-1) + 1`` (per row). Fix it (e.g. to the longest length you will decode) to
                cache rotated keys; otherwise keep keys unrotated and use :meth:`rotate_qk`.

        Returns:
            a tensor of x's shape and dtype.
        """
        x4 = self._as_heads(x)
        B, T = x4.shape[:2]
        cos, sin = self._cos_sin(B, T, offset, positions, x4.dtype, x4.device, length)
        y = self._rotate(x4, cos.unsqueeze(-2), sin.unsqueeze(-2))  # (T | B,T, 1, r/2) against (B, T, H, D)
        return y.view_as(x)

    def rotate_qk(
        self,
        q: Tensor,
        k: Tensor,
        *,
        offset: int | Tensor = 0,
        positions: Tensor | None = None,
        length: int | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Rotate attention queries and keys laid out ``(B, H, T, D)``.

        k may be longer than q (keys from a KV cache): keys sit at ``offset + arange(Tk)`` (or ``positions``,
        ``(Tk,)`` or ``(B, Tk)``) and the queries at the last ``Tq`` of those positions. With length-dependent
        scaling the length defaults to ``offset + Tk``: passing the whole unrotated key cache each step gives
        exactly what a full forward over the same tokens gives.
        """
        for name, t in (("q", q), ("k", k)):
            if t.dim() != 4 or t.shape[1] != self.heads or t.shape[3] != self.head_dim:
                raise ValueError(
                    f"{name} must have shape (batch, heads={self.heads}, seq, head_dim={self.head_dim}), "
                    f"got {tuple(t.shape)}"
                )
        B, _, Tq, _ = q.shape
        Tk = k.shape[2]
        if k.shape[0] != B or Tk < Tq:
            raise ValueError(f"k must have q's batch and at least q's length, got q {tuple(q.shape)}, k {tuple(k.shape)}")
        self._check_float(q)
        self._check_float(k)
        cos, sin = self._cos_sin(B, Tk, offset, positions, k.dtype, k.device, length)
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # (1 | B, 1, Tk, r/2) against (B, H, Tk, D)
        k_rot = self._rotate(k, cos, sin)
        q_rot = self._rotate(q, cos[..., Tk - Tq :, :], sin[..., Tk - Tq :, :])
        return q_rot, k_rot

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if isinstance(self.mixing, GivensMixing):
            return rotate(x, cos, sin, interleaved=self.interleaved, givens=self.mixing.coefficients(x.dtype))
        if self.mixing is not None:  # dense P: one small matmul in float32+, rounded once after RoPE
            P = self.mixing.matrix(x.dtype)
            return rotate(x.to(P.dtype) @ P.T, cos, sin, interleaved=self.interleaved, out_dtype=x.dtype)
        return rotate(x, cos, sin, interleaved=self.interleaved)

    # ----------------------------------------------------------------------------------------- inputs
    @staticmethod
    def _check_float(x: Tensor) -> None:
        if not x.is_floating_point():
            raise ValueError(f"Rotary expects a floating-point tensor, got dtype {x.dtype}")

    def _as_heads(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            if x.shape[-1] != self.dims:
                raise ValueError(f"expected x of shape (batch, seq, dims={self.dims}), got {tuple(x.shape)}")
            x4 = x.unflatten(-1, (self.heads, self.head_dim))  # (B, T, H, D)
        elif x.dim() == 4:
            if x.shape[2:] != (self.heads, self.head_dim):
                raise ValueError(
                    f"expected x of shape (batch, seq, heads={self.heads}, head_dim={self.head_dim}), "
                    f"got {tuple(x.shape)}"
                )
            x4 = x
        else:
            raise ValueError(
                f"expected x of rank 3 (batch, seq, dims) or 4 (batch, seq, heads, head_dim), got shape {tuple(x.shape)}"
            )
        self._check_float(x)
        return x4

    def _cos_sin(
        self, B: int, T: int, offset, positions, dtype: torch.dtype, device, length=None
    ) -> tuple[Tensor, Tensor]:
        """cos/sin ``(T, r/2)`` or ``(B, T, r/2)`` in the compute dtype of x."""
        cdtype = compute_dtype(dtype)
        length = self._check_length(B, length)
        if positions is not None:
            if not isinstance(positions, Tensor) or not (
                (positions.dim() == 1 and positions.shape[0] == T) or (positions.dim() == 2 and positions.shape == (B, T))
            ):
                shape = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
                raise ValueError(f"positions must be a tensor of shape ({T},) or ({B}, {T}), got {shape}")
            if positions.dtype == torch.bool or positions.is_complex():
                raise ValueError(f"positions must be an integer or float tensor, got dtype {positions.dtype}")
            if length is None and self._length_dependent:
                length = positions.amax(dim=-1) + 1  # () or (B,): transformers' max(position_ids) + 1, per row
            return self._direct(positions, cdtype, length)
        if isinstance(offset, Tensor):
            if offset.dim() > 1 or (offset.dim() == 1 and offset.shape[0] != B):
                raise ValueError(f"a tensor offset must have shape () or ({B},), got {tuple(offset.shape)}")
            if offset.is_floating_point() or offset.is_complex() or offset.dtype == torch.bool:
                raise ValueError(f"offset must be an integer tensor (use positions= for float), got {offset.dtype}")
            steps = torch.arange(T, device=offset.device)
            pos = offset.unsqueeze(-1) + steps if offset.dim() == 1 else offset + steps
            if length is None and self._length_dependent:
                length = offset + T
            return self._direct(pos, cdtype, length)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int or an integer tensor, got {offset!r}")
        if self._length_dependent:
            pos = torch.arange(offset, offset + T, device=device)
            if length is None:
                # a tensor, not a Python int: choosing a regime is then torch.where, with no guard to recompile on
                length = torch.arange(offset + T, offset + T + 1, device=device).squeeze(0)
            return self._direct(pos, cdtype, length)
        if self.log_freq_scale is not None or cdtype == torch.float64:
            return self._direct(torch.arange(offset, offset + T, device=device), cdtype)
        if offset + T > self.cos_cached.shape[0]:
            if torch.compiler.is_compiling():  # no buffer growth inside a graph: compute these rows directly
                return self._direct(torch.arange(offset, offset + T, device=device), cdtype)
            length = self.cos_cached.shape[0]
            while length < offset + T:
                length *= 2
            self._build_tables(length, device=self.cos_cached.device)
        return self.cos_cached[offset : offset + T], self.sin_cached[offset : offset + T]

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

    def extra_repr(self) -> str:
        return (
            f"dims={self.dims}, heads={self.heads}, head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
            f"base={self.base:g}, mixing={self.mixing_kind!r}, interleaved={self.interleaved}, "
            f"learned_freq={self.log_freq_scale is not None}"
            + ("" if self.scaling is None else f", scaling={self.scaling.rope_type!r}")
        )


rotary = Rotary  # the request document's spelling: ``self.rotary = rotary(dims=dims, heads=heads)``
