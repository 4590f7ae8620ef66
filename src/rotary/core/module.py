"""``Rotary``: learned orthogonal mixing followed by standard RoPE, for one line in ``__init__`` and one in forward.

Shapes: B batch, T sequence, H heads, D head_dim = dims // heads, r rotary_dim.

The class composes the pieces, one concept a file: :mod:`~rotary.core.options` (the validated options),
:mod:`~rotary.core.mixing` (P), :mod:`~rotary.core.angles` (frequencies and the cos/sin table),
:mod:`~rotary.core.positions` (offset / positions / length of a call), :mod:`~rotary.core.layout` (BHTD, BTHD,
``(B, T, dims)``) and :mod:`~rotary.core.kernels` (the kernels, and which one runs).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import Tensor, nn

from .angles import Angles
from .directions import trig_gradient
from .kernels import choose, compute_dtype, rope_at, rotate, rotate_no_grad
from .layout import as_heads, qk_match, transposed_buffer
from .mixing import GivensMixing, OrthogonalMixing, make_mixing
from .options import RotaryOptions
from .positions import Span, Where, check_length, index_range, resolve

__all__ = ["Rotary", "rotary"]

# state_dict keys of 0.1 checkpoints, and where they live now
_OLD_KEYS = (("mixing.", "mixer."), ("log_freq_scale", "angles.log_freq_scale"), ("directions.", "angles.directions."))


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
        scaling: a context-extension scheme as a Hugging Face ``rope_parameters`` dict (see :mod:`rotary.core.scaling`),
            e.g. ``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 448}``. Its
            ``rope_theta`` and ``partial_rotary_factor`` set ``base`` and ``rotary_dim`` when those are not given
            (and must agree with them when they are). Schemes with an attention factor (yarn, longrope) multiply
            the rotated channels by it, as transformers multiplies cos and sin: ``x -> a R(m) P x`` on the first
            rotary_dim channels. Dynamic NTK and LongRoPE depend on the sequence length L, by default the last
            position plus one, or ``length=`` if given.
        axes: number of position axes n (1, 2 or 3): positions are then ``(T, n)`` or ``(B, T, n)`` (e.g. (row,
            column) of image patches, (t, h, w) of video), and pair i turns by ``<w_i, r>`` (see
            :mod:`rotary.core.directions` and docs/nd.md). With n > 1 and no ``positions=``, token t sits at
            ``offset + t`` on every axis (text tokens in M-RoPE). axes=1 is standard RoPE.
        directions: the frequency vectors w_i: ``"axial"`` (pairs split among the axes, each axis all
            frequencies), ``"sections"`` (``sections=[pairs per axis]`` of the 1-D frequencies: Qwen2-VL's M-RoPE
            with ``interleaved=False, sections=[16, 24, 24]``), ``"oblique"`` (fixed directions spread evenly
            over the circle/sphere) or ``"mixed"`` (learned per pair and head, RoPE-Mixed). With axes=1 the fixed
            kinds are all standard RoPE.
        sections: pairs per axis for ``directions="sections"``, summing to ``rotary_dim // 2``.

    Attributes: ``options`` (the :class:`RotaryOptions`, names and dicts), ``mixer`` (P, a module, or None),
    ``angles`` (the :class:`~rotary.core.angles.Angles` module: learned frequency scale, directions, the table),
    and ``dims``, ``heads``, ``head_dim``, ``rotary_dim``, ``base``, ``interleaved``, ``axes``.

    The cos/sin table is kept in float32 whatever ``module.to(dtype)`` does, rebuilt on the new device by
    ``to``/``to_empty``, and not part of the state_dict.
    """

    def __init__(self, dims: int, heads: int, *, base: float | None = None, mixing: str | None = "givens",
                 interleaved: bool = True, rotary_dim: int | None = None, learned_freq: bool = False,
                 scaling: dict | None = None, axes: int = 1, directions: str = "axial",
                 sections: list[int] | None = None):
        super().__init__()
        options = RotaryOptions(dims, heads, base=base, mixing=mixing, interleaved=interleaved, rotary_dim=rotary_dim,
                                learned_freq=learned_freq, scaling=scaling, axes=axes, directions=directions,
                                sections=None if sections is None else tuple(sections))
        self.options = options
        self.dims, self.heads, self.head_dim = options.dims, options.heads, options.head_dim
        self._nd = options.nd  # read at every call: a plain attribute, not options' property
        self.rotary_dim, self.base, self.interleaved, self.axes = (options.rotary_dim, options.base,
                                                                   options.interleaved, options.axes)
        self.mixer = make_mixing(options.mixing, self.head_dim, self.rope_pairs())
        self.angles = Angles(options)

    @classmethod
    def from_options(cls, options: RotaryOptions) -> Rotary:
        """The Rotary of a stored :class:`RotaryOptions` (``RotaryOptions.from_dict(config["rotary"])``)."""
        fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.init}
        return cls(fields.pop("dims"), fields.pop("heads"), **fields)

    # ----------------------------------------------------------------------------------------- state
    @property
    def length_dependent(self) -> bool:
        """Whether the angles depend on the sequence length (dynamic NTK, LongRoPE scaling)."""
        return self.angles.length_dependent

    def rope_pairs(self) -> list[tuple[int, int]]:
        """The channel pairs RoPE rotates, in this module's layout."""
        half = self.rotary_dim // 2
        if self.interleaved:
            return [(2 * i, 2 * i + 1) for i in range(half)]
        return [(i, i + half) for i in range(half)]

    def reset_parameters(self) -> None:
        """Identity mixing, unscaled frequencies, default planes (e.g. after ``to_empty``)."""
        if self.mixer is not None:
            self.mixer.reset_parameters()
        self.angles.reset_parameters()

    def frequencies(self, length: int | Tensor | None = None) -> Tensor:
        """Current frequencies ``(rotary_dim // 2,)`` in the angle dtype (float64 where available).

        length: the sequence length at which length-dependent scaling (dynamic, longrope) is evaluated, an int,
        ``()`` or ``(B,)`` tensor (then the result is ``(B, rotary_dim // 2)``); None: the original context's.

        N-D (``axes > 1`` or ``directions="mixed"``): the frequency vectors w_i, ``(rotary_dim // 2, axes)``, or
        ``(heads, rotary_dim // 2, axes)`` for "mixed"; pair i turns by ``<w_i, r>``.
        """
        return self.angles.frequencies(length)

    def mixing_matrix(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The dense P ``(head_dim, head_dim)``, or None without mixing."""
        return None if self.mixer is None else self.mixer.matrix(dtype)

    def remove_mixing(self) -> Tensor | None:
        """Drop P from this module and return it dense, float64 ``(head_dim, head_dim)`` (None without mixing).

        For folding P into projection weights (:func:`rotary.core.fold.fold_mixing`): the module then computes plain
        RoPE on whatever already carries P, and its ``options.mixing`` is None.
        """
        if self.mixer is None:
            return None
        with torch.no_grad():
            P = self.mixer.matrix(torch.float64)
        self.mixer, self.options = None, dataclasses.replace(self.options, mixing=None)
        return P

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in _OLD_KEYS:  # 0.1 checkpoints: P was ``mixing``, the angles' parameters lived here
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------------------------------- calls
    def forward(self, x: Tensor, *, offset: int | Tensor = 0, positions: Tensor | None = None,
                length: int | Tensor | None = None, layout: str = "BHTD") -> Tensor:
        """Rotate x at positions ``offset + arange(T)`` (or ``positions``): ``R(m) P x``.

        Args:
            x: ``(B, T, dims)``, or 4-D in ``layout``: ``"BHTD"`` ``(B, H, T, D)`` (Hugging Face, SDPA) or
                ``"BTHD"`` ``(B, T, H, D)``, where H is ``heads`` or any divisor of it (grouped-query keys share
                P). Floating point; any strides (a transposed view is read in place, not copied).
            offset: the position of x's first token: an int, or a ``(B,)`` integer tensor (per-row offsets, e.g.
                left-padded batches in a KV cache).
            positions: ``(T,)`` or ``(B, T)``, int or float; overrides offset. With ``axes=n``: ``(T, n)`` or
                ``(B, T, n)`` (for n = 1 both forms).
            length: only for length-dependent scaling (dynamic, longrope): the sequence length L to evaluate the
                frequencies at, int or ``()`` / ``(B,)`` integer tensor. Default: ``offset + T``, or
                ``positions.max(-1) + 1`` (per row). Fix it (e.g. to the longest length you will decode) to
                cache rotated keys; otherwise keep keys unrotated and use :meth:`rotate_qk`.
            layout: how a 4-D x is laid out (ignored for 3-D x).

        Returns:
            a tensor of x's shape and dtype.
        """
        return self._call(x, offset, positions, length, layout, True)

    def rope(self, x: Tensor, *, offset: int | Tensor = 0, positions: Tensor | None = None,
             length: int | Tensor | None = None, layout: str = "BHTD") -> Tensor:
        """RoPE alone, ``R(m) x``, as :meth:`forward` takes it: for inputs that already carry P (P applied to
        the q/k projection weights, as the installs and the reference decoder do)."""
        return self._call(x, offset, positions, length, layout, False)

    def _call(self, x: Tensor, offset, positions, length, layout: str, mix: bool) -> Tensor:
        x4, time_dim = as_heads(x, layout, "x", self.dims, self.heads, self.head_dim)
        shape = x4.shape
        where = self._resolve(shape[0], shape[time_dim], offset, positions, length, 0)
        y = self._rotate_at(x4, None, time_dim, where, mix)
        return y.reshape(x.shape) if x.dim() == 3 else y

    def rotate_qk(self, q: Tensor, k: Tensor, *, offset: int | Tensor = 0, positions: Tensor | None = None,
                  length: int | Tensor | None = None, layout: str = "BHTD") -> tuple[Tensor, Tensor]:
        """Rotate attention queries and keys, 4-D in ``layout`` (``(B, H, T, D)`` by default).

        k may be longer than q (keys from a KV cache): the queries are the last Tq of the Tk positions.
        ``offset`` is, as in :meth:`forward`, the position of q's first token (an int or ``(B,)`` tensor): the
        keys then sit at ``offset - (Tk - Tq) + arange(Tk)`` (an int offset must leave that >= 0). ``positions``
        gives the key positions instead, ``(Tk,)`` or ``(B, Tk)`` (``(Tk, n)`` or ``(B, Tk, n)`` with
        ``axes=n``). k may have fewer heads than q (grouped-query attention) when its head count divides q's,
        except with ``directions="mixed"`` (each head turns its own way). With length-dependent scaling the
        length defaults to the last query position + 1: passing the whole unrotated key cache each step gives
        exactly what a full forward over the same tokens gives.
        """
        q4, time_dim = as_heads(q, layout, "q", self.dims, self.heads, self.head_dim, allow_3d=False)
        k4, _ = as_heads(k, layout, "k", self.dims, self.heads, self.head_dim, allow_3d=False)
        if not qk_match(q4, k4, time_dim):
            raise ValueError(
                f"k must have q's batch, at least q's length and a number of heads dividing q's ({layout}), "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        Tq, Tk = q4.shape[time_dim], k4.shape[time_dim]
        where = self._resolve(k4.shape[0], Tk, offset, positions, length, shift=Tk - Tq)
        return self._rotate_at(q4, k4, time_dim, where, True)

    def cos_sin(self, positions: Tensor, *, length: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles at ``positions`` (any shape ``(...)``, int or float), float32 ``(..., r/2)``.

        What this module rotates with (learned frequencies and scaling included), for hosts that apply the
        rotation themselves. ``length``: as in :meth:`forward` (length-dependent scaling only).

        N-D (``axes > 1`` or ``directions="mixed"``): positions ``(..., axes)``; the result is ``(..., r/2)``, or
        ``(..., heads, r/2)`` for "mixed".
        """
        if not isinstance(positions, Tensor) or positions.dtype == torch.bool or positions.is_complex():
            raise ValueError(f"positions must be an integer or float tensor, got {positions!r}")
        if self.options.nd:
            if length is not None:
                raise ValueError("length= is for length-dependent scaling, which N-D directions do not take")
            if positions.dim() == 0 or positions.shape[-1] != self.axes:
                raise ValueError(f"positions must have a trailing axis dimension of {self.axes} (Rotary(axes="
                                 f"{self.axes})), got shape {tuple(positions.shape)}")
            return self.angles.cos_sin(positions, torch.float32)
        length = check_length(positions.shape[0] if positions.dim() > 1 else 1, length, self.angles.device)
        if not self.length_dependent:
            length = None
        elif length is None and positions.numel():
            length = positions.amax(dim=-1) + 1
        return self.angles.cos_sin(positions, torch.float32, length)

    # ----------------------------------------------------------------------------------------- the general path
    def _resolve(self, B: int, T: int, offset, positions, length, shift: int = 0) -> Where:
        angles = self._modules["angles"]  # read directly: nn.Module.__getattr__ costs about a microsecond a lookup
        # positional: keyword arguments cost a share of a one-token call
        return resolve(B, T, offset, positions, length, shift, self.axes, self._nd, angles.length_dependent,
                       angles.device)

    def _rotate_at(self, x: Tensor, k: Tensor | None, time_dim: int, where: Where, mix: bool):
        """``R P x`` at ``where`` (``(R P x, R P k)`` with keys k: ``where.keys`` are theirs, x the last queries),
        for 4-D x (and k) whose time axis is ``time_dim``, on the kernel :func:`rotary.core.kernels.choose` picks
        (once, here):

        ========  ======================================================================================
        no-grad   a complex multiply by rows of the table (:mod:`rotary.core.kernels.no_grad`), q and k one
                  after the other; where the rows are not in the table (or float64, compiling): torch
        triton    1-D fixed angles, Givens or no P, integer positions inside the table: cos/sin gathered in
                  the kernel, q and k in one launch (:meth:`_kernel_table`); otherwise as torch, on Triton
        torch     cos/sin of the keys (:meth:`Angles.cos_sin`), the queries' the last rows of them, rotated
                  by :meth:`_rotate` (cos/sin gradients flow)
        ========  ======================================================================================
        """
        keys = x if k is None else k
        angles = self._modules["angles"]  # read directly: nn.Module.__getattr__ costs about a microsecond a lookup
        kernel = choose(x, type(where.keys) is Span)
        if kernel == "no-grad":
            y = rotate_no_grad(self, keys, time_dim, where.keys.start, mix)
            if y is not None and k is not None:
                q_start = where.keys.start + where.shift if where.shift else where.keys.start
                yq = rotate_no_grad(self, x, time_dim, q_start, mix)
                y = None if yq is None else (yq, y)
            if y is not None:
                return y
            kernel = "torch"
        elif kernel == "triton" and (k is None or k.dtype == x.dtype):
            y = self._kernel_table(x, k, time_dim, where, mix)
            if y is not None:
                return y
        cos, sin = angles.cos_sin(where.keys, compute_dtype(keys.dtype), where.length)
        y = self._rotate(keys, cos, sin, time_dim, mix, kernel)
        if k is None:
            return y
        last = (..., slice(where.shift, None), slice(None)) + ((slice(None),) if angles.per_head else ())
        return self._rotate(x, cos[last], sin[last], time_dim, mix, kernel), y

    def _kernel_table(self, x: Tensor, k: Tensor | None, time_dim: int, where: Where, mix: bool):
        """The Triton kernel gathering cos/sin from the table itself at the key rows (q and k in one launch):
        ``R P x`` (or ``(R P x, R P k)``), or None where the table does not hold the angles (learned,
        length-dependent, N-D, float or out-of-table positions, dense P) and the general path rotates."""
        a, mixer = self.angles, (self.mixer if mix else None)
        if not a.fixed or a.directions is not None or (mixer is not None and not isinstance(mixer, GivensMixing)):
            return None
        keys, (B, Tk) = where.keys, (x.shape[0], x.shape[time_dim] if k is None else k.shape[time_dim])
        at = {"positions": None, "offsets": None, "offset": 0}
        if isinstance(keys, Span) and not isinstance(keys.start, Tensor):
            rows, at["offset"] = keys.start + keys.count, keys.start
        else:
            if isinstance(keys, Span):  # per-row starts: the range of the starts, plus the span
                index = keys.start.to(x.device).expand(B).contiguous()
                at["offsets"] = index
            else:
                index = keys.to(x.device).view(-1, Tk)
                at["positions"] = index
            span = index_range(index)
            if span is None or span[0] < 0:
                return None  # float or negative positions: computed directly on the general path
            rows = span[1] + 1 + (Tk - 1 if isinstance(keys, Span) else 0)
        if not a.holds(rows):
            return None  # past the largest table: computed directly on the general path
        xt, kt = (x, k) if time_dim == 1 else (x.transpose(1, 2), None if k is None else k.transpose(1, 2))
        yq, yk = rope_at(xt, kt, a.cos_table, a.sin_table, table=True, givens=None if mixer is None else
                         mixer.coefficients(x.dtype), interleaved=self.interleaved, kernel="triton", **at)
        if time_dim == 2:
            yq, yk = yq.transpose(1, 2), (None if yk is None else yk.transpose(1, 2))
        return yq if k is None else (yq, yk)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor, time_dim: int, mix: bool, kernel: str) -> Tensor:
        """``R P x`` on ``kernel`` (``"triton"`` or ``"torch"``) for a 4-D x whose time axis is ``time_dim`` (1 or
        2); cos/sin ``(T, r/2)`` or ``(B, T, r/2)``, or ``(T, H, r/2)`` or ``(B, T, H, r/2)`` for per-head
        directions (their gradients flow on both kernels)."""
        per_head, triton = self.angles.per_head, kernel == "triton"
        if per_head and (cos.requires_grad or sin.requires_grad) and not torch.compiler.is_compiling() \
                and not triton:
            # learned directions, eager: the fast kernel on detached cos/sin, their gradient taken from its output
            y = self._rotate(x, cos.detach(), sin.detach(), time_dim, mix, kernel)
            if time_dim == 2:
                cos, sin = cos.transpose(-2, -3), sin.transpose(-2, -3)  # (.., H, T, r/2) against (B, H, T, D)
            return trig_gradient(y, cos, sin, interleaved=self.interleaved)
        if time_dim == 2 and transposed_buffer(x):
            return self._rotate(x.transpose(1, 2), cos, sin, 1, mix, kernel).transpose(1, 2)
        if per_head:
            if x.shape[3 - time_dim] != self.heads:
                raise ValueError(f'directions="mixed" turns each head its own way: x needs all {self.heads} heads, '
                                 f"got {x.shape[3 - time_dim]} (grouped-query keys cannot share them)")
            if time_dim == 2:
                cos, sin = cos.transpose(-2, -3), sin.transpose(-2, -3)  # (.., H, T, r/2) against (B, H, T, D)
        elif time_dim == 1:
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T | B,T, 1, r/2) against (B, T, H, D)
        elif cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, r/2) against (B, H, T, D)
        mixer = self.mixer if mix else None
        if isinstance(mixer, GivensMixing):
            return rotate(x, cos, sin, interleaved=self.interleaved, givens=mixer.coefficients(x.dtype),
                          kernel=kernel)
        if mixer is not None:  # dense P: one small matmul in float32+, rounded once after RoPE
            if isinstance(mixer, OrthogonalMixing) and _onnx_exporting():
                raise ValueError('mixing="orthogonal" builds P with torch.linalg.matrix_exp, which has no ONNX form: '
                                 "fold P into the q/k projection weights before exporting (rotary.core.fold."
                                 "fold_mixing, or rotary.fold(model) after an install), or train with "
                                 'mixing="givens"')
            P = mixer.matrix(x.dtype)
            # contiguous first: a matmul's rounding depends on its input's strides, the result should not
            return rotate(x.to(P.dtype).contiguous() @ P.T, cos, sin, interleaved=self.interleaved,
                          out_dtype=x.dtype, kernel=kernel)
        return rotate(x, cos, sin, interleaved=self.interleaved, kernel=kernel)

    def extra_repr(self) -> str:
        o = self.options
        nd = "" if o.axes == 1 and o.directions == "axial" else (
            f", axes={o.axes}, directions={o.directions!r}"
            + (f", sections={list(o.sections)}" if o.directions == "sections" else "")
        )
        return (
            f"dims={o.dims}, heads={o.heads}, head_dim={o.head_dim}, rotary_dim={o.rotary_dim}, base={o.base:g}, "
            f"mixing={o.mixing!r}, interleaved={o.interleaved}, learned_freq={o.learned_freq}"
            + ("" if self.angles.scaling is None else f", scaling={self.angles.scaling.rope_type!r}")
            + nd
        )


def _onnx_exporting() -> bool:
    # torch.onnx.is_in_onnx_export() reads False inside the graph capture of the dynamo exporter; the flag it reads
    # does not. Looked up, not imported: importing torch.onnx would slow `import rotary`.
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return flags is not None and flags._is_onnx_exporting


rotary = Rotary  # the original module's spelling: ``self.rotary = rotary(dims=dims, heads=heads)``
