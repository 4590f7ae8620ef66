"""A :class:`rotary.Rotary` in a Hugging Face Whisper's text decoder (``WhisperForConditionalGeneration``,
``WhisperModel``), installed without editing transformers. What is installed, the options, the 448 cap, saving,
fold and PEFT, for users: docs/hf_whisper.md.

How: the attention placement replaces the ``forward`` of every decoder self-attention (an instance attribute) by
transformers' own body with q and k rotated before the key cache is updated (a test fails the day transformers
changes that body: identity install == stock logits); the embedding placement is a forward pre-hook on the
decoder; bypassing the learned table replaces ``embed_positions.forward`` and lifts ``max_target_positions``
for ``generate``. Every change is one install record (:mod:`rotary.integrations.install`, at
``decoder.rotary_install``). The replaced forwards and hooks are small picklable objects, so ``copy.deepcopy``
and ``torch.save(model)`` work.
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from ...core.module import Rotary
from ...core.options import RotaryOptions
from ..install import PLACEMENTS, Install, InstallOptions, find, flag
from ._common import require_transformers

__all__ = ["HOST", "PLACEMENTS", "install", "install_options", "installed", "installed_placement", "uninstall"]

HOST = "hf.whisper"
_NO_CAP = 1 << 30  # max_target_positions while the learned table is bypassed: RoPE has no length limit
_ROTARY_OPTIONS = ("mixing", "interleaved", "rotary_dim", "base", "learned_freq", "scaling")


def _transformers():
    require_transformers()
    from transformers import WhisperForConditionalGeneration, WhisperModel
    from transformers.cache_utils import EncoderDecoderCache
    from transformers.models.whisper import modeling_whisper

    return WhisperForConditionalGeneration, WhisperModel, EncoderDecoderCache, modeling_whisper


class _SelfAttentionForward:
    """transformers' ``WhisperAttention.forward`` for decoder self-attention, with q and k rotated before caching.

    A replaced forward body: the identity test (P = I, position 0, learned positions kept: logits equal stock's)
    fails the day transformers changes the body it copies.
    """

    def __init__(self, attn: nn.Module, rotary, encoder_decoder_cache: type, attention_functions, eager):
        # ``rotary()`` is the Rotary in use (:meth:`Placed.current`): the one registered once, at the decoder's
        # ``rotary``, or the active adapter's copy where PEFT trains it. A plain reference, not a submodule.
        self.attn, self.rotary = attn, rotary
        self.encoder_decoder_cache, self.attention_functions, self.eager = (
            encoder_decoder_cache, attention_functions, eager
        )

    def __call__(
        self,
        hidden_states: Tensor,
        key_value_states: Tensor | None = None,
        cache=None,
        attention_mask: Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ):
        """hidden_states ``(B, T, C)``; returns ``(out (B, T, C), attention weights or None)`` like transformers."""
        if key_value_states is not None:
            raise ValueError("a rotary self-attention got key_value_states: cross-attention is never rotated")
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # the name transformers deprecates
        a, rotary = self.attn, self.rotary()
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, a.head_dim)
        # Scaled before rotating, in transformers' order (it keeps openai-whisper's rounding).
        q = (a.q_proj(hidden_states) * a.scaling).view(hidden_shape)  # (B, T, H, D)
        k = a.k_proj(hidden_states).view(hidden_shape)  # (B, T, H, D)
        v = a.v_proj(hidden_states).view(hidden_shape).transpose(1, 2).contiguous()  # (B, H, T, D)
        if isinstance(cache, self.encoder_decoder_cache):
            cache = cache.self_attention_cache
        if not rotary.length_dependent:  # keys cached rotated: their positions never change
            offset = cache.get_seq_length(a.layer_idx) if cache is not None else 0  # a Python int: no host sync
            # Rotated in (B, T, H, D), the projections' own buffers, then laid out (B, H, T, D) as transformers does.
            q, k = rotary.rotate_qk(q, k, offset=offset, layout="BTHD")
            q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
            if cache is not None:
                k, v = cache.update(k, v, a.layer_idx, kwargs=kwargs)  # rotated keys go into the cache
        else:
            # Length-dependent scaling moves every angle as the sequence grows: cache unrotated keys and rotate
            # them all, at positions 0 .. Tk-1 and the current length, with the queries at the last Tq.
            q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
            if cache is not None:
                k, v = cache.update(k, v, a.layer_idx, kwargs=kwargs)
            q, k = rotary.rotate_qk(q, k, offset=k.shape[2] - q.shape[2])
        attention = self.attention_functions.get_interface(a.config._attn_implementation, self.eager)
        out, weights = attention(
            a, q, k, v, attention_mask,
            dropout=0.0 if not a.training else a.dropout,
            scaling=1.0,  # already applied to q, as transformers does
            output_attentions=output_attentions,
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()  # (B, T, C)
        return a.out_proj(out), weights


class _NoLearnedPositions:
    """``embed_positions.forward`` while the learned table is bypassed (or added by :class:`_DecoderInputs`)."""

    def __init__(self, table: nn.Module):
        self.table = table

    def __call__(self, input_ids, cache_length=0, position_ids=None) -> Tensor:
        # A 0-d zero: the decoder's ``inputs_embeds + positions`` is then exact and costs one broadcast add.
        return self.table.weight.new_zeros(())


class _DecoderInputs:
    """Forward pre-hook (with kwargs) on the decoder: the learned table's length check, and the embedding placement.

    Positions follow the decoder's own rule: ``position_ids`` if given, else ``cache_length + arange(T)``.
    """

    def __init__(self, placement: str, learned_positions: bool):
        self.placement, self.learned_positions = placement, learned_positions

    def __call__(self, decoder: nn.Module, args: tuple, kwargs: dict):
        if args:
            if len(args) > 1:
                raise TypeError("pass the decoder's arguments after input_ids by keyword while a rotary is installed")
            kwargs = {**kwargs, "input_ids": args[0]}
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if (input_ids is None) == (embeds is None):
            return None  # the decoder raises its own error
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        position_ids = kwargs.get("position_ids")
        T = (input_ids if embeds is None else embeds).shape[1]
        cache_length = cache.get_seq_length() if cache is not None else 0
        limit = decoder.max_target_positions
        if self.learned_positions and cache_length + T > limit:
            raise ValueError(
                f"the decoder input reaches {cache_length + T} positions ({cache_length} cached + {T} new), but the "
                f"learned position table kept by this rotary install has max_target_positions = {limit}: shorten "
                "the input, or install with learned_positions=False to run past it"
            )
        if self.placement != "embedding":
            return None if not args else ((), kwargs)
        x = decoder.embed_tokens(input_ids) if embeds is None else embeds  # (B, T, C)
        if self.learned_positions:
            table = decoder.embed_positions
            # the class's forward: the instance's is _NoLearnedPositions, so that the decoder adds nothing more
            x = x + type(table).forward(table, x, cache_length=cache_length, position_ids=position_ids).to(x.device)
        if position_ids is None:
            x = decoder.rotary(x, offset=cache_length)
        else:
            x = decoder.rotary(x, positions=position_ids)
        return (), {**kwargs, "input_ids": None, "inputs_embeds": x}


class _UncappedGenerate:
    """``model.generate`` with the learned table bypassed: transformers' own generate, with
    ``config.max_target_positions`` raised for the call so that it neither refuses nor trims past 448 tokens."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        config = self.model.config
        cap = config.max_target_positions
        config.max_target_positions = _NO_CAP
        try:
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            config.max_target_positions = cap


def _decoder(model: nn.Module) -> nn.Module:
    conditional, bare, _, _ = _transformers()
    if isinstance(model, conditional):
        return model.model.decoder
    if isinstance(model, bare):
        return model.decoder
    raise TypeError(
        f"rotary.hf.whisper expects a transformers WhisperForConditionalGeneration or WhisperModel, "
        f"got {type(model).__name__}"
    )


def install_options(model: nn.Module, *, placement: str = "attention", learned_positions: bool | None = None,
                    **rotary_options) -> InstallOptions:
    """The :class:`InstallOptions` that :func:`install` builds from its keyword arguments; raises ValueError or
    TypeError, naming the value, for bad ones. Nothing is changed."""
    config = model.config
    if placement not in PLACEMENTS:
        raise ValueError(
            f"placement must be one of {PLACEMENTS} (the decoder's self-attention or its token embeddings; HF "
            f"Whisper has no other), got {placement!r}"
        )
    if learned_positions is None:
        learned_positions = placement == "embedding"
    flag("learned_positions", learned_positions)
    unknown = sorted(set(rotary_options) - set(_ROTARY_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected install options {unknown}: rotary.hf.whisper takes placement, "
                        f"learned_positions and {', '.join(_ROTARY_OPTIONS)}")
    rotary = RotaryOptions(config.d_model, config.decoder_attention_heads, **rotary_options)
    # The Rotary applies P itself, R(m) P x, on the q and k it rotates: P on the activations.
    return InstallOptions(rotary, placement=placement, learned_positions=learned_positions, mix_on="activations")


def install(model: nn.Module, *, options: InstallOptions | None = None, **kwargs):
    """Install one Rotary into a Hugging Face Whisper's text decoder, in place; returns the model.

    Args:
        model: a ``WhisperForConditionalGeneration`` or ``WhisperModel``. Load its weights before installing (or
            use :func:`rotary.hf.from_pretrained` for a checkpoint saved with a rotary).
        placement: ``"attention"`` (q and k of every decoder self-attention; scores depend only on relative
            position) or ``"embedding"`` (once, on the decoder's embedded tokens: an absolute, multiplicative
            encoding).
        learned_positions: keep adding the learned absolute table ``embed_positions``; default True for
            ``"embedding"`` (the original module's form), False for ``"attention"`` (RoPE replaces the table and
            lifts the ``max_target_positions`` cap).
        mixing, interleaved, rotary_dim, base, learned_freq, scaling: the options of :class:`rotary.Rotary`.
        options: instead of the keywords, a recorded :class:`InstallOptions` (``config.rotary_install``).

    Every check runs before the model is changed: after an error nothing is installed. A pretrained Whisper has
    never seen rotated queries, keys or embeddings: installing changes its outputs (even with P = I, RoPE itself
    is new to it), so fine-tune after installing.
    """
    conditional, _, encoder_decoder_cache, modeling_whisper = _transformers()
    decoder = _decoder(model)
    found = installed(model)
    if found is not None:
        raise RuntimeError(
            f"a rotary is already installed in this model (placement={found.options.placement!r}): call "
            "rotary.hf.uninstall(model) first"
        )
    if options is None:
        options = install_options(model, **kwargs)
    elif kwargs:
        raise TypeError(f"pass either options= or keyword options, not both (got {sorted(kwargs)})")
    config = model.config
    if (options.rotary.dims, options.rotary.heads) != (config.d_model, config.decoder_attention_heads):
        raise ValueError(f"these install options are for dims={options.rotary.dims}, heads={options.rotary.heads}; "
                         f"this decoder has {config.d_model}, {config.decoder_attention_heads}")
    if options.mix_on != "activations" or options.per_layer:
        raise ValueError("rotary.hf.whisper applies one P in the Rotary itself: mix_on='activations', per_layer=False")
    for name in ("rotary", "rotary_install"):
        if hasattr(decoder, name):
            raise RuntimeError(f"the decoder already has an attribute named {name!r}: {getattr(decoder, name)!r}")
    placement, learned = options.placement, options.learned_positions
    # Built (and validated) before anything is changed; float32 on the decoder's device whatever the model's
    # dtype: Rotary computes its angles in float32 at least.
    rot = Rotary.from_options(options.rotary).to(decoder.embed_tokens.weight.device)
    attentions = [layer.self_attn for layer in decoder.layers] if placement == "attention" else []
    record = Install(HOST, options, config=config)
    try:
        placed = record.add_rotary(rot, decoder,
                                   folds_into=[(a, n) for a in attentions for n in ("q_proj", "k_proj")])
        record.attach(decoder)
        for attn in attentions:
            record.replace_forward(attn, _SelfAttentionForward(
                attn, placed.current, encoder_decoder_cache, modeling_whisper.ALL_ATTENTION_FUNCTIONS,
                modeling_whisper.eager_attention_forward,
            ))
        if placement == "embedding" or not learned:
            record.replace_forward(decoder.embed_positions, _NoLearnedPositions(decoder.embed_positions))
        if placement == "embedding" or learned:
            record.forward_pre_hook(decoder, _DecoderInputs(placement, learned), with_kwargs=True)
        if not learned and isinstance(model, conditional):
            # the labels length check of WhisperForConditionalGeneration.forward, and generate's cap
            record.set_attribute(model, "max_target_positions", _NO_CAP)
            record.set_attribute(model, "generate", _UncappedGenerate(model))
    except BaseException:
        record.remove()
        raise
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Remove what :func:`install` added and restore transformers' own forwards, in place; returns the model.

    The weights are left as they are: a model fine-tuned with a rotary (or folded by :func:`rotary.fold`)
    computes something else without it.
    """
    record = installed(model)
    if record is None:
        raise ValueError("no rotary is installed in this model (expected one installed by rotary.hf.install)")
    record.remove()
    return model


def installed(model: nn.Module) -> Install | None:
    """The record of the rotary :func:`install` put into ``model`` (or into the Whisper inside a PEFT model), or
    None."""
    if callable(getattr(model, "get_base_model", None)) and isinstance(getattr(model, "peft_config", None), dict):
        model = model.get_base_model()  # a PEFT model (rotary.hf.peft.is_peft_model)
    return find(_decoder(model), (HOST,))


def installed_placement(model: nn.Module) -> str | None:
    """Deprecated: ``installed(model).options.placement``, or None."""
    warnings.warn("rotary.hf.whisper.installed_placement is deprecated: use installed(model).options.placement",
                  DeprecationWarning, stacklevel=2)
    record = installed(model)
    return None if record is None else record.options.placement
