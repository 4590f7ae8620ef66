"""What :mod:`rotary.hf.causal` must know of a transformers decoder: where its language model is, which layers
attend with RoPE, where each attention's queries and keys come from, and how the host pairs its rotated channels.

Shapes: H query heads, K key-value heads, D head_dim, r the channels RoPE rotates in a head (the RoPE slice of
multi-head latent attention, or rotary_dim of partial rotary); rows are a projection's output channels.

Attention layouts (:data:`LAYOUTS`, one row each; a new architecture of a known layout needs no code):

==============================  ===================================  =========================================
layout                          projections                          the rows P acts on (per head, r of them)
==============================  ===================================  =========================================
separate                        ``q_proj``, ``k_proj``               all rows of each (a gated query,
                                                                     ``[q_h | gate_h]`` per head: its q rows)
fused qkv (Phi-3, MiniMax)      ``qkv_proj`` ``[q | k | v]``         the query and key rows
fused per head (GPT-NeoX,       ``query_key_value``                  rows ``[q_h k_h v_h]`` of each head h:
Persimmon)                                                           its q and k rows
latent (DeepSeek V2/V3,         ``q_b_proj`` (or ``q_proj``),        each query head's RoPE slice (its last r
MiniCPM3, GLM-4-MoE-Lite)       ``kv_a_proj_with_mqa``               rows); the shared RoPE key (the last r rows)
==============================  ===================================  =========================================

Layers: every entry of the layer list whose attention takes ``position_embeddings`` (the model's cos/sin), and
whose ``config.layer_types`` entry (if any) names no linear attention, Mamba or convolution, is a RoPE attention
and gets P, unless it says it skips RoPE (``use_rope`` False: the NoPE layers of Llama 4 and
SmolLM3, where P would cancel between q and k). Layers without one (linear attention, Mamba, convolutions: the
hybrids Qwen3-Next, Qwen3.5, ...) are left alone. A layer whose attention is of no known layout is refused.

Pairing (:func:`rope_pairing`): transformers models rotate pairs ``(i, i + r/2)`` (``rotate_half``) or
``(2i, 2i + 1)`` (Cohere, ERNIE 4.5, Helium, GLM, Llama 4, DeepSeek's complex RoPE), over the first r channels.
A Givens plane equal to a rotated pair commutes with RoPE and cancels between q and k: it must be known, not
assumed. It is read off the host's own function: its module's ``apply_rotary_pos_emb`` applied to the identity
at a few positions gives the rotation R(m) itself, whose 2 x 2 blocks are the pairs.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LAYOUTS", "Attention", "Layout", "Pairing", "find_attentions", "language_model", "rope_pairing"]

_ATTENTION_NAMES = ("self_attn", "attention", "self_attention", "attn")
_NOT_ROPE_TYPES = ("linear", "mamba", "conv", "recurrent")  # config.layer_types of layers that apply no RoPE


def _width(module) -> int | None:
    """A projection's output width: an nn.Linear's, or that of what an adapter or quantisation wraps."""
    width = getattr(module, "out_features", None)
    return width if isinstance(module, nn.Module) and isinstance(width, int) else None


@dataclass(frozen=True)
class Geometry:
    """An attention's heads: ``heads`` queries, ``kv_heads`` keys, each ``head_dim`` wide, RoPE on ``rope_dim`` of
    them (the latent layout's slice; else head_dim)."""

    heads: int
    kv_heads: int
    head_dim: int
    rope_dim: int


Rows = slice | Tensor | None  # the output rows of a projection that P acts on, whole heads of rope_dim, in order


@dataclass(frozen=True)
class Layout:
    """One way an attention computes its queries and keys: the projections it has (``projections``: all must be
    there), and, from the attention and its config, its :class:`Geometry` and the rows P acts on in each projection
    (``targets``: ``[(attribute, rows)]``); both raise TypeError naming what does not fit."""

    name: str
    projections: tuple[str, ...]
    geometry: Callable[[nn.Module, object], Geometry]
    targets: Callable[[nn.Module, Geometry], list[tuple[str, Rows]]]

    def matches(self, attn: nn.Module) -> bool:
        return all(_width(getattr(attn, n, None)) is not None for n in self.projections)


def _int(obj, *names) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _heads(attn: nn.Module, config) -> Geometry:
    heads = _int(attn, "num_heads", "num_attention_heads") or _int(config, "num_attention_heads")
    kv = _int(attn, "num_key_value_heads", "num_kv_heads") or _int(config, "num_key_value_heads") or heads
    d = _int(attn, "head_dim", "head_size")
    if d is None and heads:
        d = _int(config, "head_dim") or _int(config, "hidden_size") // heads
    if not (heads and kv and d):
        raise TypeError(f"{type(attn).__name__}: cannot tell its heads / key-value heads / head_dim "
                        f"({heads} / {kv} / {d})")
    return Geometry(heads, kv, d, d)


def _latent(attn: nn.Module, config) -> Geometry:
    g = _heads(attn, config)
    rope = _int(attn, "qk_rope_head_dim") or _int(config, "qk_rope_head_dim")
    d = _int(attn, "qk_head_dim") or (_int(config, "qk_nope_head_dim") or 0) + (rope or 0)
    if not rope or not d:
        raise TypeError(f"{type(attn).__name__}: a latent attention without qk_rope_head_dim / qk_head_dim")
    return Geometry(g.heads, 1, d, rope)  # one shared RoPE key head


def _check(attn: nn.Module, name: str, expected: int) -> None:
    found = _width(getattr(attn, name))
    if found != expected:
        raise TypeError(f"{type(attn).__name__}.{name} has {found} outputs, expected {expected}")


def _separate(attn: nn.Module, g: Geometry) -> list[tuple[str, Rows]]:
    _check(attn, "k_proj", g.kv_heads * g.head_dim)
    if _width(attn.q_proj) == 2 * g.heads * g.head_dim:  # gated attention (Qwen3-Next, Qwen3.5): [q_h | gate_h]
        rows = torch.arange(2 * g.heads * g.head_dim).view(g.heads, 2, g.head_dim)[:, 0]  # (H, D): the query rows
        return [("q_proj", rows.reshape(-1)), ("k_proj", None)]
    _check(attn, "q_proj", g.heads * g.head_dim)
    return [("q_proj", None), ("k_proj", None)]


def _fused(attn: nn.Module, g: Geometry) -> list[tuple[str, Rows]]:
    _check(attn, "qkv_proj", (g.heads + 2 * g.kv_heads) * g.head_dim)
    return [("qkv_proj", slice(0, (g.heads + g.kv_heads) * g.head_dim))]  # the query rows, then the key rows


def _per_head(attn: nn.Module, g: Geometry) -> list[tuple[str, Rows]]:
    if g.heads != g.kv_heads:
        raise TypeError(f"{type(attn).__name__}.query_key_value with {g.heads} query and {g.kv_heads} key heads")
    _check(attn, "query_key_value", 3 * g.heads * g.head_dim)
    d = g.head_dim
    rows = torch.arange(3 * d * g.heads).view(g.heads, 3, d)[:, :2]  # (H, [q k], D): each head's q rows, k rows
    return [("query_key_value", rows.transpose(0, 1).reshape(-1))]  # every query head's rows, then every key's


def _latent_targets(attn: nn.Module, g: Geometry) -> list[tuple[str, Rows]]:
    q = "q_b_proj" if _width(getattr(attn, "q_b_proj", None)) is not None else "q_proj"
    _check(attn, q, g.heads * g.head_dim)
    query = torch.arange(g.heads * g.head_dim).view(g.heads, g.head_dim)[:, g.head_dim - g.rope_dim:]  # (H, r)
    width = _width(attn.kv_a_proj_with_mqa)
    return [(q, query.reshape(-1)), ("kv_a_proj_with_mqa", slice(width - g.rope_dim, width))]


LAYOUTS: tuple[Layout, ...] = (
    Layout("separate q_proj / k_proj", ("q_proj", "k_proj"), _heads, _separate),
    Layout("latent (q_b_proj or q_proj, kv_a_proj_with_mqa)", ("kv_a_proj_with_mqa",), _latent, _latent_targets),
    Layout("fused qkv_proj [q | k | v]", ("qkv_proj",), _heads, _fused),
    Layout("fused query_key_value, [q k v] per head", ("query_key_value",), _heads, _per_head),
)


@dataclass
class Attention:
    """One RoPE attention of the model: its index in the layer list, the module, its layout and geometry, the rows
    P acts on (``targets``), and whether per-head q/k norms sit between the projections and RoPE."""

    index: int
    module: nn.Module
    layout: Layout
    geometry: Geometry
    targets: list[tuple[str, Rows]]
    norms: bool


def language_model(model: nn.Module) -> nn.Module | None:
    """The decoder that holds the layer list and ``rotary_emb``: the base model of a causal LM, or the language model
    of a vision-language model (``model.model.language_model``); None if there is none."""
    seen = []
    stack = [getattr(model, "base_model", model), model]
    while stack:
        module = stack.pop(0)
        if not isinstance(module, nn.Module) or any(module is s for s in seen):
            continue
        seen.append(module)
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and isinstance(
                getattr(module, "rotary_emb", None), nn.Module):
            return module
        stack += [getattr(module, n, None) for n in ("model", "language_model", "text_model")]
    return None


def _takes_position_embeddings(module: nn.Module) -> bool:
    return "position_embeddings" in inspect.signature(module.forward).parameters


def find_attentions(base: nn.Module, config, where: str) -> list[Attention]:
    """The RoPE attentions of ``base``'s layers (see the module docstring); raises TypeError naming what it found."""
    attentions, skipped = [], []
    layer_types = getattr(config, "layer_types", None)
    for i, layer in enumerate(base.layers):
        found = [(n, m) for n, m in layer.named_children() if n in _ATTENTION_NAMES]
        rope = [(n, m) for n, m in found if _takes_position_embeddings(m)]
        kind = layer_types[i] if isinstance(layer_types, (list, tuple)) and i < len(layer_types) else None
        if isinstance(kind, str) and any(w in kind for w in _NOT_ROPE_TYPES):
            rope = []  # MiniMax's lightning attention takes position_embeddings and ignores them
        if not rope:  # linear attention, Mamba, convolution layers of a hybrid: no RoPE to put P before
            skipped.append(i)
            continue
        name, attn = rope[0]
        if getattr(attn, "use_rope", True) is False:  # a NoPE layer: P would cancel between q and k
            skipped.append(i)
            continue
        layout = next((lay for lay in LAYOUTS if lay.matches(attn)), None)
        if layout is None:
            raise TypeError(
                f"{where}, layer {i}: {type(attn).__name__} ({name}) has projections {_describe(attn)}, none of the "
                f"attention layouts rotary knows ({'; '.join(lay.name for lay in LAYOUTS)})"
            )
        try:
            geometry = layout.geometry(attn, config)
            targets = layout.targets(attn, geometry)
        except TypeError as error:
            raise TypeError(f"{where}, layer {i}: {error}") from None
        norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
        if (norms[0] is None) != (norms[1] is None):
            raise TypeError(f"{where}, layer {i}: {type(attn).__name__} has only one of q_norm/k_norm")
        if norms[0] is not None:
            for norm in norms:
                weight = getattr(norm, "weight", None)
                if not isinstance(weight, Tensor) or weight.numel() % geometry.head_dim != 0:
                    raise TypeError(
                        f"{where}, layer {i}: {type(norm).__name__} between the projections and RoPE is not a per-head "
                        f"norm with a weight of a multiple of head_dim={geometry.head_dim} entries (weight "
                        f"{getattr(weight, 'shape', None)})"
                    )
        attentions.append(Attention(i, attn, layout, geometry, targets, norms[0] is not None))
    if not attentions:
        raise TypeError(f"{where}: none of its {len(base.layers)} layers has an attention that applies the model's "
                        f"RoPE (attention modules taking position_embeddings, named one of {_ATTENTION_NAMES})")
    first = attentions[0]
    for a in attentions[1:]:
        if (a.geometry.head_dim, a.geometry.rope_dim) != (first.geometry.head_dim, first.geometry.rope_dim):
            raise TypeError(f"{where}: layer {a.index} has head_dim/RoPE dim {a.geometry.head_dim}/"
                            f"{a.geometry.rope_dim}, layer {first.index} {first.geometry.head_dim}/"
                            f"{first.geometry.rope_dim}: rotary needs one head geometry")
    return attentions


def _describe(attn: nn.Module) -> dict[str, int | None]:
    return {n: _width(m) for n, m in attn.named_children()}


# --------------------------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class Pairing:
    """How the host rotates a head of ``width`` channels: the first ``rotary_dim`` in pairs, ``interleaved``
    ``(2i, 2i + 1)`` or not ``(i, i + rotary_dim/2)``; the rest pass through. ``cos_layout`` is how its
    ``rotary_emb`` lays out cos/sin ``(B, T, r)``: ``"half"`` (``cat(f, f)``), ``"interleaved"``
    (``repeat_interleave(f, 2)``) or ``"complex"`` (``freqs_cis``, ``(B, T, r/2)``)."""

    rotary_dim: int
    interleaved: bool
    cos_layout: str


def cos_sin(rotary_emb: nn.Module, positions: Tensor, layer_type: str | None = None):
    """The host's ``rotary_emb`` at ``positions`` ``(1, T)``: ``(cos, sin)`` or a complex ``freqs_cis``."""
    x = torch.zeros(1, dtype=torch.float32, device=positions.device)
    with torch.no_grad():
        return rotary_emb(x, positions) if layer_type is None else rotary_emb(x, positions, layer_type)


def _cos_layout(cos: Tensor) -> str | None:
    r = cos.shape[-1]
    if torch.equal(cos[..., : r // 2], cos[..., r // 2:]):
        return "half"
    if torch.equal(cos[..., 0::2], cos[..., 1::2]):
        return "interleaved"
    return None


def rope_pairing(attn: nn.Module, rotary_emb: nn.Module, geometry: Geometry, config,
                 layer_type: str | None = None) -> Pairing:
    """Read the host's RoPE pairing off its own function (see the module docstring); raises TypeError where it
    cannot be read, naming why."""
    device = next((p.device for p in attn.parameters()), torch.device("cpu"))
    positions = torch.tensor([[1, 7, 300]], device=device)  # (1, T): angles far from 0 and from each other
    embedding = cos_sin(rotary_emb, positions, layer_type)
    name = type(attn).__name__
    d = geometry.rope_dim
    if isinstance(embedding, Tensor) and embedding.is_complex():  # freqs_cis: view_as_complex of (2i, 2i + 1)
        r = 2 * embedding.shape[-1]
        if not 2 <= r <= d:
            raise TypeError(f"{name}: a complex rotary embedding for {r} channels, heads of {d}")
        return Pairing(r, True, "complex")
    if not (isinstance(embedding, tuple) and len(embedding) == 2 and all(isinstance(t, Tensor) for t in embedding)):
        raise TypeError(f"{name}: its rotary_emb returns {type(embedding).__name__}, not (cos, sin)")
    cos, sin = embedding
    r = cos.shape[-1]
    layout = _cos_layout(cos)
    module = sys.modules.get(type(attn).__module__)
    function_name = "apply_rotary_pos_emb"
    if getattr(config, "rope_interleave", False) and hasattr(module, "apply_rotary_pos_emb_interleave"):
        function_name = "apply_rotary_pos_emb_interleave"  # DeepSeek V3's choice, by the same config field
    apply = getattr(module, function_name, None)
    if apply is None or layout is None or not 2 <= r <= d or r % 2:
        raise TypeError(f"{name}: cannot read how it pairs its RoPE channels (its module has no {function_name}, or "
                        f"its cos/sin of {r} channels for heads of {d} are laid out neither as cat(f, f) nor as "
                        f"repeat_interleave(f, 2))")
    T = positions.shape[-1]
    rotated = None
    for width in (d, r):  # partial rotary applied inside the function (GLM, NeoX), or on a slice before it
        eye = torch.eye(width, device=device).view(1, width, 1, width).repeat(1, 1, T, 1)  # (1, D, T, D)
        try:
            with torch.no_grad():
                rotated = apply(eye, eye, cos, sin)[0]  # (1, D, T, D): [0, h, t] = R(m_t) e_h
        except (RuntimeError, TypeError, ValueError, IndexError):
            continue
        if rotated.shape == eye.shape:
            break
        rotated = None
    if rotated is None:
        raise TypeError(f"{name}: {function_name} could not be applied to a head of {d} or {r} channels")
    A = rotated[0].transpose(0, 1).transpose(1, 2)  # (T, D, D): A_t = what the function does at position m_t
    # A_0^T A_t = R(m_t - m_0) whatever fixed reordering the function's output has (DeepSeek V3's interleave)
    relative = A[0].T @ A[1:]  # (T - 1, D, D)
    moved = (relative - torch.eye(width, device=device)).abs().amax(0)  # (D, D)
    moved.fill_diagonal_(0)
    partners = [torch.nonzero(moved[h] > 1e-6).flatten().tolist() for h in range(width)]
    pairs = {tuple(sorted((h, p[0]))) for h, p in enumerate(partners) if len(p) == 1}
    half, inter = r // 2, [(2 * i, 2 * i + 1) for i in range(r // 2)]
    if any(len(p) > 1 for p in partners):
        raise TypeError(f"{name}: {function_name} mixes channels in blocks larger than pairs")
    if pairs == {(i, i + half) for i in range(half)}:
        return Pairing(r, False, layout)
    if pairs == set(inter):
        return Pairing(r, True, layout)
    raise TypeError(f"{name}: {function_name} rotates the pairs {sorted(pairs)[:6]}..., neither (i, i + {half}) nor "
                    f"(2i, 2i + 1) over the first {r} channels")
