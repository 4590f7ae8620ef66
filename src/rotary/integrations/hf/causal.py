"""Learned rotation P in transformers decoders that apply their own RoPE: causal LMs and the language model of
vision-language models. What install changes, fold and the options, for users: docs/hf.md.

How: the model's attention layout and RoPE pairing are read off it (:mod:`rotary.integrations.hf.layouts`); P
goes before the model's RoPE, on the q/k projection weights (an instance ``forward``, ``F.linear(x, P W, P b)``
per head), on their outputs (a forward hook: PEFT adapters, quantised layers, ``mix_on="activations"``) or on a
per-head q/k norm's; changed angles (``learned_freq``, ``scaling``) replace ``rotary_emb.forward``. Every change
is one install record (:mod:`rotary.integrations.install`, at ``<base model>.rotary_install``), which ``uninstall``
and ``fold`` use; changed angles fold into stock ``rope_parameters`` (:mod:`rotary.integrations.hf.stock`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ...core.module import Rotary
from ...core.options import RotaryOptions
from ..install import MIX_NORM, MIX_ON, Install, InstallOptions, find, flag
from ._common import forget, recorded, require_transformers
from .layouts import Attention, Geometry, Pairing, find_attentions, language_model, layer_list, rope_pairing
from .stock import ATTENTION_KEYS, FoldAngles, other_rope_modules, per_layer_type

__all__ = ["HOST", "install", "install_options", "uninstall"]

HOST = "hf.causal"
_TAKEN_FROM_MODEL = ("base", "rotary_dim", "interleaved", "dims", "heads")


class _RotaryEmbeddingForward:
    """``rotary_emb.forward`` returning the Rotary's cos/sin ``(B, T, rotary_dim)`` in x's dtype, laid out as the
    host.s own (``cos_layout``: ``"half"`` ``cat(f, f)``, ``"interleaved"`` ``repeat_interleave(f, 2)``, ``"pairs"``, or
    ``"complex"``: ``freqs_cis = cos + i sin``, ``(B, T, rotary_dim / 2)``).

    ``rotary``: the Rotary in use (a callable: the installed one, or the adapter's copy that PEFT trains), or, for
    per-layer-type ``rope_parameters`` (Gemma 3), a dict of them by layer type, which ``layer_type`` selects."""

    def __init__(self, rotary: Callable[[], Rotary] | dict[str, Callable[[], Rotary]], cos_layout: str = "half",
                 sin_first: bool = False):
        self.source, self.cos_layout, self.sin_first = rotary, cos_layout, sin_first

    def __call__(self, x: Tensor, position_ids: Tensor, layer_type=None):
        if isinstance(self.source, dict):
            if layer_type not in self.source:
                raise ValueError(f"rotary computes the angles of layer types {sorted(self.source)}, got "
                                 f"layer_type={layer_type!r}")
            rotary = self.source[layer_type]()
        elif layer_type is not None:
            raise ValueError(f"rotary computes one set of angles for all layers, got layer_type={layer_type!r}")
        else:
            rotary = self.source()
        scaling = rotary.angles.scaling
        # transformers evaluates length-dependent schemes (dynamic, longrope) at max(position_ids) + 1 for the
        # whole batch: the same here (a tensor, so no host sync and nothing for torch.compile to guard on)
        length = position_ids.amax() + 1 if scaling is not None and scaling.depends_on_length else None
        cos, sin = rotary.cos_sin(position_ids, length=length)  # (B, T, r/2) float32
        if self.cos_layout == "complex":  # Llama 4, DeepSeek V2: freqs_cis, the attention factor in its modulus
            return torch.complex(cos, sin).to(x.device)
        if self.cos_layout == "interleaved":  # (B, T, r): Cohere's repeat_interleave
            cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        elif self.cos_layout != "pairs":  # (B, T, r): rotate_half's cat; "pairs": (B, T, r/2) as they are (GPT-OSS)
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        cos, sin = cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)
        return (sin, cos) if self.sin_first else (cos, sin)  # GPT-J's order


# --------------------------------------------------------------------------------------------- inspection
class _Host:
    """What :func:`_inspect` found: the language model (``base``, holding the layers and ``rotary_emb``), its RoPE
    attentions (:class:`Attention`), their head geometry and the host's RoPE pairing."""

    def __init__(self, base: nn.Module, rotary_emb: nn.Module, attentions: list[Attention], geometry: Geometry,
                 pairing: Pairing, config):
        self.base, self.rotary_emb, self.attentions, self.geometry, self.pairing = (base, rotary_emb, attentions,
                                                                                    geometry, pairing)
        self.config = config

    @property
    def heads(self) -> int:
        return self.geometry.heads

    @property
    def head_dim(self) -> int:
        """The width of the part of a head that RoPE sees, and P acts on (the RoPE slice of latent attention)."""
        return self.geometry.rope_dim


def _inspect(model: nn.Module) -> _Host:
    """The language model, its RoPE attentions, geometry and pairing; raises TypeError, naming what it found, for
    models it cannot handle (see :mod:`rotary.hf.layouts`)."""
    config = getattr(model, "config", None)
    kind = f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})"
    base = language_model(model)
    if config is None or base is None or len(layer_list(base)) == 0:
        raise TypeError(
            f"rotary.hf.install expects a transformers decoder with a layer list and a rotary_emb module computing "
            f"RoPE's cos/sin (at model.model, or model.model.language_model for vision-language models), got {kind}"
        )
    text_config = getattr(base, "config", None) or config
    attentions = find_attentions(base, text_config, kind)
    geometry = attentions[0].geometry
    layer_type = _first_layer_type(text_config)
    try:
        pairing = rope_pairing(attentions[0].module, base.rotary_emb, geometry, text_config, layer_type)
    except TypeError as error:
        raise TypeError(f"{kind}: {error}; rotary must know the pairs RoPE rotates, or P could cancel between q "
                        f"and k") from None
    return _Host(base, base.rotary_emb, attentions, geometry, pairing, text_config)


def _first_layer_type(config) -> str | None:
    """A layer type to ask a per-layer-type ``rotary_emb`` for (Gemma 3's takes one), or None."""
    params = getattr(config, "rope_parameters", None)
    types = per_layer_type(dict(params or {}), getattr(config, "layer_types", None))
    return next(iter(types)) if types else None


def _rope_parameters(config) -> tuple[dict, float | None]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    return params, params.get("rope_theta", getattr(config, "rope_theta", None))


# --------------------------------------------------------------------------------------------- options
def install_options(model: nn.Module, **options) -> InstallOptions:
    """The :class:`InstallOptions` that :func:`install` builds for ``model`` from its keyword arguments (the
    model's geometry: heads, head_dim, base, rotary dim, RoPE pairing); raises ValueError or TypeError, naming the
    value, for bad ones. Nothing is changed."""
    return _options(_inspect(model), **options)


def _options(host: _Host, *, mixing: str | None = "givens", per_layer: bool = False, mix_on: str = "weights",
             mix_norm: str = "before", **rotary_options) -> InstallOptions:
    """:func:`install_options` for what :func:`_inspect` found (the probe of the host runs once per install)."""
    unknown = sorted(set(rotary_options) - {"learned_freq", "scaling"})
    if unknown:
        taken = [n for n in unknown if n in _TAKEN_FROM_MODEL]
        raise TypeError(
            f"unexpected install options {unknown}: rotary.hf takes mixing, per_layer, mix_on, mix_norm, "
            f"learned_freq and scaling" + (f"; {taken} come from the model's config" if taken else "")
        )
    learned_freq, scaling = rotary_options.get("learned_freq", False), rotary_options.get("scaling")
    flag("learned_freq", learned_freq)
    flag("per_layer", per_layer)
    if mix_on not in MIX_ON:
        raise ValueError(f"mix_on must be one of {MIX_ON}, got {mix_on!r}")
    if mix_norm not in MIX_NORM:
        raise ValueError(f"mix_norm must be one of {MIX_NORM}, got {mix_norm!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"scaling must be a rope_parameters dict or None, got {scaling!r}")
    angles = learned_freq or scaling is not None
    if mixing is None and not angles:
        raise ValueError("nothing to install: mixing=None and no option that changes the angles")
    heads, head_dim, rotary_dim = host.heads, host.head_dim, host.pairing.rotary_dim
    params, theta = _rope_parameters(host.config)
    # the host's pairing: P's planes avoid its rotated pairs and its pass-through channels
    geometry = {"base": theta, "interleaved": host.pairing.interleaved, "rotary_dim": rotary_dim}
    if angles and host.pairing.cos_layout is None:
        raise ValueError(
            f"learned_freq/scaling: {type(host.rotary_emb).__name__} lays out its cos/sin in a way rotary cannot "
            f"write (neither cat(f, f), repeat_interleave(f, 2), one entry per pair nor complex), so its angles "
            f"cannot be replaced. Install P alone (mixing only)"
        )
    if angles and ("mrope_section" in params or getattr(host.rotary_emb, "mrope_section", None) is not None):
        raise ValueError(
            f"learned_freq/scaling: this model's angles are M-RoPE (rope_parameters {params}: sections of the "
            f"frequencies turn with the temporal, height and width positions), which a learned 1-D frequency scale "
            f"cannot replace and no stock config could hold. Install P alone (mixing only), which acts before M-RoPE"
        )
    others = other_rope_modules(host.base, host.rotary_emb) if angles else []
    if others:
        raise ValueError(
            f"learned_freq/scaling change the angles of {type(host.rotary_emb).__name__} (rotary_emb), but this "
            f"model's attentions take theirs from {others} as well: learned frequencies there could not act. Install P "
            f"alone (mixing only), which acts before whatever RoPE module rotates"
        )
    if angles and per_layer_type(params):
        if scaling is not None:
            raise ValueError(
                f"the model has one rope_parameters per layer type ({sorted(params)}): one scaling= dict would be "
                f"ambiguous. learned_freq=True learns each layer type's frequencies, starting at its own; to change "
                f"a type's scheme, set config.rope_parameters[layer_type] before building the model"
            )
        # each layer type's Rotary takes its scheme from config.rope_parameters (unchanged while installed): the
        # record holds learned_freq and the geometry
        options = RotaryOptions(heads * head_dim, heads, mixing=mixing, learned_freq=True, **geometry)
    elif angles:
        angle_scaling = dict(scaling) if scaling is not None else _own_scaling(params, head_dim, rotary_dim)
        if "rope_theta" in angle_scaling:
            del geometry["base"]
        options = RotaryOptions(heads * head_dim, heads, mixing=mixing, learned_freq=learned_freq,
                                scaling=angle_scaling, **geometry)
        if options.rotary_dim != rotary_dim:
            raise ValueError(f"scaling gives rotary_dim {options.rotary_dim}, the model rotates {rotary_dim} channels")
    else:
        options = RotaryOptions(heads * head_dim, heads, mixing=mixing, **geometry)
    return InstallOptions(options, per_layer=per_layer, mix_on=mix_on, mix_norm=mix_norm)


def _own_scaling(params: dict, head_dim: int, rotary_dim: int) -> dict:
    """The scaling dict of a Rotary computing the model's own angles, from its ``rope_parameters``."""
    own = {k: v for k, v in params.items() if k not in ATTENTION_KEYS} or {"rope_type": "default"}  # GPT-J: none
    factor = own.get("partial_rotary_factor")
    if factor is not None and int(head_dim * factor) != rotary_dim:
        # the channels the model's own function rotates are the truth (MiMo-V2-Flash rounds 16 x 0.334 to 6,
        # latent attention applies it to another width); fold keeps the config's factor, and checks the result
        del own["partial_rotary_factor"]
    return own


def _changes_angles(options: RotaryOptions) -> bool:
    return options.learned_freq or options.scaling is not None


def _check_record(options: InstallOptions, host: _Host) -> None:
    """A recorded install must fit this model (a record written for another one must not install)."""
    if not isinstance(options, InstallOptions):
        raise TypeError(f"options must be an InstallOptions, got {type(options).__name__}")
    r = options.rotary
    _, theta = _rope_parameters(host.config)
    want = {"dims": host.heads * host.head_dim, "heads": host.heads, "interleaved": host.pairing.interleaved,
            "rotary_dim": host.pairing.rotary_dim}
    if not _changes_angles(r):
        want["base"] = float(theta) if theta is not None else 10000.0
    found = {k: getattr(r, k) for k in want}
    if found != want or options.placement != "attention" or options.learned_positions:
        raise ValueError(f"these install options do not fit this model: it needs {want} (placement 'attention', "
                         f"no learned positions), the options have {found}, placement {options.placement!r}")


# --------------------------------------------------------------------------------------------- install
def install(model: nn.Module, *, options: InstallOptions | None = None, **kwargs) -> nn.Module:
    """Install a learned rotation P before the model's own RoPE, in every attention, in place; returns the model.

    Args:
        model: a transformers causal LM (``LlamaForCausalLM``, ``Qwen3ForCausalLM``, ... or its base model) whose
            attention takes ``position_embeddings`` (cos, sin) from the model's ``rotary_emb``. Load its weights
            first.
        mixing: P's family (see :class:`rotary.Rotary`): ``"givens"``, ``"orthogonal"``, or None (only with an
            option that changes the angles). The identity at install: the model computes what it did.
        per_layer: one P per attention instead of one shared by all layers.
        mix_on: ``"weights"`` (default) or ``"activations"``: where P is applied (see the module docstring).
        learned_freq: learnable frequencies, starting at the model's own; ``scaling``: a ``rope_parameters`` dict
            replacing the model's. Either makes the Rotary compute the model's cos/sin. Base, rotary dim and
            layout are the model's.
        options: instead of the keywords, a recorded :class:`InstallOptions` (``config.rotary_install``), checked
            against the model.

    Raises TypeError for a model it cannot handle (naming what it found), RuntimeError if a rotary is installed
    already, ValueError for bad options; in every case the model is left as it was.
    """
    require_transformers()
    if options is not None and kwargs:
        raise TypeError(f"pass either options= or keyword options, not both (got {sorted(kwargs)})")
    host = _inspect(model)
    if options is None:
        options = _options(host, **kwargs)
    _check_record(options, host)
    base, rotary_emb, attentions, config = host.base, host.rotary_emb, host.attentions, model.config
    cos_layout, sin_first = host.pairing.cos_layout, host.pairing.sin_first
    if find(base) is not None:
        raise RuntimeError(
            f"a rotary is already installed in this model ({recorded(config)}): call rotary.hf.uninstall(model) first"
        )
    if recorded(config) is not None:
        raise RuntimeError(
            f"the config records a rotary install ({recorded(config)}) but the model has none: it was probably loaded "
            f"with from_pretrained, which drops the rotary's parameters; load it with rotary.hf.from_pretrained "
            f"(or delete model.config.rotary_install to install afresh)"
        )
    r = options.rotary
    angles = _changes_angles(r)
    # Build everything first: nothing below fails on options, and the model is untouched until the record acts.
    device = next(attentions[0].module.parameters()).device
    angle_rotary, type_rotaries = None, {}  # the Rotary computing the angles, or one per layer type (Gemma 3)
    in_use = getattr(host.config, "layer_types", None)  # a type no layer has gets no angles from transformers
    types = per_layer_type(_rope_parameters(host.config)[0], in_use) if angles else None
    if types:
        if r.scaling is not None:
            raise ValueError(f"these install options give one set of angles (scaling {r.scaling}), but the model "
                             f"has one rope_parameters per layer type ({sorted(types)})")
        for layer_type, params in types.items():  # each starts at its own type's angles
            own = _own_scaling(params, host.head_dim, host.pairing.rotary_dim)
            rot = Rotary.from_options(dataclasses.replace(r, mixing=None, scaling=own, base=None)).to(device)
            _check_angles(rotary_emb, rot, device, cos_layout, sin_first, layer_type)
            type_rotaries[layer_type] = rot
        if hasattr(rotary_emb, "rotary"):
            raise RuntimeError(f"{type(rotary_emb).__name__} already has an attribute named 'rotary'")
    elif angles:
        angle_rotary = Rotary.from_options(dataclasses.replace(r, mixing=None) if options.per_layer else r).to(device)
        if r.scaling == _own_scaling(_rope_parameters(host.config)[0], host.head_dim, host.pairing.rotary_dim):
            _check_angles(rotary_emb, angle_rotary, device, cos_layout, sin_first)
    p_only = dataclasses.replace(r, learned_freq=False, scaling=None)

    def p_rotary():
        rot = Rotary.from_options(p_only).to(device)
        rot.angles.build_table(0)  # P only: the model computes the angles (one table per layer with per_layer)
        return rot

    record = Install(HOST, options, config=config)  # fold_angles set below, once the angles' Rotaries are placed
    try:
        placed = []  # (placed rotary, its attentions)
        angles_placed = None  # the placed Rotary computing the angles, if they change
        if options.per_layer:
            for a in attentions:
                placed.append((record.add_rotary(p_rotary(), a.module, keep_after_fold=False), [a]))
            if angle_rotary is not None:
                angles_placed = record.add_rotary(angle_rotary, base)
        elif angle_rotary is not None or r.mixing is not None:
            shared = angle_rotary if angle_rotary is not None else p_rotary()
            placed.append((record.add_rotary(shared, base, keep_after_fold=angle_rotary is not None), attentions))
            angles_placed = placed[0][0] if angle_rotary is not None else None
        sources = {None: angles_placed.current} if angles_placed is not None else {}
        if type_rotaries:  # at <base>.rotary_emb.rotary.<layer type>: their state_dict keys have a "rotary" part
            holder = nn.ModuleDict()
            record.add_module(rotary_emb, "rotary", holder)
            sources = {t: record.add_rotary(rot, holder, name=t).current for t, rot in type_rotaries.items()}
        record.attach(base)
        for p, owned in placed:
            if p.rotary.mixer is None:
                continue
            for a in owned:
                if a.norms and options.mix_norm == "after":
                    for name in ("q_norm", "k_norm"):
                        record.mix_after(p, f"attention {a.index}'s {name}", getattr(a.module, name))
                else:  # before a q/k norm, P folds into the projections whatever the norm's weight
                    for name, rows in a.targets:
                        record.mix_projection(p, a.module, name, rows)
        if sources:
            forward = _RotaryEmbeddingForward(sources.get(None, sources), cos_layout, sin_first)  # one, or by type
            record.replace_forward(rotary_emb, forward)
            # rotary.fold writes the angles as stock rope_parameters and rebuilds rotary_emb (rotary.hf.stock)
            record.fold_angles = FoldAngles(host.config, rotary_emb, forward, sources, base)
    except BaseException:
        record.remove()
        raise
    return model


def _check_angles(rotary_emb: nn.Module, rotary: Rotary, device, cos_layout: str, sin_first: bool,
                  layer_type: str | None = None) -> None:
    """The Rotary must reproduce the model's own cos/sin (of ``layer_type``) before its frequencies are learned."""
    positions = torch.arange(32, device=device).unsqueeze(0)  # (1, 32)
    x = torch.zeros(1, dtype=torch.float32, device=device)
    args, source = ((), lambda: rotary) if layer_type is None else ((layer_type,), {layer_type: lambda: rotary})
    with torch.no_grad():
        theirs = rotary_emb(x, positions, *args)
        mine = _RotaryEmbeddingForward(source, cos_layout, sin_first)(x, positions, *args)
    if cos_layout == "complex":  # freqs_cis: compare its real and imaginary parts as cos and sin
        theirs, mine = (theirs.real, theirs.imag), (mine.real, mine.imag)
    cos, sin = theirs
    if cos.shape != mine[0].shape:
        raise ValueError(f"the model's rotary_emb gives cos of shape {tuple(cos.shape)}, rotary {tuple(mine[0].shape)}")
    error = max((cos - mine[0]).abs().max().item(), (sin - mine[1]).abs().max().item())
    if not error <= 1e-4:  # float32 angles (transformers) against float64 ones, positions < 32
        raise ValueError(
            f"rotary cannot reproduce this model's RoPE ({type(rotary_emb).__name__}, rope_parameters "
            f"{rotary.options.scaling}): cos/sin differ by {error:.3g}, so learned_freq/scaling cannot replace it"
        )


def uninstall(model: nn.Module) -> nn.Module:
    """Remove everything :func:`install` added, in place: transformers' module tree, state_dict keys and config.

    The weights are left as they are (call :func:`rotary.fold` first to keep a learned P).
    """
    record = find(model, (HOST,))
    if record is None and recorded(getattr(model, "config", None)) is None:
        raise ValueError(f"no rotary is installed in this {type(model).__name__}")
    if record is not None:
        record.remove()
    forget(model.config)
    return model
