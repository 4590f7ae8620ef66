"""How an install applies P, and how it folds P away: shared by every host.

Shapes: D head_dim, H heads, C input width.

Two implementations: :class:`MixedWeights` (a plain ``nn.Linear``'s forward computes ``F.linear(x, P W, P b)`` per
head: nothing on the activations; ``InstallOptions.mix_on="weights"``) and :class:`MixedOutput` (a forward hook
multiplies the module's output by P per head: any module, an adapter-wrapped or quantised projection, or a
per-head norm that P must follow; ``mix_on="activations"``, and wherever the weights cannot carry P). Both take
the output ``rows`` P acts on (a fused qkv projection: the query and key rows). The Whisper hosts apply P in the
Rotary itself (``R(m) P x``). :func:`fold_rows` is the fold the install record carries out;
:func:`prepare_fold_into` the fold of one Rotary into plain projections, for the reference decoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.fold import check_placement, fold_mixing, mix_rows
from ...core.kernels import compute_dtype
from ...core.module import Rotary

__all__ = ["MixedOutput", "MixedWeights", "commutes_with_rotations", "fold_rows", "heads_mixer", "plain_linear",
           "prepare_fold_into"]


def plain_linear(module) -> bool:
    """An ``nn.Linear`` whose forward is nn.Linear's: one that :class:`MixedWeights` can stand in for."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


Rows = slice | Tensor | None
"""The output rows of a projection P acts on, whole heads in order: all (None), a slice (a fused ``[q | k | v]``
projection's query and key rows), or a long index tensor (rows grouped per head, ``[q k v]`` of each: GPT-NeoX;
the RoPE slice of each head: latent attention)."""


def _mix_some_rows(tensor: Tensor, mix: Callable[[Tensor], Tensor], rows: Rows) -> Tensor:
    """``mix`` (P per head, on whole-head rows) applied to ``tensor``'s rows (``(N, C)`` weight or ``(N,)`` bias)
    in ``rows`` (None: all), in mix's dtype; the other rows (a fused projection's values) are left as they are."""
    if rows is None:
        return mix(tensor)
    if isinstance(rows, slice):
        part = mix(tensor[rows])
        return torch.cat((tensor[: rows.start].to(part.dtype), part, tensor[rows.stop:].to(part.dtype)))
    index = rows.to(tensor.device)
    part = mix(tensor.index_select(0, index))
    return tensor.to(part.dtype).index_copy(0, index, part)


def heads_mixer(rotary: Rotary, dtype: torch.dtype, device: torch.device) -> Callable[[Tensor], Tensor]:
    """P per head on rows ``(H * D, ...)``, computed in ``dtype``: Givens elementwise (``O(H * D * C)`` on a
    weight, no product), any other P as a dense ``(D, D)`` product."""
    D, rotate = rotary.head_dim, getattr(rotary.mixer, "rotate", None)
    if rotate is not None:
        return lambda t: rotate(t.to(dtype).unflatten(0, (-1, D)), dim=1).flatten(0, 1)
    P = rotary.mixing_matrix(dtype).to(device)  # (D, D)
    return lambda t: mix_rows(t, P)


class MixedWeights:
    """A q/k projection's replaced ``forward``: ``F.linear(x, P W, P b)``, P per head on the weight rows and bias
    (on ``rows`` of them only, for a fused qkv projection).

    P costs O(H * D * C) per call on the weights for Givens (elementwise), O(H * D^2 * C) for a dense P, whatever
    the batch; it is built from the Rotary's parameters at every call (never cached: it is trained), in float32
    at least, and rounded once to the weight's dtype. When the weight trains, its gradient is computed anyway,
    so P adds only that elementwise work. ``rotary`` is a callable returning the Rotary in use (a PEFT adapter's
    copy, when PEFT trains it). Parameter names, state_dict and hooks stay the projection's own.
    """

    def __init__(self, linear: nn.Linear, rotary: Callable[[], Rotary], rows: Rows = None):
        self.linear, self.rotary, self.rows = linear, rotary, rows  # plain references: registered elsewhere

    def __call__(self, x: Tensor) -> Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        # on the weight's device: the layers of one model may sit on several
        mix = heads_mixer(self.rotary(), compute_dtype(weight.dtype), weight.device)
        weight = _mix_some_rows(weight, mix, self.rows).to(weight.dtype)  # (N, C)
        if bias is not None:
            bias = _mix_some_rows(bias, mix, self.rows).to(bias.dtype)
        return F.linear(x, weight, bias)


class MixedOutput:
    """Forward hook: the module's output ``(..., H * D)`` times P per head (its channels in ``rows`` only, for a
    fused qkv projection).

    P costs O(tokens * H * D) per call for Givens (elementwise, and without a gather for the strided planes
    :func:`rotary.core.mixing.default_planes` prefers), O(tokens * H * D^2) for a dense P; the module itself is
    untouched, whatever it is (an adapter-wrapped or quantised projection, a per-head norm). With a frozen
    weight (LoRA's base) this is the cheapest place for P: on the weights, P's gradient would need the weight's,
    a product as large as the projection itself. ``rotary``: a callable returning the Rotary in use.
    """

    def __init__(self, rotary: Callable[[], Rotary], rows: Rows = None):
        self.rotary, self.rows = rotary, rows

    def __call__(self, module: nn.Module, args, output: Tensor) -> Tensor:
        rotary, dtype = self.rotary(), compute_dtype(output.dtype)
        rows = self.rows
        if isinstance(rows, Tensor):
            rows = rows.to(output.device)
            part = output.index_select(-1, rows)
        else:
            part = output if rows is None else output[..., rows]
        heads = part.unflatten(-1, (-1, rotary.head_dim)).to(dtype)  # (..., H, D)
        rotate = getattr(rotary.mixer, "rotate", None)
        if rotate is not None:  # Givens: elementwise, O(D) per head
            heads = rotate(heads)
        else:
            heads = heads @ rotary.mixing_matrix(dtype).to(output.device).T
        mixed = heads.to(output.dtype).flatten(-2)
        if rows is None:
            return mixed
        if isinstance(rows, Tensor):
            return output.index_copy(-1, rows, mixed)
        return torch.cat((output[..., : rows.start], mixed, output[..., rows.stop:]), dim=-1)


def fold_rows(P: Tensor, linears, rows: Rows = None) -> None:
    """P (float64 ``(D, D)``) into the output ``rows`` (None: all) of each ``nn.Linear``'s weight and bias, in
    place, rounded once to their dtype."""
    with torch.no_grad():
        for linear in linears:
            Pd = P.to(linear.weight.device)
            linear.weight.copy_(_mix_some_rows(linear.weight, lambda t, Pd=Pd: mix_rows(t, Pd), rows))
            if linear.bias is not None:
                linear.bias.copy_(_mix_some_rows(linear.bias, lambda t, Pd=Pd: mix_rows(t, Pd), rows))


def commutes_with_rotations(norm: nn.Module, head_dim: int) -> str | None:
    """None if ``norm(P y) = P norm(y)`` for every per-head rotation P, else the reason why not.

    True of a bias-free RMSNorm whose weight is uniform within each head: P then moves through it into the
    projection before it, exactly.
    """
    weight = getattr(norm, "weight", None)
    if "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None or weight is None:
        return "it is not a bias-free RMSNorm"
    blocks = weight.detach().reshape(-1, head_dim)  # (H or 1, D)
    spread = (blocks.amax(-1) - blocks.amin(-1)).max().item()
    if spread != 0:
        return f"its weight is not uniform within a head (max - min = {spread:.3g})"
    return None


def prepare_fold_into(rotary: Rotary, projections, placement: str,
                      then: Callable[[], None] | None = None) -> Callable[[], None] | None:
    """The fold of one Rotary's P into the q/k ``projections`` it acts on (:class:`rotary.core.fold.Foldable`).

    Checks first (the placement must be the attention one) and returns the action (P into the projections, the
    Rotary left computing plain RoPE, then ``then()``), or None without a P.
    """
    if rotary.mixer is None:
        return None
    check_placement(placement)
    projections = list(projections)
    bad = [p for p in projections if not isinstance(p, nn.Linear) or p.out_features % rotary.head_dim != 0]
    if bad:  # checked here, before any fold of the model is carried out
        raise ValueError(f"P folds into nn.Linear projections of whole heads of {rotary.head_dim} channels, not "
                         f"{type(bad[0]).__name__}; nothing was changed")

    def action():
        fold_mixing(rotary.remove_mixing(), *projections)
        if then is not None:
            then()

    return action
