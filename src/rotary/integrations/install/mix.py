"""How an install applies P, and how it folds P away: shared by every host.

Shapes: D head_dim, H heads, C input width.

``InstallOptions.mix_on`` picks one of two implementations: ``"weights"`` (:class:`MixedWeights`, the projection's
forward computes ``F.linear(x, P W, P b)`` per head: nothing on the activations) or ``"activations"``
(:class:`MixedOutput`, a forward hook multiplies the module's output by P per head: any module, a LoRA or quantised
projection, or a per-head norm that P must follow). The Whisper hosts apply P in the Rotary itself (``R(m) P x``).
:func:`prepare_fold_into` is the fold of one Rotary (:class:`rotary.fold.Foldable`), for the installs and the
reference decoder alike. Another way to apply P (a fused qkv projection) is another class here, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ...core.fold import check_placement, fold_mixing, mix_rows
from ...core.functional import compute_dtype
from ...core.module import Rotary

__all__ = ["MixedOutput", "MixedWeights", "commutes_with_rotations", "plain_linear", "prepare_fold_into"]


def plain_linear(module) -> bool:
    """An ``nn.Linear`` whose forward is nn.Linear's: one that :class:`MixedWeights` can stand in for."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class MixedWeights:
    """A q/k projection's replaced ``forward``: ``F.linear(x, P W, P b)``, P per head on the weight rows and bias.

    P costs O(H * D^2 * C) per call on the weights; it is built from the Rotary's parameters at every call (never
    cached: it is trained), in float32 at least, and rounded once to the weight's dtype. Parameter names,
    state_dict and hooks stay the projection's own.
    """

    def __init__(self, linear: nn.Linear, rotary: Rotary):
        self.linear, self.rotary = linear, rotary  # plain references: both are registered elsewhere

    def __call__(self, x: Tensor) -> Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        # on the weight's device: the layers of one model may sit on several
        P = self.rotary.mixing_matrix(compute_dtype(weight.dtype)).to(weight.device)  # (D, D)
        weight = mix_rows(weight, P).to(weight.dtype)  # (H * D, C)
        if bias is not None:
            bias = mix_rows(bias, P).to(bias.dtype)
        return F.linear(x, weight, bias)


class MixedOutput:
    """Forward hook: the module's output ``(..., H * D)`` or ``(..., H, D)`` times P per head.

    P costs O(tokens * H * D^2) per call; the module itself is untouched, whatever it is.
    """

    def __init__(self, rotary: Rotary):
        self.rotary = rotary

    def __call__(self, module: nn.Module, args, output: Tensor) -> Tensor:
        P = self.rotary.mixing_matrix(compute_dtype(output.dtype)).to(output.device)  # (D, D)
        heads = output.unflatten(-1, (-1, P.shape[0]))  # (..., H, D)
        return (heads.to(P.dtype) @ P.T).to(output.dtype).reshape(output.shape)


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
    """The fold of one Rotary's P into the q/k ``projections`` it acts on (:class:`rotary.fold.Foldable`).

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
