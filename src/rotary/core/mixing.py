"""Learned orthogonal mixing P (head_dim x head_dim), applied to every head before RoPE.

Every family here is exactly orthogonal for any parameter values and is the identity at initialisation, so a
fresh :class:`rotary.Rotary` computes standard RoPE. P is rebuilt from its parameters on every call (a few
hundred flops), never cached with its autograd graph: the original module built its matrices once and reused
them, which breaks the second backward pass.

P is built in float32 at least, whatever ``module.to(bfloat16)`` did to the parameters: a bf16 rotation matrix
is not orthogonal to better than ~1e-2.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor, nn

from .kernels.torch_kernel import compute_dtype
from .planes import plane_slices, rotate_planes

__all__ = ["GivensMixing", "OrthogonalMixing", "QuaternionMixing", "default_planes", "make_mixing", "resolve_kind"]

_PLANE_SEED = 0  # fixed: the planes are part of the model and also stored in its state_dict


class _Mixing(nn.Module):
    """Base: calling the module returns P, so that it works with ``torch.func.functional_call``."""

    def forward(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.matrix(dtype)

    def matrix(self, dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError

    def apply_frozen(self, x: Tensor) -> Tensor:
        """``P x`` for float32 x ``(..., head_dim)`` without autograd (the inference path).

        What P is built from (dense P, or Givens coefficients) is cached between calls and rebuilt whenever a
        parameter or buffer changes: the key is every tensor's version counter and storage, which in-place
        updates (optimizer steps, ``load_state_dict``, ``.to()``) all change. Never used where gradients flow.
        """
        key = self._state_key()
        cached = self.__dict__.get("_frozen")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self._frozen_parts())
            self.__dict__["_frozen"] = cached
        return self._apply_parts(x, cached[1])

    def _state_key(self) -> tuple:
        return tuple((t._version, t.data_ptr()) for t in (*self._parameters.values(), *self._buffers.values()))

    def _frozen_parts(self):
        return self.matrix(torch.float32)

    def _apply_parts(self, x: Tensor, P) -> Tensor:
        return x.contiguous() @ P.T  # contiguous, as the general path does: the same roundings


def default_planes(head_dim: int, rope_pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Disjoint planes (i, j), i != j, none equal to a RoPE pair and none wholly in the pass-through channels,
    fixed for a given layout: head_dim // 2 of them, or, where RoPE rotates fewer than half the channels (partial
    rotary), one per rotated channel.

    A plane equal to a RoPE pair commutes with RoPE and only adds a constant phase that cancels between q and k; a
    plane of two pass-through channels commutes with RoPE too (RoPE is the identity there). Either would be a
    learned angle that cannot change an output, so such planes are avoided. Among valid choices, one whose partner
    is a strided view is taken, so that ``x[..., partner]`` needs no gather: the halves ``(i, i + head_dim // 2)``
    (valid in the interleaved layout), else neighbours ``(2k, 2k + 1)`` (valid in the half layout); with fewer
    rotated channels r than half the head, ``(i, r + i)``. Where none is valid (tiny or odd partial layouts), a
    shuffle by Python's ``random.Random`` with a fixed seed (never the global RNG). Which planes a module uses is
    stored in its state_dict, so checkpoints keep theirs whatever this returns.
    """
    avoid = {frozenset(p) for p in rope_pairs}
    rotated = {c for p in rope_pairs for c in p} or set(range(head_dim))

    def valid(planes) -> bool:
        return not any(frozenset(p) in avoid or not set(p) & rotated for p in planes)

    h = head_dim // 2
    if len(rotated) < h:  # each plane needs a rotated channel: one plane per rotated channel, with a passing one
        r = sorted(rotated)
        passing = [c for c in range(head_dim) if c not in rotated]
        return [(min(i, j), max(i, j)) for i, j in zip(r, passing)]
    for planes in ([(i, i + h) for i in range(h)], [(2 * k, 2 * k + 1) for k in range(h)]):
        if valid(planes):
            return planes
    rng = random.Random(_PLANE_SEED)
    channels = list(range(head_dim))
    planes = []
    for _ in range(1000):
        rng.shuffle(channels)
        planes = [(channels[2 * k], channels[2 * k + 1]) for k in range(h)]
        if valid(planes):
            break
    # head_dim 2 has a single possible plane, which is the RoPE pair itself: keep it (harmless, never useful).
    return sorted((min(p), max(p)) for p in planes)


class GivensMixing(_Mixing):
    """Product of plane rotations on disjoint planes (:func:`default_planes`), one learnable angle each.

    Plane k maps ``(x_i, x_j) -> (cos t x_i - sin t x_j, sin t x_i + cos t x_j)``. Because the planes are
    disjoint, ``P x = c * x + s * x[partner]`` with per-channel vectors c, s and the partner involution: applying
    P costs two elementwise passes and a gather, not a dense matmul.

    Buffers: ``planes`` ``(N, 2)`` long (persistent). Parameters: ``angles`` ``(N,)``; N = head_dim // 2, or the
    number of rotated channels where that is smaller. A state_dict brings its own planes (and their number).
    """

    def __init__(self, head_dim: int, rope_pairs: list[tuple[int, int]]):
        super().__init__()
        if head_dim < 2:
            raise ValueError(f"givens mixing needs head_dim >= 2, got {head_dim}")
        self.head_dim = head_dim
        self._rope_pairs = rope_pairs
        planes = default_planes(head_dim, rope_pairs)
        self.register_buffer("planes", torch.tensor(planes, dtype=torch.long))
        self.angles = nn.Parameter(torch.zeros(len(planes)))
        self._slices = plane_slices(planes, head_dim)

    def reset_parameters(self) -> None:
        planes = torch.tensor(default_planes(self.head_dim, self._rope_pairs), device=self.planes.device)
        if planes.shape != self.planes.shape:
            self._resize(len(planes))
        with torch.no_grad():
            self.planes.copy_(planes)
            self.angles.zero_()
        self._slices = plane_slices(planes.tolist(), self.head_dim)

    def _resize(self, n: int) -> None:
        self.planes = torch.zeros(n, 2, dtype=torch.long, device=self.planes.device)
        self.angles = nn.Parameter(self.angles.new_zeros(n), requires_grad=self.angles.requires_grad)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # a checkpoint's planes define its P, however many it has (versions before 0.3 kept head_dim // 2 planes,
        # some wholly in pass-through channels, where partial rotary turns fewer than half the channels)
        planes = state_dict.get(prefix + "planes")
        if isinstance(planes, Tensor) and planes.dim() == 2 and planes.shape != self.planes.shape:
            self._resize(planes.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._slices = plane_slices(self.planes.tolist(), self.head_dim)  # read here, never on a hot path

    def coefficients(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """``(c, s, partner)``, each ``(head_dim,)``, with ``P x = c * x + s * x[..., partner]``."""
        t = self.angles.to(compute_dtype(dtype))
        i, j = self.planes[:, 0], self.planes[:, 1]
        cos, sin = torch.cos(t), torch.sin(t)
        ones = torch.ones(self.head_dim, dtype=t.dtype, device=t.device)
        c = ones.index_put((i,), cos).index_put((j,), cos)
        s = torch.zeros_like(ones).index_put((i,), -sin).index_put((j,), sin)
        partner = torch.arange(self.head_dim, device=t.device).index_put((i,), j).index_put((j,), i)
        return c, s, partner

    def rotate(self, x: Tensor, dim: int = -1) -> Tensor:
        """``P x`` along axis ``dim`` of x (size head_dim), with autograd, computed in x's dtype (the caller's
        compute dtype): without a gather where the planes are strided (:mod:`rotary.core.planes`), else
        ``c * x + s * x[partner]``. For P outside the RoPE kernel: an install's projection outputs or weight rows.
        """
        slices = getattr(self, "_slices", None)  # absent from a module pickled by an earlier version: the gather
        if slices is not None:
            return rotate_planes(x, self.angles.to(device=x.device, dtype=x.dtype), slices, dim)
        c, s, partner = (t.to(x.device) for t in self.coefficients(x.dtype))
        moved = x.movedim(dim, -1)
        return (moved * c + moved.index_select(-1, partner) * s).movedim(-1, dim)

    def _state_key(self) -> tuple:  # the base's key, spelled out: this runs at every decoding step
        a, p = self.angles, self.planes
        return a._version, a.data_ptr(), p._version, p.data_ptr()

    def _frozen_parts(self):
        c, s, partner = self.coefficients(torch.float32)
        D = self.head_dim
        # the halves planes of default_planes: x[..., partner] is a roll by D/2, about 3x cheaper than a gather
        halves = D % 2 == 0 and torch.equal(partner, torch.arange(D, device=partner.device).roll(D // 2))
        return c, s, partner, halves

    def _apply_parts(self, x: Tensor, parts) -> Tensor:
        c, s, partner, halves = parts
        moved = torch.roll(x, self.head_dim // 2, -1) if halves else torch.index_select(x, -1, partner)
        return moved.mul_(s).addcmul_(x, c)  # the kernel's s * x[partner] + c * x, in its order: the same roundings

    def matrix(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense P ``(head_dim, head_dim)`` (for folding and inspection)."""
        c, s, partner = self.coefficients(dtype)
        P = torch.diag(c)
        return P.index_put((torch.arange(self.head_dim, device=c.device), partner), s, accumulate=True)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, planes={self.planes.shape[0]}"


class QuaternionMixing(_Mixing):
    """Unit-quaternion rotation of each 3-channel block: ``v -> v + 2 q0 (w x v) + 2 w x (w x v)``.

    ``q = (cos(t/2), sin(t/2) u)``, ``w = sin(t/2) u``, with a learnable axis u (normalised on use) and angle t
    per block. head_dim must be a multiple of 3; P is block-diagonal. Parameters: ``axis`` ``(head_dim // 3, 3)``,
    ``angle`` ``(head_dim // 3,)``.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        if head_dim % 3 != 0:
            raise ValueError(f"quaternion mixing needs head_dim divisible by 3, got {head_dim}")
        self.head_dim = head_dim
        self.axis = nn.Parameter(torch.empty(head_dim // 3, 3))
        self.angle = nn.Parameter(torch.empty(head_dim // 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.axis.fill_(1 / math.sqrt(3))  # any unit axis: the rotation is the identity while angle == 0
            self.angle.zero_()

    def matrix(self, dtype: torch.dtype = torch.float32) -> Tensor:
        dt = compute_dtype(dtype)
        u = self.axis.to(dt)
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
        half = self.angle.to(dt).unsqueeze(-1) / 2
        q0, w = torch.cos(half), torch.sin(half) * u  # (n, 1), (n, 3)
        zero = torch.zeros_like(w[:, 0])
        wx, wy, wz = w.unbind(-1)
        # cross-product matrix [w]_x, so that [w]_x v = w x v
        K = torch.stack(
            [torch.stack([zero, -wz, wy], -1), torch.stack([wz, zero, -wx], -1), torch.stack([-wy, wx, zero], -1)],
            dim=-2,
        )
        eye = torch.eye(3, dtype=dt, device=u.device)
        blocks = eye + 2 * q0.unsqueeze(-1) * K + 2 * K @ K
        return torch.block_diag(*blocks.unbind(0))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, blocks={self.head_dim // 3}"


class OrthogonalMixing(_Mixing):
    """Full SO(head_dim): ``P = expm(A - A^T)`` for the strictly upper triangle A of a learnable matrix.

    The same map as ``torch.nn.utils.parametrizations.orthogonal(orthogonal_map="matrix_exp",
    use_trivialization=False)``, written out so that P is always built in float32 or better: the
    parametrization would run ``matrix_exp`` in the parameter's dtype after ``module.to(bfloat16)``.
    Parameter: ``generator`` ``(head_dim, head_dim)``, zero (P = I) at initialisation.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.generator = nn.Parameter(torch.zeros(head_dim, head_dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.generator.zero_()

    def matrix(self, dtype: torch.dtype = torch.float32) -> Tensor:
        A = self.generator.to(compute_dtype(dtype)).triu(1)
        return torch.linalg.matrix_exp(A - A.T)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"


MIXINGS = ("givens", "quaternion", "orthogonal")


def resolve_kind(kind: str | None, head_dim: int) -> str | None:
    """For 3-dimensional heads the Givens family is the quaternion rotation (one plane would fix an axis)."""
    return "quaternion" if kind == "givens" and head_dim == 3 else kind


def make_mixing(kind: str | None, head_dim: int, rope_pairs: list[tuple[int, int]]) -> nn.Module | None:
    """Build the mixing module named ``kind`` (None: no mixing), after :func:`resolve_kind`."""
    kind = resolve_kind(kind, head_dim)
    if kind is None:
        return None
    if kind == "givens":
        return GivensMixing(head_dim, rope_pairs)
    if kind == "quaternion":
        return QuaternionMixing(head_dim)
    if kind == "orthogonal":
        return OrthogonalMixing(head_dim)
    raise ValueError(f"mixing must be one of {MIXINGS} or None, got {kind!r}")
