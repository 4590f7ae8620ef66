"""``fold(model)``: move the learned mixing P of attention-placement rotaries into the q/k projection weights.

With ``q = W_q x + b_q`` split into heads, the Rotary computes ``R(m) P q_h``. Since P does not depend on the
position, ``P q_h = (P W_q,h) x + P b_q,h``: replacing every head's rows of W_q (and b_q) by P times them, the
same for W_k, and dropping P from the Rotary leaves plain RoPE computing the same scores. Inference then pays
nothing for learned mixing. The products are formed in float64 and rounded once to the weights' dtype.

The embedding placement is not folded. There ``R(m) P`` acts on the residual stream ``e(token) + ...``: P would
have to move into the token embedding, but the tied logits read that same embedding unrotated, and R(m) sits
between P and every layer that could absorb it (it does not commute with P), so no weight can take P over
exactly. ``fold`` leaves such rotaries as they are and logs that it did.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor, nn

from .decoder import Decoder
from .module import Rotary
from .whisper import attention_rotaries as _whisper_attention_rotaries
from .whisper import embedding_rotaries as _whisper_embedding_rotaries

__all__ = ["fold"]

logger = logging.getLogger(__name__)


def _fold_linear(linear: nn.Linear, P: Tensor, heads: int) -> None:
    """Rows of head h of ``linear`` (output ``heads * D``) become ``P @ rows``; bias likewise. In place."""
    W = linear.weight  # (H*D, C_in)
    D = P.shape[0]
    if W.shape[0] != heads * D:
        raise ValueError(f"projection has {W.shape[0]} outputs, expected heads * head_dim = {heads} * {D}")
    with torch.no_grad():
        W64 = W.to(torch.float64).view(heads, D, -1)  # (H, D, C_in)
        W.copy_(torch.einsum("ij,hjc->hic", P, W64).reshape(W.shape))
        if linear.bias is not None:
            b64 = linear.bias.to(torch.float64).view(heads, D)  # (H, D)
            linear.bias.copy_((b64 @ P.T).reshape(linear.bias.shape))


def fold(model: nn.Module) -> nn.Module:
    """Fold the mixing of every attention-placement rotary in ``model`` into W_q and W_k, in place; returns it.

    Handles :class:`rotary.decoder.Decoder` modules (``positional="rotary-attention"``: their P, ``Decoder.mixing``,
    is dropped and their config's ``mixing`` becomes None, so that checkpoints rebuild the folded model) and
    openai-whisper models set up by :func:`rotary.whisper.install` (reinstall with ``mixing=None`` to load a folded
    state_dict). All layers sharing one P are folded with it before it is dropped, once. Models without mixing and
    embedding-placement rotaries are left alone.
    """
    # (attention layers, heads, owner): owner.mixing is the P module shared by those layers (a Decoder or a Rotary)
    groups: list[tuple[list[nn.Module], int, nn.Module]] = []
    embedding: list[Rotary] = []
    for m in model.modules():
        if isinstance(m, Decoder):
            if m.mixing is not None:
                groups.append(([block.attn for block in m.blocks], m.config.heads, m))
            if m.config.positional == "rotary-embedding":
                embedding.append(m.rotary)
    by_rotary: dict[int, tuple[list[nn.Module], Rotary]] = {}
    for attn, rotary in _whisper_attention_rotaries(model):
        by_rotary.setdefault(id(rotary), ([], rotary))[0].append(attn)
    for layers, rotary in by_rotary.values():
        if rotary.mixing is not None:
            groups.append((layers, rotary.heads, rotary))
    embedding.extend(_whisper_embedding_rotaries(model))

    for layers, heads, owner in groups:
        with torch.no_grad():
            P = owner.mixing.matrix(torch.float64)
        for attn in layers:
            _fold_linear(attn.query, P.to(attn.query.weight.device), heads)
            _fold_linear(attn.key, P.to(attn.key.weight.device), heads)
        owner.mixing = None
        if isinstance(owner, Rotary):
            owner.mixing_kind = None
        else:
            owner.config = dataclasses.replace(owner.config, mixing=None)
    for rotary in embedding:
        if rotary.mixing is not None:
            logger.info("an embedding-placement Rotary cannot be folded (P acts on the residual stream): left as is")
    return model
