"""Folding: move a learned mixing P out of the rotary and into the query and key projection weights.

With ``q = W_q x + b_q`` split into heads, the rotary computes ``R(m) P q_h``. Since P does not depend on the
position, ``P q_h = (P W_q,h) x + P b_q,h``: replacing every head's rows of W_q (and b_q) by P times them, the
same for W_k (every key/value head alike, so grouped-query attention folds the same way), and dropping P from the
rotary leaves plain RoPE computing the same scores. Inference then pays nothing for learned mixing. The products
are formed in float64 and rounded once to the weights' dtype.

Two levels:
- :func:`fold_mixing` is the primitive: P into the given projections.
- :func:`fold` finds what to fold in a whole model through a protocol, :class:`Foldable`: every integration that
  installs a rotary gives some module of the model a ``prepare_fold()`` method. ``fold`` knows no integration.

The embedding placement cannot be folded: there ``R(m) P`` acts on the residual stream ``e(token) + ...``; P would
have to move into the token embedding, but the tied logits read that same embedding unrotated, and R(m) sits
between P and every layer that could absorb it (it does not commute with P). Such installs refuse in
``prepare_fold`` with an error that says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["Foldable", "check_placement", "fold", "fold_mixing", "mix_rows"]


def mix_rows(weight: Tensor, P: Tensor) -> Tensor:
    """Per head, ``P @ rows``: weight ``(heads * D, C_in)`` or a bias ``(heads * D,)``, P ``(D, D)``.

    Any number of heads: the output size only has to be a multiple of D. Computed in P's dtype (differentiable,
    so the reference decoder uses it to apply P to its weights while training).
    """
    D = P.shape[0]
    if weight.shape[0] % D != 0:
        raise ValueError(f"a projection with {weight.shape[0]} outputs is not a whole number of heads of size {D}")
    rows = weight.to(P.dtype).reshape(-1, D, weight.shape[-1] if weight.dim() == 2 else 1)  # (H, D, C)
    return (P @ rows).reshape(weight.shape)


def fold_mixing(P: Tensor, *projections: nn.Linear) -> None:
    """Replace every head's rows of each projection's weight (and bias) by P times them, in place.

    P: ``(D, D)``, any float dtype (the products are formed in float64 and rounded once to the weights' dtype).
    projections: the query and key ``nn.Linear`` layers that P acts on, each with ``heads * D`` outputs, for any
    number of heads (query and key projections of grouped-query attention alike). All are checked before any is
    changed.
    """
    P = P.detach().to(torch.float64)
    for linear in projections:
        if not isinstance(linear, nn.Linear) or linear.out_features % P.shape[0] != 0:
            raise ValueError(f"expected nn.Linear layers with a multiple of {P.shape[0]} outputs, got {linear!r}")
    with torch.no_grad():
        for linear in projections:
            Pd = P.to(linear.weight.device)
            linear.weight.copy_(mix_rows(linear.weight, Pd))
            if linear.bias is not None:
                linear.bias.copy_(mix_rows(linear.bias, Pd))


def check_placement(placement: str) -> None:
    """Raise, naming expected and found, unless ``placement`` is one whose P can be folded (the attention one)."""
    if placement != "attention":
        raise ValueError(
            f"the embedding placement cannot be folded (expected placement='attention', found {placement!r}): its P "
            "acts on the residual stream, which no weight can absorb (see rotary.fold); nothing was changed"
        )


@runtime_checkable
class Foldable(Protocol):
    """A module that owns a rotary installed into a model and knows which projections its P acts on."""

    def prepare_fold(self) -> Callable[[], None] | None:
        """Check that the fold is possible and return the action that does it (None: nothing to fold).

        Raise, changing nothing, where P cannot be folded exactly (the embedding placement, a norm between the
        projection and the rotary whose weight is not uniform, ...).
        """


def fold(model: nn.Module) -> nn.Module:
    """Fold every installed rotary's learned mixing in ``model`` into its q/k projections, in place; returns it.

    Works on whatever an integration installed (the reference decoder, openai-whisper, Hugging Face models): each
    implements :class:`Foldable`. Every fold is checked before any is carried out, so an error leaves the model
    as it was. Rotaries without mixing are left alone.
    """
    actions = []
    for module in model.modules():
        if isinstance(module, Foldable):
            action = module.prepare_fold()
            if action is not None:
                actions.append(action)
    for action in actions:
        action()
    return model
