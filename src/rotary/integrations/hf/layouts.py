"""What :mod:`rotary.integrations.hf.causal` must know of a transformers decoder: where its language model is,
which layers attend with RoPE, where each attention's queries and keys come from, and how the host pairs its rotated
channels.

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
Persimmon, Falcon)                                                   its q and k rows (Falcon: ``[q | k | v]``
                                                                     with one key head, or ``[q_1..q_n k v]``
                                                                     per key-value group)
latent (DeepSeek V2/V3,         ``q_b_proj`` (or ``q_proj``,         each query head's RoPE slice (the last r
MiniCPM3, GLM-4-MoE-Lite, AXK)  ``q_gate_proj``),                    rows of its query); the shared RoPE key
                                ``kv_a_proj_with_mqa``               (the last r rows)
==============================  ===================================  =========================================

Layers: every entry of the layer list whose attention takes ``position_embeddings`` (the model's cos/sin), and
whose ``config.layer_types`` entry (if any) names no linear attention, Mamba or convolution, is a RoPE attention
and gets P, unless it says it skips RoPE (``use_rope`` False: the NoPE layers of Llama 4 and
SmolLM3, where P would cancel between q and k). Layers without one (linear attention, Mamba, convolutions: the
hybrids Qwen3-Next, Qwen3.5, ...) are left alone. A layer whose attention is of no known layout is refused.

Pairing (:func:`rope_pairing`): transformers models rotate pairs ``(i, i + r/2)`` (``rotate_half``) or
``(2i, 2i + 1)`` (Cohere, ERNIE 4.5, Helium, GLM, Llama 4, DeepSeek's complex RoPE), over the first r channels.
A Givens plane equal to a rotated pair commutes with RoPE and cancels between q and k: it must be known, not
assumed. It is read off the host's own function, the one the attention's forward calls (found in its source):
applied to the identity at a few positions m_t it gives A(m_t), and ``A(m_0)^T A(m_t) = R(m_t - m_0)`` whatever
fixed reordering its output has (DeepSeek V3's interleave); the 2 x 2 blocks of R are the pairs.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "LAYOUTS", "Attention", "Layout", "Pairing", "find_attentions", "language_model", "layer_list", "rope_pairing",
]

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


_LATENT_QUERIES = ("q_b_proj", "q_proj", "q_gate_proj")  # AXK2: [q_h | gate_h] per head from q_gate_proj


def _latent(attn: nn.Module, config) -> Geometry:
    if not any(_width(getattr(attn, n, None)) is not None for n in _LATENT_QUERIES):
        raise TypeError(f"{type(attn).__name__}: a latent attention without any of {_LATENT_QUERIES} (found "
                        f"{_describe(attn)})")
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
    if _width(attn.k_proj) % g.head_dim:  # whole key heads; their number may differ by layer (MiMo-V2-Flash)
        _check(attn, "k_proj", g.kv_heads * g.head_dim)
    if _width(attn.q_proj) == 2 * g.heads * g.head_dim:  # gated attention (Qwen3-Next, Qwen3.5): [q_h | gate_h]
        rows = torch.arange(2 * g.heads * g.head_dim).view(g.heads, 2, g.head_dim)[:, 0]  # (H, D): the query rows
        return [("q_proj", rows.reshape(-1)), ("k_proj", None)]
    _check(attn, "q_proj", g.heads * g.head_dim)
    return [("q_proj", None), ("k_proj", None)]


def _fused(attn: nn.Module, g: Geometry) -> list[tuple[str, Rows]]:
    if hasattr(attn, "mp_num"):  # CodeGen: [q v k] within each of mp_num row blocks, not [q | k | v]
        raise TypeError(f"{type(attn).__name__}.qkv_proj holds [q v k] in each of {attn.mp_num} row blocks "
                        f"(model parallel), a layout rotary does not know")
    _check(attn, "qkv_proj", (g.heads + 2 * g.kv_heads) * g.head_dim)
    return [("qkv_proj", slice(0, (g.heads + g.kv_heads) * g.head_dim))]  # the query rows, then the key rows


def _per_head(attn: nn.Module, g: Geometry) -> list[tuple[str, Rows]]:
    d = g.head_dim
    if getattr(attn, "new_decoder_architecture", False):  # Falcon 40B/180B: [q_1 .. q_n k v] per key-value group
        kv = _int(attn, "num_kv_heads") or g.kv_heads
        n = g.heads // kv
        _check(attn, "query_key_value", kv * (n + 2) * d)
        rows = torch.arange(kv * (n + 2) * d).view(kv, n + 2, d)  # (K, n + 2, D)
        return [("query_key_value", torch.cat((rows[:, :n].reshape(-1), rows[:, n].reshape(-1))))]
    if getattr(attn, "multi_query", False):  # Falcon 7B: [q (H heads) | k | v], one key-value head
        _check(attn, "query_key_value", (g.heads + 2) * d)
        return [("query_key_value", slice(0, (g.heads + 1) * d))]
    if g.heads != g.kv_heads:
        raise TypeError(f"{type(attn).__name__}.query_key_value with {g.heads} query and {g.kv_heads} key heads")
    _check(attn, "query_key_value", 3 * g.heads * d)
    rows = torch.arange(3 * d * g.heads).view(g.heads, 3, d)[:, :2]  # (H, [q k], D): each head's q rows, k rows
    return [("query_key_value", rows.transpose(0, 1).reshape(-1))]  # every query head's rows, then every key's


def _latent_targets(attn: nn.Module, g: Geometry) -> list[tuple[str, Rows]]:
    q = next(n for n in _LATENT_QUERIES if _width(getattr(attn, n, None)) is not None)
    width = _width(getattr(attn, q))
    block = width // g.heads  # a head's rows: [nope | rope], then AXK2's gate
    if width % g.heads or block < g.head_dim:
        raise TypeError(f"{type(attn).__name__}.{q} has {width} outputs, not {g.heads} heads of >= {g.head_dim}")
    query = torch.arange(width).view(g.heads, block)[:, g.head_dim - g.rope_dim:g.head_dim]  # (H, r)
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
        if layer_list(module) is not None and isinstance(getattr(module, "rotary_emb", None), nn.Module):
            return module
        stack += [getattr(module, n, None) for n in ("model", "language_model", "text_model")]
    return None


def layer_list(base: nn.Module) -> nn.ModuleList | None:
    """The decoder's layer list: ``layers``, or ``h`` (GPT-J, CodeGen, Falcon)."""
    for name in ("layers", "h"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    return None


def _takes_position_embeddings(module: nn.Module) -> bool:
    return "position_embeddings" in inspect.signature(module.forward).parameters


def find_attentions(base: nn.Module, config, where: str) -> list[Attention]:
    """The RoPE attentions of ``base``'s layers (see the module docstring); raises TypeError naming what it found."""
    attentions = []
    layer_types = getattr(config, "layer_types", None)
    layers = layer_list(base)
    for i, layer in enumerate(layers):
        found = [(n, m) for n, m in layer.named_children() if n in _ATTENTION_NAMES]
        rope = [(n, m) for n, m in found if _takes_position_embeddings(m)]
        kind = layer_types[i] if isinstance(layer_types, (list, tuple)) and i < len(layer_types) else None
        if isinstance(kind, str) and any(w in kind for w in _NOT_ROPE_TYPES):
            rope = []  # MiniMax's lightning attention takes position_embeddings and ignores them
        if not rope:  # linear attention, Mamba, convolution layers of a hybrid: no RoPE to put P before
            continue
        name, attn = rope[0]
        if getattr(attn, "use_rope", True) is False:  # a NoPE layer: P would cancel between q and k
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
                weight = getattr(norm, "weight", None)  # None: a norm without weight (nanochat) moves P through
                if weight is not None and (not isinstance(weight, Tensor) or weight.numel() % geometry.head_dim):
                    raise TypeError(
                        f"{where}, layer {i}: {type(norm).__name__} between the projections and RoPE is not a per-head "
                        f"norm with a weight of a multiple of head_dim={geometry.head_dim} entries (weight "
                        f"{getattr(weight, 'shape', None)})"
                    )
        attentions.append(Attention(i, attn, layout, geometry, targets, norms[0] is not None))
    if not attentions:
        raise TypeError(f"{where}: none of its {len(layers)} layers has an attention that applies the model's "
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
    (``repeat_interleave(f, 2)``), ``"pairs"`` (``(B, T, r/2)``, GPT-OSS), ``"complex"`` (``freqs_cis``,
    ``(B, T, r/2)``), or None (another layout: P can act, learned angles cannot be written)."""

    rotary_dim: int
    interleaved: bool
    cos_layout: str | None
    sin_first: bool = False  # GPT-J's rotary_emb returns (sin, cos)


def cos_sin(rotary_emb: nn.Module, positions: Tensor, layer_type: str | None = None):
    """The host's ``rotary_emb`` at ``positions`` ``(1, T)``: ``(cos, sin)`` or a complex ``freqs_cis``."""
    x = torch.zeros(1, dtype=torch.float32, device=positions.device)
    with torch.no_grad():
        return rotary_emb(x, positions) if layer_type is None else rotary_emb(x, positions, layer_type)


def _cos_layout(cos: Tensor, r: int) -> str | None:
    """How ``rotary_emb`` lays out the cos of r rotated channels (see :class:`Pairing`); None: another way, which
    rotary can read but not write (its angles cannot be learned)."""
    if cos.shape[-1] == r // 2:
        return "pairs"  # one entry per pair (GPT-OSS)
    if cos.shape[-1] != r:
        return None
    if torch.equal(cos[..., : r // 2], cos[..., r // 2:]):
        return "half"
    if torch.equal(cos[..., 0::2], cos[..., 1::2]):
        return "interleaved"
    return None


def _rope_function(attn: nn.Module, config):
    """The function the attention's forward rotates q and k with (its name, the function), found in its source:
    the one ``apply_...rotary...``/``apply_...rope...`` it calls (DeepSeek V3 calls one of two, by
    ``config.rope_interleave``); None if it cannot be told."""
    forward = inspect.unwrap(type(attn).forward)  # transformers decorates forwards (deprecate_kwarg, ...)
    try:
        names = set(re.findall(r"\b(apply_\w*(?:rotary|rope)\w*)\s*\(", inspect.getsource(forward)))
    except (OSError, TypeError):
        names = set()
    names = {n for n in names if "vision" not in n}
    if len(names) > 1 and "apply_rotary_pos_emb_interleave" in names:
        names = {"apply_rotary_pos_emb_interleave" if getattr(config, "rope_interleave", False)
                 else "apply_rotary_pos_emb"}
    if not names:  # a forward that hands q and k to a helper: the module's own function
        names = {"apply_rotary_pos_emb"}
    if len(names) != 1:
        return None
    name = names.pop()
    namespace = getattr(forward, "__globals__", None) or vars(sys.modules.get(type(attn).__module__, object))
    function = namespace.get(name)
    return (name, function) if callable(function) else None


def _apply(function: Callable, x: Tensor, cos: Tensor, sin: Tensor, swapped: bool = False) -> Tensor:
    """``function`` on x as the query (``(q, k, cos, sin)``, or ``(x, cos, sin)``: Gemma 4's), its result for x."""
    try:
        out = function(x, x, cos, sin)
    except TypeError:  # one tensor: Gemma 4's (x, cos, sin), GPT-J's (x, sin, cos), as its rotary_emb returns them
        out = function(x, *((sin, cos) if swapped else (cos, sin)))
    return out[0] if isinstance(out, (tuple, list)) else out


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
    at_zero = cos_sin(rotary_emb, torch.zeros(1, 1, dtype=torch.long, device=device), layer_type)
    sin_first = bool(at_zero[0].abs().max() == 0 and at_zero[1].abs().min() > 0)  # cos(0) > 0, sin(0) = 0
    if sin_first:
        cos, sin = sin, cos
    found = _rope_function(attn, config)
    if found is None:
        raise TypeError(f"{name}: cannot tell which function its forward rotates q and k with")
    function_name, apply = found
    T = positions.shape[-1]
    rotated, errors = None, []
    # the whole head (partial rotary inside the function: GLM, NeoX), or the slice the attention hands it
    for width in dict.fromkeys(w for w in (d, cos.shape[-1], 2 * cos.shape[-1]) if 2 <= w <= d):
        eye = torch.eye(width, device=device).view(1, width, 1, width).repeat(1, 1, T, 1)  # (1, D, T, D)
        for heads_first in (True, False):  # (B, H, T, D) as most take it, or (B, T, H, D) (GPT-J, CodeGen)
            x = eye if heads_first else eye.transpose(1, 2).contiguous()
            try:
                with torch.no_grad():
                    out = _apply(apply, x, cos, sin, sin_first)  # [0, h, t] (or [0, t, h]): what it makes of e_h at m_t
            except (RuntimeError, TypeError, ValueError, IndexError) as error:
                errors.append(f"{width}: {type(error).__name__}")
                continue
            if isinstance(out, Tensor) and out.shape == x.shape:
                rotated = out if heads_first else out.transpose(1, 2)  # (1, D, T, D)
                break
        if rotated is not None:
            break
    if rotated is None:
        raise TypeError(f"{name}: {function_name} could not be applied to a head of {d} channels or to the "
                        f"{cos.shape[-1]} of its cos/sin ({'; '.join(errors)})")
    A = rotated[0].transpose(0, 1).transpose(1, 2).double()  # (T, D, D): A_t, the function at position m_t
    # A_0^T A_t = R(m_t - m_0) whatever fixed reordering the function's output has (DeepSeek V3's interleave)
    relative = A[0].T @ A[1:]  # (T - 1, D, D)
    moved = (relative - torch.eye(width, device=device, dtype=torch.float64)).abs().amax(0)  # (D, D)
    moved.fill_diagonal_(0)
    partners = [torch.nonzero(moved[h] > 1e-6).flatten().tolist() for h in range(width)]
    if any(len(p) > 1 for p in partners):
        raise TypeError(f"{name}: {function_name} mixes channels in blocks larger than pairs")
    pairs = {tuple(sorted((h, p[0]))) for h, p in enumerate(partners) if len(p) == 1}
    r = 2 * len(pairs)
    half, inter = r // 2, {(2 * i, 2 * i + 1) for i in range(r // 2)}
    if r >= 2 and pairs == {(i, i + half) for i in range(half)}:
        return Pairing(r, False, _cos_layout(cos, r), sin_first)
    if r >= 2 and pairs == inter:
        return Pairing(r, True, _cos_layout(cos, r), sin_first)
    raise TypeError(f"{name}: {function_name} rotates the pairs {sorted(pairs)[:6]}..., neither (i, i + r/2) nor "
                    f"(2i, 2i + 1) over the first r channels")
