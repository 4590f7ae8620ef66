"""Install a :class:`rotary.Rotary` into an openai-whisper model's text decoder, in place, without editing whisper.

    model = whisper.load_model("base")                 # or whisper.model.Whisper(ModelDimensions(...))
    rotary.whisper.install(model, placement="attention", mixing="givens")

openai-whisper is an optional dependency: ``pip install 'rotary[whisper]'``.

What changes, and nothing else:
- ``model.decoder.rotary``: one Rotary for the whole decoder, a registered submodule, so its parameters are in
  ``named_parameters()`` and ``state_dict()`` (``decoder.rotary.*``).
- ``model.decoder.forward``: whisper's own ``TextDecoder.forward`` with the positional step changed. With
  ``learned_positions`` (default: True for the embedding placement, False for the attention placement) whisper's
  learned table ``positional_embedding`` is added as before; otherwise it is bypassed: it stays in the
  state_dict, untouched, and receives no gradient. The embedding placement then rotates the embedded tokens.
- attention placement only: the ``forward`` of every decoder *self*-attention rotates q and k with the shared
  Rotary before whisper's own ``qkv_attention``. Cross-attention and values are never rotated.

Whisper's KV-cache hooks (``install_kv_cache_hooks``) store the outputs of the ``key``/``value`` projections. The
attention placement rotates the new keys right at the ``key`` projection's output, in a forward hook that runs
before whisper's cache hook (``prepend=True``), so the cache holds rotated keys and each decoding step rotates
only the new query and key: the per-token cost does not grow with the transcript. A position never changes once
written, so cached rotated keys stay exact. Exception: length-dependent scaling (``scaling`` dynamic or longrope)
changes every angle as the sequence grows, so there the cache keeps unrotated keys and each step rotates the whole
key sequence from position 0 at the current length (O(S) per step). The decoder's forward records the position of its first
new token on the Rotary (``WhisperRotary.offset``) for the key hook: Python state, set once per forward.
``decode()``, ``transcribe()``, beam search (which reorders the cache) and the alignment hooks keep working,
since the module tree, parameter names and hooks are whisper's own.

The replaced forwards are small picklable objects stored on the instances (``module.__dict__["forward"]``), so
``copy.deepcopy`` and ``torch.save(model)`` work; :func:`uninstall` deletes them and the Rotary.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.fold import check_placement, fold_mixing
from ..core.module import Rotary

__all__ = ["PLACEMENTS", "WhisperRotary", "install", "installed_placement", "uninstall"]

PLACEMENTS = ("attention", "embedding")


class WhisperRotary(Rotary):
    """The :class:`rotary.Rotary` that :func:`install` registers at ``model.decoder.rotary``.

    A Rotary (same parameters, state_dict names and forward) that also knows where it was installed, so that
    :func:`rotary.fold` can fold its P into the decoder's self-attention ``query``/``key`` projections
    (:class:`rotary.fold.Foldable`).
    """

    def __init__(self, dims: int, heads: int, *, placement: str, **rotary_options):
        super().__init__(dims, heads, **rotary_options)
        self.placement = placement
        self.attention_layers: list[nn.Module] = []  # plain references, not submodules: whisper owns them
        self.offset = 0  # position of the first new token of the running decoder forward (set by it)
        # keys can be cached rotated unless every angle moves with the sequence length
        self.caches_rotated_keys = not self.length_dependent

    def prepare_fold(self):
        if self.mixer is None:
            return None
        check_placement(self.placement)
        layers = list(self.attention_layers)
        return lambda: fold_mixing(self.remove_mixing(), *(p for a in layers for p in (a.query, a.key)))


def _whisper_model():
    try:
        import whisper.model
    except ImportError as error:
        raise ImportError(
            "rotary.whisper needs openai-whisper, which is an optional extra: pip install 'rotary[whisper]'"
        ) from error
    return whisper.model


class _TextDecoderForward:
    """``TextDecoder.forward`` of openai-whisper, with the rotary's positional step."""

    def __init__(self, decoder: nn.Module, placement: str, learned_positions: bool):
        self.decoder, self.placement, self.learned_positions = decoder, placement, learned_positions

    def __call__(self, x: Tensor, xa: Tensor, kv_cache: dict | None = None) -> Tensor:
        """x: ``(B, T)`` tokens; xa: ``(B, A, n_audio_state)``; returns logits ``(B, T, n_vocab)`` float32."""
        d = self.decoder
        # Whisper's own rule: the first cached tensor (layer 0's self-attention keys) holds the positions so far.
        offset = next(iter(kv_cache.values())).shape[1] if kv_cache else 0
        T = x.shape[-1]
        x = d.token_embedding(x)  # (B, T, C)
        if self.learned_positions:
            if offset + T > d.positional_embedding.shape[0]:
                raise ValueError(
                    f"positions up to {offset + T} exceed whisper's learned table ({d.positional_embedding.shape[0]} "
                    "positions): install with learned_positions=False to bypass it"
                )
            x = x + d.positional_embedding[offset : offset + T]
        d.rotary.offset = offset
        if self.placement == "embedding":
            x = d.rotary(x, offset=offset)
        x = x.to(xa.dtype)
        for block in d.blocks:
            x = block(x, xa, mask=d.mask, kv_cache=kv_cache)
        x = d.ln(x)
        return (x @ d.token_embedding.weight.to(x.dtype).T).float()


class _SelfAttentionForward:
    """``MultiHeadAttention.forward`` of openai-whisper for self-attention, with q and k rotated."""

    def __init__(self, attn: nn.Module, rotary: Rotary):
        # A plain reference, not a submodule: the Rotary is registered once, at model.decoder.rotary.
        self.attn, self.rotary = attn, rotary

    def __call__(self, x: Tensor, xa: Tensor | None = None, mask: Tensor | None = None, kv_cache: dict | None = None):
        """x: ``(B, T, C)``. Returns ``(out (B, T, C), qk or None)`` like whisper."""
        if xa is not None:
            raise ValueError("a rotary self-attention got xa: cross-attention modules are never rotated")
        a = self.attn
        q = a.query(x)  # (B, T, C)
        # With whisper's KV-cache hooks installed, key() and value() return the cached positions 0 .. S-T-1
        # followed by the new ones: (B, S, C). The keys come out rotated by _RotateKeys, except with
        # length-dependent scaling, where they are rotated here, all of them, at the current length.
        k = a.key(x)
        v = a.value(x)
        q = self.rotary(q, offset=k.shape[1] - q.shape[1])
        if not self.rotary.caches_rotated_keys:
            k = self.rotary(k)
        wv, qk = a.qkv_attention(q, k, v, mask)
        return a.out(wv), qk


class _RotateKeys:
    """Forward hook on a self-attention's ``key`` projection: rotates its new keys at their positions, before
    whisper's cache hook stores them (it is prepended to the hooks)."""

    def __init__(self, rotary: WhisperRotary):
        self.rotary = rotary

    def __call__(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        return self.rotary(output, offset=self.rotary.offset)  # (B, T, C) at offset .. offset + T - 1


def install(model: nn.Module, *, placement: str = "attention", learned_positions: bool | None = None, **rotary_options):
    """Install one Rotary into ``model.decoder`` (an openai-whisper ``Whisper``), in place; returns the model.

    Args:
        model: a ``whisper.model.Whisper``. Load or initialise its weights before installing: the state_dict of
            an installed model has the extra ``decoder.rotary.*`` entries.
        placement: ``"attention"`` (q and k of every decoder self-attention; scores depend only on relative
            position) or ``"embedding"`` (once, on the embedded tokens: an absolute, multiplicative encoding).
        learned_positions: keep adding whisper's learned absolute table; default True for ``"embedding"`` (the
            original module's form), False for ``"attention"`` (RoPE replaces the table).
        rotary_options: keyword arguments of :class:`rotary.Rotary` (``mixing``, ``interleaved``, ``rotary_dim``,
            ``base``, ``learned_freq``).

    A pretrained Whisper has never seen rotated queries, keys or embeddings: installing changes its outputs
    (even with P = I, RoPE itself is new to it), so fine-tune after installing.
    """
    wm = _whisper_model()
    if not isinstance(model, wm.Whisper):
        raise TypeError(f"install expects an openai-whisper Whisper model, got {type(model).__name__}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    decoder = model.decoder
    if installed_placement(model) is not None:
        raise RuntimeError("a rotary is already installed in this model: call rotary.whisper.uninstall(model) first")
    if "rotary" in decoder._modules or "rotary" in decoder.__dict__:
        raise RuntimeError("model.decoder already has an attribute named 'rotary'")
    if learned_positions is None:
        learned_positions = placement == "embedding"
    # Built in float32 on the decoder's device: Rotary computes in float32 whatever the activations' dtype.
    rot = WhisperRotary(model.dims.n_text_state, model.dims.n_text_head, placement=placement, **rotary_options)
    decoder.rotary = rot.to(decoder.token_embedding.weight.device)
    decoder.forward = _TextDecoderForward(decoder, placement, bool(learned_positions))
    if placement == "attention":
        for block in decoder.blocks:
            block.attn.forward = _SelfAttentionForward(block.attn, decoder.rotary)
            decoder.rotary.attention_layers.append(block.attn)
            if decoder.rotary.caches_rotated_keys:
                block.attn.key.register_forward_hook(_RotateKeys(decoder.rotary), prepend=True)
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Remove what :func:`install` added and restore whisper's own forwards, in place; returns the model.

    The decoder's weights are left as they are: a model fine-tuned with a rotary (or folded by
    :func:`rotary.fold`) computes something else without it.
    """
    decoder = model.decoder
    if installed_placement(model) is None:
        raise ValueError("no rotary is installed in this model")
    for block in decoder.blocks:
        if isinstance(block.attn.__dict__.get("forward"), _SelfAttentionForward):
            del block.attn.forward
        hooks = block.attn.key._forward_hooks
        for key in [k for k, hook in hooks.items() if isinstance(hook, _RotateKeys)]:
            del hooks[key]
    del decoder.forward
    del decoder.rotary
    return model


def installed_placement(model: nn.Module) -> str | None:
    """``"attention"`` or ``"embedding"`` if :func:`install` put a rotary into ``model`` (a Whisper), else None."""
    decoder = getattr(model, "decoder", None)
    forward = decoder.__dict__.get("forward") if isinstance(decoder, nn.Module) else None
    return forward.placement if isinstance(forward, _TextDecoderForward) else None
