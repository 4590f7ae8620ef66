"""A compact reference decoder in the style of openai-whisper's ``TextDecoder``, with every positional mode.

    config = DecoderConfig(vocab=51865, positional="rotary", placement="attention", mixing="givens")
    model = Decoder(config)
    logits = model(tokens)                         # decoder-only LM (config.xa_dims is None)
    logits = model(tokens, xa, cache=cache)        # with cross-attention and a KV cache

Shapes: B batch, T new tokens, S cached + new positions, A audio frames, C dims, H heads, D head_dim, V vocab.

Data flow: tokens -> embedding (+ learned or sinusoidal table; -> Rotary in the embedding placement) -> blocks
(pre-LayerNorm residual: causal self-attention, whose q and k go through the shared Rotary in the attention
placement; optional cross-attention to ``xa``, never rotated; MLP) -> LayerNorm -> logits tied to the token
embedding. Like whisper's decoder, it computes in the dtype of ``xa`` when given one (weights are cast on use).

P lives in the Rotary (``Decoder.rotary.mixer``, as in every other install). In the attention placement
``R(m) P (W_q x + b_q) = R(m) ((P W_q) x + P b_q)`` per head, so the decoder applies P to the q and k projection
weights, ``(H, D, D) @ (H, D, C)`` once per forward, instead of to every activation, and asks the Rotary for
RoPE alone (``Rotary.rope``): training then costs what plain RoPE costs plus a few tiny matmuls. This is
:func:`rotary.fold` done differentiably each step; after ``fold`` the product is stored and even that goes. In
the embedding placement P acts on the residual stream and the Rotary applies it.

Positions are explicit: a forward starts at ``cache.offset`` (0 without a cache) and the cache records how many
positions it holds. Keys are cached after rotation, since a position never changes once written, so each step
rotates only the new query and key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.kernels import compute_dtype
from ..core.module import Rotary
from ..core.options import RotaryOptions
from .install import flag, heads_mixer, prepare_fold_into

__all__ = ["PLACEMENTS", "POSITIONAL", "Decoder", "DecoderConfig", "KVCache", "load", "save"]

POSITIONAL = ("learned", "sinusoidal", "none", "rotary")
PLACEMENTS = ("attention", "embedding")
# checkpoints written before placement became its own field
_OLD_POSITIONAL = {"rotary-attention": "attention", "rotary-embedding": "embedding"}


@dataclass
class DecoderConfig:
    """Everything needed to rebuild a :class:`Decoder`; stored in its checkpoints.

    Args:
        vocab: vocabulary size V.
        ctx: the longest sequence for the "learned" and "sinusoidal" tables (rotary modes have no limit).
        dims: model width C.
        heads: attention heads H; ``head_dim = dims // heads``.
        layers: residual blocks.
        xa_dims: width of the cross-attention input ``xa`` (e.g. the audio encoder's); None for a decoder-only LM.
        positional: one of :data:`POSITIONAL`.
        placement: where the rotary acts (``positional="rotary"`` only): ``"attention"`` (q and k of every
            self-attention) or ``"embedding"`` (once, on the token embeddings: the original module's placement).
        mixing, interleaved, rotary_dim, base, learned_freq: the :class:`rotary.Rotary` options (rotary only).
    """

    vocab: int
    ctx: int = 448
    dims: int = 384
    heads: int = 6
    layers: int = 4
    xa_dims: int | None = None
    positional: str = "rotary"
    placement: str = "attention"
    mixing: str | None = "givens"
    interleaved: bool = True
    rotary_dim: int | None = None
    base: float = 10000.0
    learned_freq: bool = False

    def __post_init__(self):
        if self.positional in _OLD_POSITIONAL:
            raise ValueError(
                f"positional={self.positional!r} is now positional='rotary', "
                f"placement={_OLD_POSITIONAL[self.positional]!r}"
            )
        if self.positional not in POSITIONAL:
            raise ValueError(f"positional must be one of {POSITIONAL}, got {self.positional!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        for name in ("vocab", "ctx", "dims", "heads", "layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dims % self.heads != 0:
            raise ValueError(f"dims ({self.dims}) must be divisible by heads ({self.heads})")
        if self.xa_dims is not None and (not isinstance(self.xa_dims, int) or self.xa_dims < 1):
            raise ValueError(f"xa_dims must be a positive int or None, got {self.xa_dims!r}")
        if self.positional == "rotary":
            self.rotary_options()  # validated here, at the config, not when the model is built

    def rotary_options(self) -> RotaryOptions:
        """The :class:`RotaryOptions` of the decoder's Rotary (``positional="rotary"``), validated."""
        flag("learned_freq", self.learned_freq)
        return RotaryOptions(self.dims, self.heads, base=self.base, mixing=self.mixing, interleaved=self.interleaved,
                             rotary_dim=self.rotary_dim, learned_freq=self.learned_freq)

    @property
    def head_dim(self) -> int:
        return self.dims // self.heads


@dataclass
class KVCache:
    """Keys and values of every layer for the positions before ``offset``; extended in place by each forward.

    ``offset`` is the position of the next token. A fresh cache starts at 0; ``KVCache(offset=n)`` starts a
    sequence at position n (the cached keys are then positions ``n .. offset - 1``).

    ``keys[i]``, ``values[i]``: ``(B, S, H, D)`` self-attention, keys already rotated (attention placement).
    ``cross[i]``: ``(keys, values)`` ``(B, A, H, D)`` of cross-attention, computed from ``xa`` at the first call.
    """

    offset: int = 0
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    cross: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def reorder(self, indices: Tensor) -> KVCache:
        """Select (and repeat) batch rows in place, e.g. the surviving beams: ``indices`` ``(B',)`` long."""
        self.keys = [k.index_select(0, indices) for k in self.keys]
        self.values = [v.index_select(0, indices) for v in self.values]
        self.cross = [(k.index_select(0, indices), v.index_select(0, indices)) for k, v in self.cross]
        return self


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's sinusoidal table ``(length, channels)``: sines then cosines, geometric timescales.

    Built in float64 and rounded once, so that large positions keep their accuracy.
    """
    if channels % 2 != 0:
        raise ValueError(f"the sinusoidal table needs an even width, got {channels}")
    log_increment = math.log(max_timescale) / max(channels // 2 - 1, 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2, dtype=torch.float64))
    scaled = torch.arange(length, dtype=torch.float64)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1).float()


def _attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    """Attention of q ``(B, T, H, D)`` over k, v ``(B, S, H, D)``; returns ``(B, T, H*D)``.

    causal: the T queries are the last T of the S key positions, and each sees the keys up to its own position
    (a bottom-right aligned mask). Cross-attention passes False.
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    mask, is_causal = None, False
    if causal and T > 1:
        if S == T:
            is_causal = True  # SDPA's own causal mask is top-left aligned: right only when q and k start together
        else:
            rows = torch.arange(T, device=q.device) + (S - T)
            mask = torch.arange(S, device=q.device) <= rows[:, None]  # (T, S), True = may attend
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal
    )  # (B, H, T, D)
    return y.transpose(1, 2).reshape(B, T, H * D)


class Linear(nn.Linear):
    """``nn.Linear`` whose weights follow the input's dtype, as whisper's (a bf16 ``xa`` runs the decoder in bf16)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in float32 (float64 for float64 input) and returned in the input's dtype, as
    whisper's: bf16 statistics would cost precision for nothing."""

    def forward(self, x: Tensor) -> Tensor:
        dt = compute_dtype(x.dtype)
        w, b = (None if t is None else t.to(dt) for t in (self.weight, self.bias))
        return F.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention; ``query``/``key``/``value``/``out`` named as in openai-whisper.

    The key projection has no bias, as in Whisper: a key bias adds the same amount to every score of a query, which
    softmax ignores (and with RoPE it would turn into a position-dependent term no one asked for).
    """

    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dims // heads
        self.query = Linear(dims, dims)
        self.key = Linear(dims, dims, bias=False)
        self.value = Linear(dims, dims)
        self.out = Linear(dims, dims)

    def forward(
        self,
        x: Tensor,
        *,
        offset: int,
        positions: Tensor | None = None,
        rotary: Rotary | None = None,
        mixing: Callable[[Tensor], Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """x ``(B, T, C)`` at positions ``offset ..`` (or ``positions``, ``(T,)`` or ``(B, T)``); mixing: P per head
        on weight rows (:func:`rotary.integrations.install.heads_mixer`), applied to the q/k weights, or None."""
        B, T, _ = x.shape
        if mixing is None:
            q, k = self.query(x), self.key(x)
        else:
            bias = self.query.bias  # in x's dtype, as Linear casts its weights (bf16 with a bf16 xa)
            q = F.linear(x, mixing(self.query.weight).to(x.dtype), None if bias is None else mixing(bias).to(x.dtype))
            k = F.linear(x, mixing(self.key.weight).to(x.dtype))
        q = q.view(B, T, self.heads, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.heads, self.head_dim)
        v = self.value(x).view(B, T, self.heads, self.head_dim)
        if rotary is not None:  # P, if any, is already in the weights
            q = rotary.rope(q, offset=offset, positions=positions, layout="BTHD")
            k = rotary.rope(k, offset=offset, positions=positions, layout="BTHD")
        if cache is not None:
            if layer < len(cache.keys):
                k = torch.cat([cache.keys[layer], k], dim=1)  # (B, S, H, D)
                v = torch.cat([cache.values[layer], v], dim=1)
                cache.keys[layer], cache.values[layer] = k, v
            else:
                cache.keys.append(k)
                cache.values.append(v)
        return self.out(_attend(q, k, v, causal=True))


class CrossAttention(nn.Module):
    """Attention from the text to ``xa`` ``(B, A, xa_dims)``: no positions, no rotation, keys computed once."""

    def __init__(self, dims: int, heads: int, xa_dims: int):
        super().__init__()
        self.heads, self.head_dim = heads, dims // heads
        self.query = Linear(dims, dims)
        self.key = Linear(xa_dims, dims, bias=False)
        self.value = Linear(xa_dims, dims)
        self.out = Linear(dims, dims)

    def forward(self, x: Tensor, xa: Tensor, *, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, _ = x.shape
        q = self.query(x).view(B, T, self.heads, self.head_dim)  # (B, T, H, D)
        if cache is not None and layer < len(cache.cross):
            k, v = cache.cross[layer]
        else:
            k = self.key(xa).unflatten(-1, (self.heads, self.head_dim))  # (B, A, H, D)
            v = self.value(xa).unflatten(-1, (self.heads, self.head_dim))
            if cache is not None:
                cache.cross.append((k, v))
        return self.out(_attend(q, k, v, causal=False))


class Block(nn.Module):
    """Pre-LayerNorm residual block: self-attention, optional cross-attention, MLP (4x, GELU)."""

    def __init__(self, dims: int, heads: int, xa_dims: int | None):
        super().__init__()
        self.attn_ln = LayerNorm(dims)
        self.attn = SelfAttention(dims, heads)
        self.cross_attn_ln = LayerNorm(dims) if xa_dims is not None else None
        self.cross_attn = CrossAttention(dims, heads, xa_dims) if xa_dims is not None else None
        self.mlp_ln = LayerNorm(dims)
        self.mlp = nn.Sequential(Linear(dims, 4 * dims), nn.GELU(), Linear(4 * dims, dims))

    def forward(
        self,
        x: Tensor,
        xa: Tensor | None,
        *,
        offset: int,
        positions: Tensor | None = None,
        rotary: Rotary | None,
        mixing: Callable[[Tensor], Tensor] | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        x = x + self.attn(self.attn_ln(x), offset=offset, positions=positions, rotary=rotary, mixing=mixing,
                          cache=cache, layer=layer)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), xa, cache=cache, layer=layer)
        return x + self.mlp(self.mlp_ln(x))


class Decoder(nn.Module):
    """Whisper-style text decoder (see the module docstring), built from a :class:`DecoderConfig`."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.token_embedding = nn.Embedding(c.vocab, c.dims)
        if c.positional == "learned":
            self.positional_embedding = nn.Parameter(torch.empty(c.ctx, c.dims))
        elif c.positional == "sinusoidal":
            # A constant: non-persistent, so checkpoints hold only learned weights.
            self.register_buffer("positional_embedding", sinusoids(c.ctx, c.dims), persistent=False)
        else:
            self.positional_embedding = None
        if c.positional == "rotary":
            # One module shared by every layer (torchtune's rope, passed to each layer): one cos/sin table, one P.
            self.rotary = Rotary.from_options(c.rotary_options())
        else:
            self.rotary = None
        self.blocks = nn.ModuleList(Block(c.dims, c.heads, c.xa_dims) for _ in range(c.layers))
        self.ln = LayerNorm(c.dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation for the tables: small normals, so tied logits start near uniform.

        (Whisper leaves its learned table as ``torch.empty`` and relies on loading a checkpoint.)
        """
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        if isinstance(self.positional_embedding, nn.Parameter):
            nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: Tensor, xa: Tensor | None = None, *, cache: KVCache | None = None,
                positions: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, V)`` float32 for ``tokens`` ``(B, T)`` at positions ``offset .. offset + T - 1``.

        Args:
            tokens: ``(B, T)`` long.
            xa: ``(B, A, xa_dims)`` features to cross-attend to; required iff ``config.xa_dims`` is set.
            cache: a :class:`KVCache`, extended in place; the new tokens start at ``cache.offset``.
            positions: ``(T,)`` or ``(B, T)`` integer positions of the tokens instead of ``0 .. T - 1`` (e.g.
                PoSE's skipped positions: a short window that carries long-range positions). Attention stays
                causal in token order. Not with a cache, whose positions are its own.
        """
        c = self.config
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        if (xa is None) != (c.xa_dims is None):
            raise ValueError(
                "xa is required by a decoder with cross-attention (config.xa_dims set) and rejected by one without"
            )
        offset = cache.offset if cache is not None else 0
        T = tokens.shape[1]
        if positions is not None:
            if cache is not None:
                raise ValueError("positions= cannot be given with a cache: the cache's offset sets the positions")
            if positions.shape not in ((T,), (tokens.shape[0], T)) or positions.is_floating_point():
                raise ValueError(f"positions must be an integer tensor of shape (T,) or (B, T) = "
                                 f"{tuple(tokens.shape)}, got {positions.dtype} {tuple(positions.shape)}")
        x = self.token_embedding(tokens)  # (B, T, C)
        if c.positional == "sinusoidal":
            # Vaswani et al.'s sqrt(C) scaling: a fixed unit-amplitude table would otherwise drown embeddings
            # initialised at std 0.02 (measured: worse than no position information at all)
            x = x * math.sqrt(c.dims)
        if self.positional_embedding is not None:
            end = offset + T if positions is None else int(positions.max()) + 1
            if end > c.ctx or (positions is not None and int(positions.min()) < 0):
                raise ValueError(f"positions up to {end} exceed the {c.positional} table (ctx={c.ctx})")
            table = self.positional_embedding
            x = x + (table[offset:end] if positions is None else table[positions])  # (T, C) or (B, T, C)
        attention = c.positional == "rotary" and c.placement == "attention"
        if c.positional == "rotary" and not attention:
            x = self.rotary(x, offset=offset, positions=positions)
        if xa is not None:
            x = x.to(xa.dtype)
        rotary = self.rotary if attention else None
        mixing = None
        if attention and self.rotary.mixer is not None:  # P on the q/k weight rows: Givens elementwise
            weight = self.blocks[0].attn.query.weight
            mixing = heads_mixer(self.rotary, compute_dtype(weight.dtype), weight.device)
        for layer, block in enumerate(self.blocks):
            x = block(x, xa, offset=offset, positions=positions, rotary=rotary, mixing=mixing, cache=cache,
                      layer=layer)
        if cache is not None:
            cache.offset = offset + T
        x = self.ln(x)
        return (x @ self.token_embedding.weight.to(x.dtype).T).float()  # (B, T, V), tied to the embedding

    @staticmethod
    def reorder_cache(cache: KVCache, indices: Tensor) -> KVCache:
        """Beam search: keep batch rows ``indices`` of the cache (in place), returns it."""
        return cache.reorder(indices)

    def mixing_matrix(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The learned P ``(head_dim, head_dim)`` of either placement, or None (no rotary, or no mixing)."""
        return self.rotary.mixing_matrix(dtype) if self.rotary is not None else None

    def prepare_fold(self):
        """:class:`rotary.core.fold.Foldable`: P into every block's query and key projections (attention placement);
        the config's ``mixing`` becomes None, so that checkpoints rebuild the folded model."""
        if self.rotary is None:
            return None
        projections = [p for b in self.blocks for p in (b.attn.query, b.attn.key)]

        def forget_mixing():
            self.config = dataclasses.replace(self.config, mixing=None)

        return prepare_fold_into(self.rotary, projections, self.config.placement, then=forget_mixing)


def save(model: Decoder, path) -> None:
    """Write ``{"config": ..., "state_dict": ...}`` (config as a plain dict, loadable with ``weights_only``)."""
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": model.state_dict()}, path)


def load(path, *, device="cpu") -> Decoder:
    """Rebuild a :class:`Decoder` from a :func:`save` checkpoint on ``device`` (strict state_dict load).

    Checkpoints from before ``placement`` was its own field (``positional="rotary-attention"``, P stored as
    ``mixing.*``) are translated; anything else that does not match fails with the names that differ.
    """
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    config, state = dict(checkpoint["config"]), dict(checkpoint["state_dict"])
    if config.get("positional") in _OLD_POSITIONAL:
        config["placement"] = _OLD_POSITIONAL[config["positional"]]
        config["positional"] = "rotary"
        state = {("rotary." + k if k.startswith("mixing.") else k): v for k, v in state.items()}
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(DecoderConfig)})
    if unknown:
        raise ValueError(f"{path}: not a rotary.decoder checkpoint this version can read (unknown fields {unknown})")
    model = Decoder(DecoderConfig(**config)).to(device)
    model.load_state_dict(state)
    return model
