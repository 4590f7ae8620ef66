"""Learned rotation P in transformers causal LMs that apply their own RoPE (Llama, Mistral, Qwen2, Qwen3, Gemma, ...).

    rotary.hf.install(model)          # P = I: the model computes exactly what it computed before
    ...train...
    rotary.fold(model)                # P into q_proj/k_proj; the model is stock again
    model.save_pretrained(folder)     # a stock checkpoint: any engine serves it at no extra cost

Such a model computes ``q = W_q x + b_q`` per head, then ``R(m) q`` with cos/sin that its ``rotary_emb`` computes
once per forward and hands to every attention as ``position_embeddings`` (half layout, transformers'
``rotate_half``). The install adds P before that RoPE, ``R(m) P q`` (likewise keys; grouped-query key heads share
P), and changes nothing else:

- where P acts: on the projection weights. Each ``q_proj``/``k_proj`` gets an instance ``forward`` computing
  ``F.linear(x, P W, P b)`` per head (:func:`rotary.fold.mix_rows`): P costs O(heads * D^2 * C) flops per forward
  on the weights, against O(B * T * heads * D * C) for the projection itself, and nothing on the activations.
  Where a per-head norm sits between the projection and RoPE (Qwen3's ``q_norm``/``k_norm``), P must act after
  it: a forward hook on the norm multiplies its output by P.
- where P lives: a :class:`CausalRotary` (a :class:`rotary.Rotary`) registered once at ``<base model>.rotary``
  (``model.model.rotary``), shared by all layers; with ``per_layer=True`` one per attention, at
  ``layers[i].self_attn.rotary``. Its parameters are the model's (``named_parameters``, ``state_dict``, Trainer).
- angles: untouched (the model's ``rotary_emb``, its ``rope_parameters`` and partial rotary), unless an option
  changes them (``learned_freq=True``, ``scaling=``): then ``rotary_emb.forward`` returns the Rotary's cos/sin
  (float64 angles, the scheme's attention factor applied as transformers applies it) in the dtype attention
  expects. That Rotary is registered at ``<base model>.rotary``.
- the install options are recorded in ``model.config.rotary`` (see :mod:`rotary.hf._common`).

Folding (:func:`rotary.fold`): P moves into ``q_proj``/``k_proj`` (weights and biases), then the forwards, hooks
and rotaries go, and so does the record: the module tree, state_dict and config are stock. With a q/k norm, the fold
is exact only if the norm is an RMSNorm whose weight is uniform within each head (then ``norm(P y) = P norm(y)``);
otherwise ``fold`` refuses. When the angles were changed, P still folds, but the Rotary that computes the angles
stays: no stock checkpoint can reproduce such a model (the record stays too, for :func:`rotary.hf.from_pretrained`).
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.fold import fold_mixing, mix_rows
from ...core.functional import compute_dtype
from ...core.module import Rotary
from ._common import forget, record, recorded, require_transformers

__all__ = ["CausalRotary", "install", "uninstall"]

logger = logging.getLogger(__name__)

_TAKEN_FROM_MODEL = ("base", "rotary_dim", "interleaved", "dims", "heads")


class CausalRotary(Rotary):
    """The :class:`rotary.Rotary` that :func:`install` registers in a causal LM (half layout, as transformers).

    Holds P for the attentions it was installed into and, with ``angles=True``, computes the model's cos/sin.
    Knows where it acts, so that :func:`rotary.fold` can move P into those projections
    (:class:`rotary.fold.Foldable`).
    """

    def __init__(self, dims: int, heads: int, *, angles: bool, **rotary_options):
        super().__init__(dims, heads, interleaved=False, **rotary_options)
        self.computes_angles = angles
        if not angles:  # P only: the model computes the angles, so no cos/sin table (one per layer with per_layer)
            self.angles.build_table(0)
        # Plain references (lists are not registered): the model owns these modules.
        self.attentions: list[nn.Module] = []
        self.home: list = []  # [parent module, attribute name] where this rotary is registered
        self.base_model: list[nn.Module] = []

    def prepare_fold(self):
        """Check that P folds exactly into the projections of its attentions; return the action that does it."""
        if self.mixer is None:
            return None
        for i, attn in enumerate(self.attentions):
            for name in ("q_norm", "k_norm"):
                norm = getattr(attn, name, None)
                if norm is not None and _hook_of(norm) is not None:
                    reason = _commutes_with_rotations(norm, self.head_dim)
                    if reason is not None:
                        raise ValueError(
                            f"cannot fold P exactly: attention {i}'s {name} ({type(norm).__name__}) sits between "
                            f"{name[0]}_proj and RoPE, and {reason}. P moves through such a norm only if the norm "
                            f"is an RMSNorm whose weight is uniform within each head (then norm(P y) = P norm(y)). "
                            f"Nothing was changed. Ship the model with the rotary installed (model.save_pretrained, "
                            f"then rotary.hf.from_pretrained; P costs one (head_dim x head_dim) product per head), "
                            f"or train with the q/k norms frozen at a uniform weight so that fold stays exact."
                        )

        def action():
            P = self.remove_mixing()
            fold_mixing(P, *(p for a in self.attentions for p in (a.q_proj, a.k_proj)))
            for attn in self.attentions:
                _remove_mixing_from(attn)
            if not self.computes_angles:
                parent, name = self.home
                delattr(parent, name)
            else:
                logger.warning(
                    "rotary.fold: P is folded into q_proj/k_proj, but the angles were changed (learned_freq or "
                    "scaling): the rotary that computes them stays installed, so model.save_pretrained does not "
                    "write a stock checkpoint; reload it with rotary.hf.from_pretrained"
                )
            _sync_record(self.base_model[0])

        return action


class _MixedProjection:
    """``nn.Linear.forward`` with P applied per head to the weight rows and the bias: ``F.linear(x, P W, P b)``.

    Stored as the projection's instance ``forward``: parameter names, state_dict and hooks stay the Linear's own.
    P is built once per call from the Rotary's parameters (never cached: it is trained).
    """

    def __init__(self, linear: nn.Linear, rotary: Rotary):
        self.linear, self.rotary = linear, rotary  # plain references: the rotary is registered elsewhere

    def __call__(self, x: Tensor) -> Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        # (D, D), float32 at least, rounded once below; on the weight's device (layers may sit on several)
        P = self.rotary.mixing_matrix(compute_dtype(weight.dtype)).to(weight.device)
        weight = mix_rows(weight, P).to(weight.dtype)  # (heads * D, C)
        if bias is not None:
            bias = mix_rows(bias, P).to(bias.dtype)
        return F.linear(x, weight, bias)


class _MixAfterNorm:
    """Forward hook on a per-head q/k norm: its output ``(..., heads * D)`` or ``(..., heads, D)`` times P per head."""

    def __init__(self, rotary: Rotary):
        self.rotary = rotary

    def __call__(self, module: nn.Module, args, output: Tensor) -> Tensor:
        D = self.rotary.head_dim
        P = self.rotary.mixing_matrix(compute_dtype(output.dtype)).to(output.device)
        heads = output.unflatten(-1, (-1, D))  # (..., H, D)
        return (heads.to(P.dtype) @ P.T).to(output.dtype).reshape(output.shape)


class _RotaryEmbeddingForward:
    """``rotary_emb.forward`` returning the Rotary's cos/sin ``(B, T, rotary_dim)``, half layout, in x's dtype."""

    def __init__(self, rotary: Rotary):
        self.rotary = rotary

    def __call__(self, x: Tensor, position_ids: Tensor, layer_type=None) -> tuple[Tensor, Tensor]:
        if layer_type is not None:
            raise ValueError(f"rotary computes one set of angles for all layers, got layer_type={layer_type!r}")
        scaling = self.rotary.angles.scaling
        # transformers evaluates length-dependent schemes (dynamic, longrope) at max(position_ids) + 1 for the
        # whole batch: the same here (a tensor, so no host sync and nothing for torch.compile to guard on)
        length = position_ids.amax() + 1 if scaling is not None and scaling.depends_on_length else None
        cos, sin = self.rotary.cos_sin(position_ids, length=length)  # (B, T, r/2) float32
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)  # (B, T, r): rotate_half's layout
        return cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)


class _CheckRotaryTensors:
    """``load_state_dict`` pre-hook on the base model: a state_dict that carries rotary tensors (a checkpoint of an
    installed model, e.g. when Trainer resumes) must carry exactly this install's, whatever ``strict`` says."""

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        expected = sorted(prefix + k for k in module.state_dict() if _is_rotary_key(k))
        found = sorted(k for k in state_dict if k.startswith(prefix) and _is_rotary_key(k[len(prefix):]))
        if found and found != expected:
            raise ValueError(
                f"the state_dict comes from a different rotary install: this model's ({recorded(module.config)}) "
                f"expects rotary tensors {expected}, found {found}"
            )


def _is_rotary_key(name: str) -> bool:
    return "rotary" in name.split(".")  # what install registers; never transformers' own rotary_emb


# --------------------------------------------------------------------------------------------- inspection
class _Attention:
    """What :func:`_inspect` found in one attention module."""

    def __init__(self, module: nn.Module, norms: bool):
        self.module, self.norms = module, norms


def _inspect(model: nn.Module):
    """The base model, its attentions and geometry; raises, naming what it found, for models it cannot handle."""
    config = getattr(model, "config", None)
    kind = f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})"
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if config is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(
            f"rotary.hf.install expects a transformers causal LM with a decoder layer list at model.model.layers "
            f"(Llama, Mistral, Qwen2, Qwen3, Gemma, ...), got {kind}"
        )
    rotary_emb = getattr(base, "rotary_emb", None)
    if not isinstance(rotary_emb, nn.Module):
        raise TypeError(
            f"{kind} has no rotary_emb module computing RoPE's cos/sin (its base model has "
            f"{sorted(base._modules)}): rotary.hf.install handles models that apply their own RoPE"
        )
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attentions, head_dim = [], None
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        where = f"{kind}, layer {i}"
        if not isinstance(attn, nn.Module):
            raise TypeError(f"{where}: no self_attn module (found {sorted(layer._modules)})")
        q, k = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
        if not (_plain_linear(q) and _plain_linear(k)):
            raise TypeError(
                f"{where}: {type(attn).__name__} has no separate q_proj/k_proj nn.Linear (found "
                f"{ {n: type(m).__name__ for n, m in attn._modules.items()} }): rotary puts P on the query and key "
                f"projections"
            )
        if "position_embeddings" not in inspect.signature(attn.forward).parameters:
            raise TypeError(
                f"{where}: {type(attn).__name__}.forward takes no position_embeddings (the model's cos/sin), so it "
                f"does not apply the model's RoPE as rotary.hf expects"
            )
        d = getattr(attn, "head_dim", None)
        if not isinstance(d, int) or head_dim not in (None, d):
            raise TypeError(f"{where}: head_dim {d!r}, expected an int equal in every layer ({head_dim})")
        head_dim = d
        if q.out_features != heads * d or k.out_features != kv_heads * d:
            raise TypeError(
                f"{where}: q_proj/k_proj have {q.out_features}/{k.out_features} outputs, expected "
                f"{heads} x {d} / {kv_heads} x {d} (num_attention_heads/num_key_value_heads x head_dim)"
            )
        norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
        if (norms[0] is None) != (norms[1] is None):
            raise TypeError(f"{where}: {type(attn).__name__} has only one of q_norm/k_norm")
        if norms[0] is not None:
            for norm in norms:
                weight = getattr(norm, "weight", None)
                if not isinstance(weight, Tensor) or weight.numel() % d != 0:
                    raise TypeError(
                        f"{where}: {type(norm).__name__} between the projections and RoPE is not a per-head norm "
                        f"with a weight of a multiple of head_dim={d} entries (weight {getattr(weight, 'shape', None)})"
                    )
        attentions.append(_Attention(attn, norms[0] is not None))
    return base, rotary_emb, attentions, heads, head_dim


def _plain_linear(module) -> bool:
    # _MixedProjection replaces nn.Linear.forward: a subclass with its own forward (quantised, LoRA) would lose it
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _rotary_dim(rotary_emb: nn.Module, head_dim: int) -> int:
    inv_freq = getattr(rotary_emb, "inv_freq", None)
    return 2 * inv_freq.numel() if isinstance(inv_freq, Tensor) else head_dim


def _commutes_with_rotations(norm: nn.Module, head_dim: int) -> str | None:
    """None if ``norm(P y) = P norm(y)`` for every per-head rotation P, else the reason why not."""
    if "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None:
        return "it is not a bias-free RMSNorm"
    blocks = norm.weight.detach().reshape(-1, head_dim)  # (heads or 1, D)
    spread = (blocks.amax(-1) - blocks.amin(-1)).max().item()
    if spread != 0:
        return f"its weight is not uniform within a head (max - min = {spread:.3g})"
    return None


# --------------------------------------------------------------------------------------------- install
def _installed_parts(model: nn.Module) -> bool:
    """Whether anything :func:`install` adds is present in ``model``."""
    for module in model.modules():
        if isinstance(module, CausalRotary) or isinstance(module.__dict__.get("forward"), _OURS) or _hook_of(module):
            return True
    return _load_check_of(model) is not None


def install(
    model: nn.Module, *, mixing: str | None = "givens", per_layer: bool = False, **rotary_options
) -> nn.Module:
    """Install a learned rotation P before the model's own RoPE, in every attention, in place; returns the model.

    Args:
        model: a transformers causal LM (``LlamaForCausalLM``, ``Qwen3ForCausalLM``, ... or its base model) whose
            attention takes ``position_embeddings`` (cos, sin) from the model's ``rotary_emb``. Load its weights
            first.
        mixing: P's family (see :class:`rotary.Rotary`): ``"givens"``, ``"orthogonal"``, or None (only with an
            option that changes the angles). The identity at install: the model computes what it did.
        per_layer: one P per attention instead of one shared by all layers.
        rotary_options: ``learned_freq=True`` (learnable frequencies, starting at the model's own) and
            ``scaling=`` (a ``rope_parameters`` dict replacing the model's). Either makes the Rotary compute the
            model's cos/sin. Base, rotary dim and layout are the model's.

    Raises TypeError for a model it cannot handle (naming what it found), RuntimeError if a rotary is installed
    already, ValueError for bad options; in every case the model is left as it was.
    """
    require_transformers()
    unknown = sorted(set(rotary_options) - {"learned_freq", "scaling"})
    if unknown:
        taken = [n for n in unknown if n in _TAKEN_FROM_MODEL]
        raise TypeError(
            f"unexpected install options {unknown}: rotary.hf takes mixing, per_layer, learned_freq and scaling"
            + (f"; {taken} come from the model's config" if taken else "")
        )
    learned_freq = bool(rotary_options.get("learned_freq", False))
    scaling = rotary_options.get("scaling")
    angles = learned_freq or scaling is not None
    if mixing is None and not angles:
        raise ValueError("nothing to install: mixing=None and no option that changes the angles")
    if per_layer and mixing is None:
        raise ValueError("per_layer=True needs a mixing: it gives each layer its own P")
    base, rotary_emb, attentions, heads, head_dim = _inspect(model)
    config = model.config
    if _installed_parts(base):
        raise RuntimeError(
            f"a rotary is already installed in this model ({recorded(config)}): call rotary.hf.uninstall(model) first"
        )
    if recorded(config) is not None:
        raise RuntimeError(
            f"the config records a rotary install ({recorded(config)}) but the model has none: it was probably loaded "
            f"with from_pretrained, which drops the rotary's parameters; load it with rotary.hf.from_pretrained "
            f"(or delete model.config.rotary to install afresh)"
        )
    homes = [a.module for a in attentions] if per_layer else []
    for parent in [base, *homes]:
        if "rotary" in parent._modules or "rotary" in parent.__dict__:
            raise RuntimeError(f"{type(parent).__name__} already has an attribute named 'rotary'")

    # Build everything first: a bad option fails here, before the model is touched.
    dims, rotary_dim = heads * head_dim, _rotary_dim(rotary_emb, head_dim)
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    plain = dict(base=theta, rotary_dim=rotary_dim)  # the model's geometry: P's planes avoid its RoPE pairs
    device = attentions[0].module.q_proj.weight.device
    angle_rotary = None
    if angles:
        if params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError(
                f"the model has one rope_parameters per layer type ({sorted(params)}): rotary computes one set of "
                f"angles, so learned_freq/scaling cannot replace them"
            )
        angle_scaling = dict(scaling if scaling is not None else params)
        options = dict(rotary_dim=rotary_dim, learned_freq=learned_freq, scaling=angle_scaling)
        if "rope_theta" not in angle_scaling:
            options["base"] = theta
        shared_mixing = None if per_layer else mixing
        angle_rotary = CausalRotary(dims, heads, angles=True, mixing=shared_mixing, **options).to(device)
        if angle_rotary.rotary_dim != rotary_dim:
            raise ValueError(
                f"scaling gives rotary_dim {angle_rotary.rotary_dim}, the model rotates {rotary_dim} channels"
            )
        if scaling is None:
            _check_angles(rotary_emb, angle_rotary, device)
    rotaries = []  # (rotary, [attentions], parent, name)
    if per_layer:
        for a in attentions:
            r = CausalRotary(dims, heads, angles=False, mixing=mixing, **plain).to(device)
            rotaries.append((r, [a], a.module, "rotary"))
    elif angle_rotary is None:
        shared = CausalRotary(dims, heads, angles=False, mixing=mixing, **plain).to(device)
        rotaries.append((shared, attentions, base, "rotary"))
    if angle_rotary is not None:
        rotaries.append((angle_rotary, [] if per_layer else attentions, base, "rotary"))

    try:
        for rotary, owned, parent, name in rotaries:
            setattr(parent, name, rotary)
            rotary.home[:] = [parent, name]
            rotary.base_model[:] = [base]
            if rotary.mixer is None:
                continue
            for a in owned:
                rotary.attentions.append(a.module)
                if a.norms:
                    a.module.q_norm.register_forward_hook(_MixAfterNorm(rotary))
                    a.module.k_norm.register_forward_hook(_MixAfterNorm(rotary))
                else:
                    a.module.q_proj.forward = _MixedProjection(a.module.q_proj, rotary)
                    a.module.k_proj.forward = _MixedProjection(a.module.k_proj, rotary)
        if angle_rotary is not None:
            rotary_emb.forward = _RotaryEmbeddingForward(angle_rotary)
        base.register_load_state_dict_pre_hook(_CheckRotaryTensors())
        record(config, dict(mixing=mixing, per_layer=bool(per_layer), learned_freq=learned_freq, scaling=scaling))
    except BaseException:
        _remove(base)
        forget(config)
        raise
    return model


def _check_angles(rotary_emb: nn.Module, rotary: Rotary, device) -> None:
    """The Rotary must reproduce the model's own cos/sin before its frequencies are learned."""
    positions = torch.arange(32, device=device).unsqueeze(0)  # (1, 32)
    x = torch.zeros(1, dtype=torch.float32, device=device)
    with torch.no_grad():
        cos, sin = rotary_emb(x, positions)
        mine = _RotaryEmbeddingForward(rotary)(x, positions)
    if cos.shape != mine[0].shape:
        raise ValueError(f"the model's rotary_emb gives cos of shape {tuple(cos.shape)}, rotary {tuple(mine[0].shape)}")
    error = max((cos - mine[0]).abs().max().item(), (sin - mine[1]).abs().max().item())
    if not error <= 1e-4:  # float32 angles (transformers) against float64 ones, positions < 32
        raise ValueError(
            f"rotary cannot reproduce this model's RoPE ({type(rotary_emb).__name__}, rope_parameters "
            f"{rotary.options.scaling}): cos/sin differ by {error:.3g}, so learned_freq/scaling cannot replace it"
        )


# --------------------------------------------------------------------------------------------- removal
_OURS = (_MixedProjection, _RotaryEmbeddingForward)


def _hook_of(module: nn.Module):
    """The id of the _MixAfterNorm forward hook on ``module``, or None."""
    for key, hook in module._forward_hooks.items():
        if isinstance(hook, _MixAfterNorm):
            return key
    return None


def _remove_mixing_from(attn: nn.Module) -> None:
    for name in ("q_proj", "k_proj"):
        proj = getattr(attn, name)
        if isinstance(proj.__dict__.get("forward"), _MixedProjection):
            del proj.forward
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name, None)
        key = None if norm is None else _hook_of(norm)
        if key is not None:
            del norm._forward_hooks[key]


def _load_check_of(base: nn.Module):
    """The key of the _CheckRotaryTensors load_state_dict pre-hook on ``base``, or None."""
    for key, hook in base._load_state_dict_pre_hooks.items():
        if isinstance(getattr(hook, "hook", None), _CheckRotaryTensors):  # torch wraps it in a _WrappedHook
            return key
    return None


def _remove(base: nn.Module) -> None:
    """Delete every forward, hook and CausalRotary that install adds under ``base``."""
    key = _load_check_of(base)
    if key is not None:
        del base._load_state_dict_pre_hooks[key]
    homes = [(parent, name) for parent in base.modules() for name, child in parent._modules.items()
             if isinstance(child, CausalRotary)]
    for parent, name in homes:
        delattr(parent, name)
    for module in base.modules():
        if isinstance(module.__dict__.get("forward"), _OURS):
            del module.forward
        key = _hook_of(module)
        if key is not None:
            del module._forward_hooks[key]


def _sync_record(base: nn.Module) -> None:
    """After a fold: no rotary left, no record; an angle rotary left, the record says P is gone."""
    config = base.config
    options = recorded(config)
    rotaries = [m for m in base.modules() if isinstance(m, CausalRotary)]
    if not rotaries:
        _remove(base)
        forget(config)
    elif options is not None and all(r.mixer is None for r in rotaries):
        record(config, dict(options, mixing=None, per_layer=False))


def uninstall(model: nn.Module) -> nn.Module:
    """Remove everything :func:`install` added, in place: transformers' module tree, state_dict keys and config.

    The weights are left as they are (call :func:`rotary.fold` first to keep a learned P).
    """
    base = getattr(model, "base_model", model)
    if not _installed_parts(base) and recorded(getattr(model, "config", None)) is None:
        raise ValueError(f"no rotary is installed in this {type(model).__name__}")
    _remove(base)
    forget(model.config)
    return model
