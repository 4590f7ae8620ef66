"""Install a :class:`rotary.Rotary` into an openai-whisper model's text decoder, in place, without editing whisper.

    model = whisper.load_model("base")                 # or whisper.model.Whisper(ModelDimensions(...))
    rotary.whisper.install(model, placement="attention", mixing="givens")

openai-whisper is an optional dependency: ``pip install 'rotary[whisper]'``. For users: docs/decoder.md; below,
how the install works.

What changes, and nothing else (all of it kept in the install record, :mod:`rotary.integrations.install`):
- ``model.decoder.rotary``: one plain Rotary for the whole decoder, a registered submodule, so its parameters are
  in ``named_parameters()`` and ``state_dict()`` (``decoder.rotary.*``); ``model.decoder.rotary_install``: the
  record (its options are the extra state ``decoder.rotary_install._extra_state``).
- ``model.decoder.forward``: whisper's own ``TextDecoder.forward`` with the positional step changed. With
  ``learned_positions`` (default: True for the embedding placement, False for the attention placement) whisper's
  learned table ``positional_embedding`` is added as before; otherwise it is bypassed: it stays in the
  state_dict, untouched, and receives no gradient. The embedding placement then rotates the embedded tokens.
- attention placement only: the ``forward`` of every decoder *self*-attention rotates q and k with the shared
  Rotary before whisper's own ``qkv_attention``, and the ``forward`` of its ``key`` projection rotates the new
  keys. Cross-attention and values are never rotated.

Whisper's KV-cache hooks (``install_kv_cache_hooks``) store the outputs of the ``key``/``value`` projections, so
a key rotated inside the ``key`` projection's forward is cached rotated, and each decoding step rotates only the
new query and key: the per-token cost does not grow with the transcript (a position never changes once written,
so cached rotated keys stay exact). The self-attention passes the position of its first new token to that
forward explicitly, derived from the call's own ``kv_cache`` by whisper's rule; nothing is stored between calls.
Exception: length-dependent scaling (``scaling`` dynamic or longrope) changes every angle as the sequence grows,
so there the cache keeps unrotated keys and each step rotates the whole key sequence at the current length.
``decode()``, ``transcribe()``, beam search (which reorders the cache) and the alignment hooks keep working,
since the module tree, parameter names and hooks are whisper's own.

The replaced forwards are small picklable objects stored on the instances, so ``copy.deepcopy`` and
``torch.save(model)`` work; :func:`uninstall` removes them, the Rotary and the record.
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from ..core.module import Rotary
from ..core.options import RotaryOptions
from .install import PLACEMENTS, Install, InstallOptions, find, flag

__all__ = ["PLACEMENTS", "install", "installed", "installed_placement", "uninstall"]

HOST = "whisper"


def _whisper_model():
    try:
        import whisper.model
    except ImportError as error:
        raise ImportError(
            "rotary.whisper needs openai-whisper, which is an optional extra: pip install 'rotary[whisper]'"
        ) from error
    return whisper.model


def _cached(kv_cache: dict | None, module: nn.Module, new: int, limit: int) -> int:
    """How many positions whisper's cache hook will have stored for ``module`` before these ``new`` ones: its rule
    (``install_kv_cache_hooks``) restarts the cache on an input longer than the text context."""
    if not kv_cache or module not in kv_cache or new > limit:
        return 0
    return kv_cache[module].shape[1]


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
        if self.placement == "embedding":
            x = d.rotary(x, offset=offset)
        x = x.to(xa.dtype)
        for block in d.blocks:
            x = block(x, xa, mask=d.mask, kv_cache=kv_cache)
        x = d.ln(x)
        return (x @ d.token_embedding.weight.to(x.dtype).T).float()


class _SelfAttentionForward:
    """``MultiHeadAttention.forward`` of openai-whisper for self-attention, with q and k rotated."""

    def __init__(self, attn: nn.Module, rotary: Rotary, text_ctx: int):
        # A plain reference, not a submodule: the Rotary is registered once, at model.decoder.rotary.
        self.attn, self.rotary, self.text_ctx = attn, rotary, text_ctx

    def __call__(self, x: Tensor, xa: Tensor | None = None, mask: Tensor | None = None, kv_cache: dict | None = None):
        """x: ``(B, T, C)``. Returns ``(out (B, T, C), qk or None)`` like whisper."""
        if xa is not None:
            raise ValueError("a rotary self-attention got xa: cross-attention modules are never rotated")
        a = self.attn
        q = a.query(x)  # (B, T, C)
        if self.rotary.length_dependent:
            # Every angle moves with the length: whisper's cache keeps unrotated keys, (B, S, C) with the cached
            # positions first; all of them are rotated here at the current length, the queries at the last T.
            k = a.key(x)
            q, k = self.rotary(q, offset=k.shape[1] - q.shape[1]), self.rotary(k)
        else:
            offset = _cached(kv_cache, a.key, x.shape[1], self.text_ctx)
            # _RotatedKeys rotates the new keys before whisper's cache hook sees them: with its hooks installed,
            # key() returns the cached rotated positions 0 .. offset-1 followed by the new ones, (B, S, C).
            k = a.key(x, offset=offset)
            q = self.rotary(q, offset=offset)
        v = a.value(x)
        wv, qk = a.qkv_attention(q, k, v, mask)
        return a.out(wv), qk


class _RotatedKeys:
    """The ``forward`` of a self-attention's ``key`` projection: whisper's own, then the new keys rotated at their
    positions (``offset`` is given by the self-attention's forward), before the module's hooks (whisper's cache)."""

    def __init__(self, key: nn.Module, rotary: Rotary):
        self.key, self.rotary = key, rotary

    def __call__(self, x: Tensor, offset: int = 0) -> Tensor:
        return self.rotary(type(self.key).forward(self.key, x), offset=offset)  # (B, T, C) at offset ..


def _options(placement, learned_positions, rotary_options, dims) -> InstallOptions:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if learned_positions is None:
        learned_positions = placement == "embedding"
    flag("learned_positions", learned_positions)
    unknown = sorted(set(rotary_options) - {"mixing", "interleaved", "rotary_dim", "base", "learned_freq", "scaling"})
    if unknown:
        raise TypeError(f"unexpected install options {unknown}: rotary.whisper takes placement, learned_positions, "
                        f"mixing, interleaved, rotary_dim, base, learned_freq and scaling")
    rotary = RotaryOptions(dims.n_text_state, dims.n_text_head, **rotary_options)
    # The Rotary applies P itself, R(m) P x, on the q and k it rotates: P on the activations.
    return InstallOptions(rotary, placement=placement, learned_positions=learned_positions, mix_on="activations")


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
            ``base``, ``learned_freq``, ``scaling``).

    Every option is checked before the model is changed: after an error nothing is installed. A pretrained Whisper
    has never seen rotated queries, keys or embeddings: installing changes its outputs (even with P = I, RoPE
    itself is new to it), so fine-tune after installing.
    """
    wm = _whisper_model()
    if not isinstance(model, wm.Whisper):
        raise TypeError(f"install expects an openai-whisper Whisper model, got {type(model).__name__}")
    found = installed(model)
    if found is not None:
        raise RuntimeError(f"a rotary is already installed in this model (placement={found.options.placement!r}): "
                           "call rotary.whisper.uninstall(model) first")
    options = _options(placement, learned_positions, rotary_options, model.dims)
    decoder = model.decoder
    for name in ("rotary", "rotary_install"):
        if hasattr(decoder, name):
            raise RuntimeError(f"model.decoder already has an attribute named {name!r}")
    # Built in float32 on the decoder's device: Rotary computes in float32 whatever the activations' dtype.
    rot = Rotary.from_options(options.rotary).to(decoder.token_embedding.weight.device)
    record = Install(HOST, options)
    try:
        attentions = [block.attn for block in decoder.blocks] if placement == "attention" else []
        record.add_rotary(rot, decoder, folds_into=[(a, n) for a in attentions for n in ("query", "key")])
        record.attach(decoder)
        record.replace_forward(decoder, _TextDecoderForward(decoder, placement, options.learned_positions))
        for attn in attentions:
            record.replace_forward(attn, _SelfAttentionForward(attn, rot, model.dims.n_text_ctx))
            if not rot.length_dependent:
                record.replace_forward(attn.key, _RotatedKeys(attn.key, rot))
    except BaseException:
        record.remove()
        raise
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Remove what :func:`install` added and restore whisper's own forwards, in place; returns the model.

    The decoder's weights are left as they are: a model fine-tuned with a rotary (or folded by
    :func:`rotary.fold`) computes something else without it.
    """
    record = installed(model)
    if record is None:
        raise ValueError("no rotary is installed in this model")
    record.remove()
    return model


def installed(model: nn.Module) -> Install | None:
    """The record of the rotary :func:`install` put into ``model`` (its ``options``, ``rotaries``), or None."""
    return find(model, (HOST,)) if isinstance(model, nn.Module) else None


def installed_placement(model: nn.Module) -> str | None:
    """Deprecated: ``installed(model).options.placement``, or None."""
    warnings.warn("rotary.whisper.installed_placement is deprecated: use installed(model).options.placement",
                  DeprecationWarning, stacklevel=2)
    record = installed(model)
    return None if record is None else record.options.placement
