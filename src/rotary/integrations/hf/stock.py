"""Changed angles written as a stock transformers configuration: the fold of :mod:`rotary.integrations.hf.causal`'s
angles.

An install with ``learned_freq=True`` or ``scaling=`` computes the model's cos/sin with a :class:`rotary.Rotary`
(one per layer type where ``config.rope_parameters`` has one per layer type, Gemma 3). At fold those angles
become the ``rope_parameters`` from which stock transformers computes the same cos/sin, and the model's
``rotary_emb`` is rebuilt from them, so that nothing of the install is needed any more:

- the angles without learned frequencies: the Rotary's scheme itself (``default``, ``linear``, ``dynamic``,
  ``yarn``, ``llama3``, ``longrope``, ``proportional``; transformers' own), with its ``rope_theta``;
- learned frequencies on a static scheme (``default``, ``linear``, ``yarn``, ``llama3``, and rotary's ``ntk``):
  ``longrope`` with equal short and long factors. transformers' longrope computes
  ``inv_freq_i = 1 / (ext_i * base ** (2i / r))``, so ``ext_i = 1 / (w_i * base ** (2i / r))`` for the final
  frequencies ``w_i`` (float64), with the scheme's attention factor written explicitly;
- learned frequencies on ``longrope``: its short and long factors each divided by the learned scale.

Not expressible, refused with ``ValueError`` naming why (the model unchanged): learned frequencies on ``dynamic``
(transformers recomputes dynamic NTK's frequencies from the length alone, with no per-pair factor), pairs of
frequency 0 (p-RoPE: no finite longrope factor), ``dynamic`` with an original length other than the config's
``max_position_embeddings`` (transformers reads that one). Every result is checked before anything changes,
against what ``from_pretrained`` would build from it: the base model's class is built from the new config on the
meta device, its RoPE modules (every module computing cos/sin from position ids: ``rotary_emb``, and any other,
e.g. GraniteSWA's ``rotary_embs``, one per per-layer theta) get their buffers as from_pretrained gives them (the
model's own ``_init_weights``), and each must give, for every layer type it computes, what the installed model's
module at the same path gives (within 1e-4), in the short and the long regime. So angles that the model's
attentions do not take from the installed ``rotary_emb`` are refused, not written.

Per-layer-type configs (Gemma 3): :func:`per_layer_type` reads them (only the types some layer has: transformers
computes no angles for the others, and fold writes those unchanged), and the install keeps one Rotary per type in
a ModuleDict at ``rotary_emb.rotary`` (registered by the install record, which deletes it on removal).

Shapes: r rotary_dim, r/2 the rotated pairs; cos/sin ``(B, T, r)``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ...core.module import Rotary

__all__ = ["ATTENTION_KEYS", "FoldAngles", "other_rope_modules", "per_layer_type", "rebuild", "stock_rope_parameters"]

_TRANSFORMERS_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "proportional")
_TOLERANCE = 1e-4  # transformers forms cos/sin from float32 frequencies, rotary from float64 ones


ATTENTION_KEYS = ("llama_4_scaling_beta",)
"""Keys of ``rope_parameters`` that transformers reads in the attention, not in the angles (Ministral 3 scales
its queries by position with ``llama_4_scaling_beta``): not the Rotary's to learn, kept as they are at fold."""


def stock_rope_parameters(rotary: Rotary, current: dict, max_positions: int, where: str = "") -> dict:
    """The ``rope_parameters`` dict (one layer type's, for per-layer-type configs) from which transformers computes
    ``rotary``'s angles. ``current``: the model's own (its ``partial_rotary_factor`` and :data:`ATTENTION_KEYS` are
    kept); ``max_positions``: ``config.max_position_embeddings``. Raises ValueError, naming why, when no stock dict
    can express them."""
    written = _angle_parameters(rotary, current, max_positions, where)
    written.update({k: current[k] for k in ATTENTION_KEYS if k in current})
    return written


def _angle_parameters(rotary: Rotary, current: dict, max_positions: int, where: str) -> dict:
    angles = rotary.angles
    scaling = angles.scaling
    kind = "default" if scaling is None else scaling.rope_type
    written = {k: v for k, v in (rotary.options.scaling or {}).items() if k not in ("type", "max_position_embeddings")}
    written.update(rope_type=kind, rope_theta=float(angles.base))
    if "partial_rotary_factor" in current and "partial_rotary_factor" not in written:
        written["partial_rotary_factor"] = current["partial_rotary_factor"]
    scale = angles.scale()  # (r/2,) float64, or None
    learned = scale is not None and bool((angles.log_freq_scale != 0).any())
    if kind == "dynamic":
        if learned:
            raise ValueError(
                f"cannot write the angles{where} as a stock config: learned frequencies on dynamic NTK scaling are "
                f"not expressible (transformers recomputes dynamic frequencies from the sequence length alone, "
                f"with no per-pair factor for the learned scale). Nothing was changed; keep the rotary installed "
                f"(rotary.hf.from_pretrained reloads it) or train with a static scheme or longrope"
            )
        if scaling.original_length != max_positions:
            raise ValueError(
                f"cannot write the angles{where} as a stock config: dynamic scaling from an original length of "
                f"{scaling.original_length}, but transformers' dynamic NTK scales from "
                f"config.max_position_embeddings = {max_positions}. Nothing was changed"
            )
        written.pop("original_max_position_embeddings", None)
    if not learned and kind in _TRANSFORMERS_TYPES:
        return written
    if kind == "longrope":  # learned: w_i s_i / short_i = w_i / (short_i / s_i), likewise long
        ratio = scale.tolist()
        written["short_factor"] = [f / s for f, s in zip(scaling.short_factor, ratio)]
        written["long_factor"] = [f / s for f, s in zip(scaling.long_factor, ratio)]
        written["original_max_position_embeddings"] = scaling.original_length
        written["attention_factor"] = float(angles.attention_factor)
        return written
    # a static scheme (the frequencies do not depend on the length): longrope factors of the final frequencies
    freqs = angles.frequencies().detach().to("cpu", torch.float64)  # (r/2,)
    if not bool(torch.isfinite(freqs).all() and (freqs > 0).all()):
        zero = torch.nonzero(~(freqs > 0)).flatten().tolist()
        raise ValueError(
            f"cannot write the angles{where} as a stock config: pairs {zero} have frequency {freqs[zero].tolist()} "
            f"({kind!r}), which no longrope factor (1 / (w_i base^(2i/r))) expresses. Nothing was changed"
        )
    r = angles.rotary_dim
    exponent = torch.arange(0, r, 2, dtype=torch.float64) / r
    ext = (1.0 / (freqs * float(angles.base) ** exponent)).tolist()
    out = {"rope_type": "longrope", "rope_theta": float(angles.base), "short_factor": ext, "long_factor": list(ext),
           "original_max_position_embeddings": max_positions, "factor": 1.0,
           "attention_factor": float(angles.attention_factor)}
    if "partial_rotary_factor" in written:
        out["partial_rotary_factor"] = written["partial_rotary_factor"]
    return out


def per_layer_type(params: dict, layer_types: Iterable[str] | None = None) -> dict[str, dict] | None:
    """Per-layer-type rope_parameters (Gemma 3: ``{"sliding_attention": {...}, "full_attention": {...}}``) as
    ``{layer type: its dict}`` without the types that have none (no RoPE), or None for one dict for all layers.

    ``layer_types``: the types the model's layers have (``config.layer_types``); types no layer has are left out
    too, since transformers computes no angles for them (a 2-layer Gemma 3 has only sliding-window layers, and its
    ``rotary_emb`` raises ``KeyError`` for ``"full_attention"``). None: every type."""
    if params and all(isinstance(v, dict) or v is None for v in params.values()):
        used = None if layer_types is None else set(layer_types)
        types = {k: dict(v) for k, v in params.items() if v is not None and (used is None or k in used)}
        return types or None
    return None


def _new_rotary_emb(rotary_emb: nn.Module, config) -> nn.Module:
    """A fresh module of ``rotary_emb``'s class built from ``config``, on ``rotary_emb``'s device."""
    cls = type(rotary_emb)
    fresh = cls(config)  # every transformers RotaryEmbedding takes the config first; some also a device
    device = next((b.device for b in rotary_emb.buffers()), None)
    return fresh if device is None else fresh.to(device)


def rebuild(rotary_emb: nn.Module, config) -> None:
    """Re-initialise ``rotary_emb`` in place from ``config`` (its rope_parameters now the stock ones): the buffers
    and attributes a fresh module of its class has (``inv_freq``, ``original_inv_freq``, ``attention_scaling``,
    ``rope_type``, per layer type for Gemma 3), set on the existing module, so that its identity, hooks and place
    in the tree (accelerate's device hooks, ...) stay."""
    fresh = _new_rotary_emb(rotary_emb, config)
    for name in [n for n in rotary_emb._buffers if n not in fresh._buffers]:
        delattr(rotary_emb, name)
    for name, buffer in fresh._buffers.items():
        rotary_emb.register_buffer(name, buffer, persistent=name not in fresh._non_persistent_buffers_set)
    for name, value in vars(fresh).items():
        if not name.startswith("_") and name != "training":
            setattr(rotary_emb, name, value)
    for name in [n for n in vars(rotary_emb) if n.endswith("long_inv_freq") and n not in vars(fresh)]:
        delattr(rotary_emb, name)  # longrope's lazily cached long frequencies: of the old parameters


def _check(rotary_emb: nn.Module, config, forward: Callable, layer_types: list) -> None:
    """A rotary_emb built from ``config`` must give what ``forward`` (the installed one) gives, for each layer type
    (None: the model has one), at positions 0..31 and, for length-dependent schemes, at a length beyond the
    original one (the long regime); raises ValueError naming the difference."""
    fresh = _new_rotary_emb(rotary_emb, config)
    device = next((b.device for b in fresh.buffers()), torch.device("cpu"))
    x = torch.zeros(1, dtype=torch.float32, device=device)
    short = torch.arange(32, device=device).unsqueeze(0)  # (1, 32)
    long = torch.cat((short, torch.tensor([[2 * config.max_position_embeddings + 1]], device=device)), dim=1)
    for layer_type in layer_types:
        args = () if layer_type is None else (layer_type,)
        for positions in (short, long):
            try:
                with torch.no_grad():
                    theirs = fresh(x, positions, *args)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:  # PhiMoE's longrope wants its own keys
                raise ValueError(
                    f"cannot write the angles{_where(layer_type)} as a stock config: transformers' "
                    f"{type(fresh).__name__} cannot compute cos/sin from rope_parameters {config.rope_parameters} "
                    f"({type(e).__name__}: {e}). Nothing was changed"
                ) from None
            with torch.no_grad():
                mine = forward(x, positions, *args)
            error = _difference(theirs, mine, short.shape[1])
            if not error <= _TOLERANCE:
                params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
                raise ValueError(
                    f"cannot write the angles{_where(layer_type)} as a stock config: transformers' "
                    f"{type(fresh).__name__} computes cos/sin {error:.3g} away from the trained ones from "
                    f"rope_parameters {params} (at positions up to {int(positions.max())}). Nothing was changed"
                )


def other_rope_modules(base: nn.Module, rotary_emb: nn.Module) -> list[str]:
    """The paths of the RoPE modules in ``base`` besides ``rotary_emb`` (GraniteSWA: ``rotary_embs.0``, one per
    distinct per-layer theta, while its ``rotary_emb`` goes unused). Where there are any, the attentions may take
    their angles from them, which an install that replaces ``rotary_emb``'s angles does not change."""
    return [n for n, m in base.named_modules() if n and m is not rotary_emb and _is_rope_module(m)]


def _is_rope_module(module: nn.Module) -> bool:
    """A module computing RoPE's cos/sin from position ids: a transformers ``...RotaryEmbedding`` (the name
    transformers' own ``_init_weights`` goes by) or a module with an ``inv_freq`` buffer, whose forward takes
    ``position_ids``."""
    named = "RotaryEmbedding" in type(module).__name__ or any(n.endswith("inv_freq") for n in module._buffers)
    return named and "position_ids" in _parameters(module)


def _parameters(module: nn.Module) -> dict:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _fresh_rope_modules(base: nn.Module, config) -> dict[str, nn.Module]:
    """The RoPE modules of what ``from_pretrained`` builds from ``config``, by path in the base model.

    As transformers' from_pretrained does (``get_init_context``, ``_move_missing_keys_from_meta_to_device``,
    ``initialize_weights``): the base model's class is built on the meta device, then each RoPE module's buffers
    are placed on the CPU and set by the model's own ``_init_weights`` (that of the nearest PreTrainedModel
    around it). A buffer ``_init_weights`` does not set is NaN here (from_pretrained leaves it uninitialised), so
    that it cannot pass the comparison."""
    try:
        config = copy.deepcopy(config)
        if isinstance(getattr(config, "dtype", None), str):  # save_pretrained leaves "float32"; from_pretrained
            config.dtype = getattr(torch, config.dtype)  # hands modules a torch.dtype (Apertus's xIELU needs one)
        with torch.device("meta"):
            fresh = type(base)(config)
        found, owners = {}, {"": fresh}
        for name, module in fresh.named_modules():
            if name and callable(getattr(module, "_init_weights", None)):
                owners[name] = module  # a sub-model initialises what it holds (transformers' smart_apply)
            if not name or not _is_rope_module(module):
                continue
            owner = owners[max((p for p in owners if not p or name.startswith(p + ".")), key=len)]
            with torch.no_grad():
                for sub in module.modules():
                    for key, buffer in sub._buffers.items():
                        if buffer is not None:
                            empty = torch.empty_like(buffer, device="cpu")
                            nan = empty.is_floating_point()
                            sub._buffers[key] = empty.fill_(float("nan")) if nan else empty.zero_()
                    if callable(getattr(owner, "_init_weights", None)):
                        owner._init_weights(sub)
            found[name] = module
    except Exception as error:  # no faithful check without the model transformers would build
        raise ValueError(
            f"cannot write the angles as a stock config: {type(base).__name__} could not be built from it as "
            f"from_pretrained builds it ({type(error).__name__}: {error}), so they cannot be checked. Nothing was "
            f"changed"
        ) from error
    return found


def _layer_types(module: nn.Module, config) -> list:
    """The layer types a RoPE module computes angles for ([None]: its forward takes none)."""
    if "layer_type" not in _parameters(module):
        return [None]
    types = sorted(set(getattr(config, "layer_types", None) or []))
    per_type = per_layer_type(dict(getattr(config, "rope_parameters", None) or {}))
    if per_type is not None:
        types = [t for t in types if t in per_type]
    return types or [None]


def _cos_sin(module: nn.Module, positions: Tensor, device, args: tuple) -> tuple[Tensor, Tensor] | Exception:
    """``module``'s cos/sin (float32, CPU) at ``positions``, or the exception it raised; the module's state is
    what it was before (transformers' dynamic NTK and longrope keep the frequencies of the last length seen)."""
    buffers = {k: (v, None if v is None else v.clone()) for k, v in module._buffers.items()}
    attributes = dict(vars(module))
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, device=device), positions.to(device), *args)
        # Llama 4, DeepSeek V2: freqs_cis = cos + i sin
        cos, sin = (out.real, out.imag) if isinstance(out, Tensor) and out.is_complex() else out
        return cos.to("cpu", torch.float32), sin.to("cpu", torch.float32)
    except (KeyError, AttributeError, TypeError, ValueError, RuntimeError) as error:
        return error
    finally:
        with torch.no_grad():
            for buffer, value in buffers.values():
                if buffer is not None:
                    buffer.copy_(value)
        for name in [n for n in vars(module) if n not in attributes]:
            delattr(module, name)
        vars(module).update(attributes)
        module._buffers.clear()
        module._buffers.update({k: b for k, (b, _) in buffers.items()})


def _check_fresh(base: nn.Module, rotary_emb: nn.Module, config) -> None:
    """Every RoPE module of a model built from ``config`` (as from_pretrained builds it) must give, for each layer
    type it computes, the cos/sin that the installed model's module at the same path gives, at positions 0..31,
    also within a batch whose largest position is beyond the original length (the long regime of
    length-dependent schemes); raises ValueError naming the module, the layer type and the difference."""
    fresh = _fresh_rope_modules(base, config)
    if not fresh:
        raise ValueError(
            f"cannot write the angles as a stock config: a {type(base).__name__} built from it has no RoPE module "
            f"(one computing cos/sin from position_ids) to check them against. Nothing was changed"
        )
    mine_by_path = dict(base.named_modules())
    learned = next((n for n, m in mine_by_path.items() if m is rotary_emb), "rotary_emb")
    short = torch.arange(32).unsqueeze(0)  # (1, 32)
    long = torch.cat((short, torch.tensor([[2 * config.max_position_embeddings + 1]])), dim=1)  # (1, 33)
    for path, theirs_module in fresh.items():
        mine_module = mine_by_path.get(path)
        what = f"{type(base).__name__}.{path} ({type(theirs_module).__name__})"
        if mine_module is None:
            raise ValueError(
                f"cannot write the angles as a stock config: a model built from it computes angles at {what}, "
                f"which this model lacks. Nothing was changed"
            )
        device = next(mine_module.buffers(), next(base.parameters(), torch.zeros(1))).device
        for layer_type in _layer_types(theirs_module, config):
            args = () if layer_type is None else (layer_type,)
            for positions in (short, long):
                theirs = _cos_sin(theirs_module, positions, "cpu", args)
                mine = _cos_sin(mine_module, positions, device, args)
                failed = next((r for r in (theirs, mine) if isinstance(r, Exception)), None)
                error = float("inf") if failed is not None else _difference(theirs, mine, short.shape[1])
                if error <= _TOLERANCE:
                    continue
                params = getattr(getattr(theirs_module, "config", None), "rope_parameters", config.rope_parameters)
                why = "" if mine_module is rotary_emb else (
                    f"; this model's attentions take their angles from {path}, which the install does not change "
                    f"(it computes the learned angles at {learned}), so writing them would change the model")
                if failed is None:
                    found = f"computes cos/sin {error:.3g} away from this model's"
                else:
                    side = "the one from_pretrained builds" if failed is theirs else "this model's"
                    found = f"fails to compute cos/sin in {side} ({type(failed).__name__}: {failed})"
                raise ValueError(
                    f"cannot write the angles{_where(layer_type)} as a stock config: from rope_parameters {params}, "
                    f"{what} {found} at positions up to {int(positions.max())}{why}. Nothing was changed"
                )


def _difference(theirs: tuple[Tensor, Tensor], mine: tuple[Tensor, Tensor], count: int) -> float:
    if theirs[0].shape != mine[0].shape:
        return float("inf")
    # only the first positions: at the probe beyond the original length, float32 angles differ by ulps of ~1e4 rad
    return max((a[..., :count, :] - b[..., :count, :]).abs().max().item() for a, b in zip(theirs, mine))


def _where(layer_type) -> str:
    return "" if layer_type is None else f" of layer type {layer_type!r}"


class FoldAngles:
    """The install record's ``fold_angles`` hook for a causal LM whose angles the Rotaries of ``sources`` compute
    (key None: one set of angles; else one Rotary per layer type, for per-layer-type ``rope_parameters``).

    Calling it computes and checks the stock ``rope_parameters`` (raising ValueError, naming why, if they cannot
    express the angles), changing nothing; it returns the action that writes them into ``config`` and rebuilds
    ``rotary_emb`` from it. ``forward``: the installed ``rotary_emb.forward`` (the Rotaries' cos/sin); ``base``:
    the base model holding ``rotary_emb`` (``model.model``), whose class is built from the new config to check the
    angles against what from_pretrained computes (None: only ``rotary_emb``'s class is, which misses RoPE modules
    other than ``rotary_emb``). An object, not a closure, so that ``copy.deepcopy`` of the model points it at the
    copy's modules."""

    def __init__(self, config, rotary_emb: nn.Module, forward: Callable,
                 sources: dict[str | None, Callable[[], Rotary]], base: nn.Module | None = None):
        self.config, self.rotary_emb, self.forward, self.sources = config, rotary_emb, forward, sources
        self.base = base

    def __call__(self) -> Callable[[], None]:
        config, sources = self.config, self.sources
        current = copy.deepcopy(dict(getattr(config, "rope_parameters", None) or {}))
        max_positions = config.max_position_embeddings
        if None in sources:
            new = stock_rope_parameters(sources[None](), current, max_positions)
        else:
            new = dict(current)  # layer types without a Rotary (None: no RoPE) keep theirs
            for layer_type, source in sources.items():
                new[layer_type] = stock_rope_parameters(source(), current.get(layer_type) or {}, max_positions,
                                                        _where(layer_type))
        trial = copy.deepcopy(config)
        _write(trial, new)
        _check(self.rotary_emb, trial, self.forward, list(sources))  # the rebuild of rotary_emb below
        if self.base is not None:
            _check_fresh(self.base, self.rotary_emb, trial)  # what from_pretrained builds from it

        def action() -> None:
            _write(config, new)
            rebuild(self.rotary_emb, config)

        return action


def _write(config, params: dict) -> None:
    config.rope_parameters = copy.deepcopy(params)
    originals = {p.get("original_max_position_embeddings") for p in _dicts(params)} - {None}
    if hasattr(config, "original_max_position_embeddings") and len(originals) == 1:
        # Phi-3 keeps the original length outside rope_parameters, and transformers prefers that one
        config.original_max_position_embeddings = originals.pop()


def _dicts(params: dict) -> list[dict]:
    types = per_layer_type(params)
    return [params] if types is None else list(types.values())
