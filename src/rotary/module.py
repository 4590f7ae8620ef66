"""``Rotary``: learned orthogonal mixing followed by standard RoPE, for one line in ``__init__`` and one in forward.

Shapes: B batch, T sequence, H heads, D head_dim = dims // heads, r rotary_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .frequencies import angle_dtype, inverse_frequencies, rotary_angles
from .functional import compute_dtype, rotate
from .mixing import GivensMixing, make_mixing

__all__ = ["Rotary", "rotary"]

_INITIAL_TABLE = 2048  # rows of the cos/sin table built at construction; it doubles on demand in eager mode


class Rotary(nn.Module):
    """Rotary position embedding with a learned orthogonal mixing P shared by all heads: ``x -> R(m) P x``.

    Args:
        dims: model width, ``heads * head_dim``.
        heads: number of heads; ``head_dim = dims // heads``.
        base: RoPE base; pair i turns at frequency ``base ** (-2i / rotary_dim)``.
        mixing: ``"givens"`` (head_dim // 2 disjoint plane rotations; for 3-dimensional heads this family is the
            quaternion rotation), ``"quaternion"``, ``"orthogonal"`` (full SO(head_dim)) or None (plain RoPE).
            Every choice is the identity at initialisation.
        interleaved: pairs ``(2i, 2i+1)`` (GPT-J / Meta) if True, ``(i, i + r/2)`` (GPT-NeoX / HF) if False.
        rotary_dim: channels rotated by RoPE, even, at most head_dim; default head_dim rounded down to even.
            The rest pass through RoPE unchanged (P still mixes all head_dim channels).
        learned_freq: make the frequencies learnable, as ``w_i * exp(log_freq_scale_i)`` with the scale at zero.

    The cos/sin table and the frequencies are kept in float32/float64 whatever ``module.to(dtype)`` does, and
    are rebuilt on the new device by ``to``/``to_empty``; they are not part of the state_dict.
    """

    def __init__(
        self,
        dims: int,
        heads: int,
        *,
        base: float = 10000.0,
        mixing: str | None = "givens",
        interleaved: bool = True,
        rotary_dim: int | None = None,
        learned_freq: bool = False,
    ):
        super().__init__()
        for name, value in (("dims", dims), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dims % heads != 0:
            raise ValueError(f"dims ({dims}) must be divisible by heads ({heads})")
        head_dim = dims // heads
        if rotary_dim is None:
            rotary_dim = head_dim - head_dim % 2
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or not (
            2 <= rotary_dim <= head_dim and rotary_dim % 2 == 0
        ):
            raise ValueError(f"rotary_dim must be an even int in [2, head_dim = {head_dim}], got {rotary_dim!r}")
        if not base > 1:
            raise ValueError(f"base must be > 1, got {base!r}")
        if mixing == "givens" and head_dim == 3:
            mixing = "quaternion"
        self.dims, self.heads, self.head_dim, self.rotary_dim = dims, heads, head_dim, rotary_dim
        self.base = float(base)
        self.interleaved = interleaved
        self.mixing_kind = mixing
        self.mixing = make_mixing(mixing, head_dim, self.rope_pairs())
        self.log_freq_scale = nn.Parameter(torch.zeros(rotary_dim // 2)) if learned_freq else None
        self.register_buffer("cos_cached", torch.empty(0, rotary_dim // 2), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0, rotary_dim // 2), persistent=False)
        self._build_tables(_INITIAL_TABLE, device=self.cos_cached.device)

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

    def _build_tables(self, length: int, device) -> None:
        positions = torch.arange(length, device=device, dtype=angle_dtype(device))
        angles = rotary_angles(positions, self._base_freqs(device))
        self.cos_cached = angles.cos().float()
        self.sin_cached = angles.sin().float()

    def _apply(self, fn, recurse=True):
        # Casts (module.half(), .to(bfloat16)) would round the tables; to_empty() would leave garbage in them.
        # Both are rebuilt, always in float32, on whatever device the module now lives on.
        super()._apply(fn, recurse)
        self._build_tables(self.cos_cached.shape[0], device=self.cos_cached.device)
        return self

    def _base_freqs(self, device) -> Tensor:
        return inverse_frequencies(self.rotary_dim, self.base, device=device, dtype=angle_dtype(device))

    def frequencies(self) -> Tensor:
        """Current frequencies ``(rotary_dim // 2,)`` in the angle dtype (float64 where available)."""
        device = self.cos_cached.device
        freqs = self._base_freqs(device)
        if self.log_freq_scale is not None:
            freqs = freqs * torch.exp(self.log_freq_scale.to(freqs.dtype))
        return freqs

    def mixing_matrix(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The dense P ``(head_dim, head_dim)``, or None without mixing."""
        return None if self.mixing is None else self.mixing.matrix(dtype)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, *, offset: int | Tensor = 0, positions: Tensor | None = None) -> Tensor:
        """Rotate x at positions ``offset + arange(T)`` (or ``positions``).

        Args:
            x: ``(B, T, dims)`` or ``(B, T, heads, head_dim)``, floating point.
            offset: int, or ``(B,)`` integer tensor (per-row offsets, e.g. left-padded batches in a KV cache).
            positions: ``(T,)`` or ``(B, T)``, int or float; overrides offset.

        Returns:
            a tensor of x's shape and dtype.
        """
        x4 = self._as_heads(x)
        B, T = x4.shape[:2]
        cos, sin = self._cos_sin(B, T, offset, positions, x4.dtype, x4.device)
        y = self._rotate(x4, cos.unsqueeze(-2), sin.unsqueeze(-2))  # (T | B,T, 1, r/2) against (B, T, H, D)
        return y.view_as(x)

    def rotate_qk(
        self, q: Tensor, k: Tensor, *, offset: int | Tensor = 0, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Rotate attention queries and keys laid out ``(B, H, T, D)``.

        k may be longer than q (keys from a KV cache): keys sit at ``offset + arange(Tk)`` (or ``positions``,
        ``(Tk,)`` or ``(B, Tk)``) and the queries at the last ``Tq`` of those positions.
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
        cos, sin = self._cos_sin(B, Tk, offset, positions, k.dtype, k.device)
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

    def _cos_sin(self, B: int, T: int, offset, positions, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
        """cos/sin ``(T, r/2)`` or ``(B, T, r/2)`` in the compute dtype of x."""
        cdtype = compute_dtype(dtype)
        if positions is not None:
            if not isinstance(positions, Tensor) or not (
                (positions.dim() == 1 and positions.shape[0] == T) or (positions.dim() == 2 and positions.shape == (B, T))
            ):
                shape = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
                raise ValueError(f"positions must be a tensor of shape ({T},) or ({B}, {T}), got {shape}")
            if positions.dtype == torch.bool or positions.is_complex():
                raise ValueError(f"positions must be an integer or float tensor, got dtype {positions.dtype}")
            return self._direct(positions, cdtype)
        if isinstance(offset, Tensor):
            if offset.dim() > 1 or (offset.dim() == 1 and offset.shape[0] != B):
                raise ValueError(f"a tensor offset must have shape () or ({B},), got {tuple(offset.shape)}")
            if offset.is_floating_point() or offset.is_complex() or offset.dtype == torch.bool:
                raise ValueError(f"offset must be an integer tensor (use positions= for float), got {offset.dtype}")
            steps = torch.arange(T, device=offset.device)
            pos = offset.unsqueeze(-1) + steps if offset.dim() == 1 else offset + steps
            return self._direct(pos, cdtype)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int or an integer tensor, got {offset!r}")
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

    def _direct(self, positions: Tensor, cdtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = rotary_angles(positions.to(self.cos_cached.device), self.frequencies())
        return angles.cos().to(cdtype), angles.sin().to(cdtype)

    def extra_repr(self) -> str:
        return (
            f"dims={self.dims}, heads={self.heads}, head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
            f"base={self.base:g}, mixing={self.mixing_kind!r}, interleaved={self.interleaved}, "
            f"learned_freq={self.log_freq_scale is not None}"
        )


rotary = Rotary  # the request document's spelling: ``self.rotary = rotary(dims=dims, heads=heads)``
