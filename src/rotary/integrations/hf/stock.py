"""Changed angles written as a stock transformers configuration: the fold of :mod:`rotary.hf.causal`'s angles.

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
``max_position_embeddings`` (transformers reads that one). Every result is checked before anything changes: a
``rotary_emb`` built from it must give the Rotary's cos/sin (within 1e-4), in the short and the long regime.

Per-layer-type configs (Gemma 3): :func:`per_layer_type` reads them, and the install keeps one Rotary per type in
a ModuleDict at ``rotary_emb.rotary`` (registered by the install record, which deletes it on removal).

Shapes: r rotary_dim, r/2 the rotated pairs; cos/sin ``(B, T, r)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ...core.module import Rotary

__all__ = ["FoldAngles", "per_layer_type", "rebuild", "stock_rope_parameters"]

_TRANSFORMERS_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "proportional")
_TOLERANCE = 1e-4  # transformers forms cos/sin from float32 frequencies, rotary from float64 ones


def stock_rope_parameters(rotary: Rotary, current: dict, max_positions: int, where: str = "") -> dict:
    """The ``rope_parameters`` dict (one layer type's, for per-layer-type configs) from which transformers computes
    ``rotary``'s angles. ``current``: the model's own (its ``partial_rotary_factor`` is kept); ``max_positions``:
    ``config.max_position_embeddings``. Raises ValueError, naming why, when no stock dict can express them."""
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


def per_layer_type(params: dict) -> dict[str, dict] | None:
    """Per-layer-type rope_parameters (Gemma 3: ``{"sliding_attention": {...}, "full_attention": {...}}``) as
    ``{layer type: its dict}`` without the types that have none (no RoPE), or None for one dict for all layers."""
    if params and all(isinstance(v, dict) or v is None for v in params.values()):
        types = {k: dict(v) for k, v in params.items() if v is not None}
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
            with torch.no_grad():
                theirs = fresh(x, positions, *args)
                mine = forward(x, positions, *args)
            error = _difference(theirs, mine, short.shape[1])
            if not error <= _TOLERANCE:
                params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
                raise ValueError(
                    f"cannot write the angles{_where(layer_type)} as a stock config: transformers' "
                    f"{type(fresh).__name__} computes cos/sin {error:.3g} away from the trained ones from "
                    f"rope_parameters {params} (at positions up to {int(positions.max())}). Nothing was changed"
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
    ``rotary_emb`` from it. ``forward``: the installed ``rotary_emb.forward`` (the Rotaries' cos/sin). An object,
    not a closure, so that ``copy.deepcopy`` of the model points it at the copy's modules."""

    def __init__(self, config, rotary_emb: nn.Module, forward: Callable,
                 sources: dict[str | None, Callable[[], Rotary]]):
        self.config, self.rotary_emb, self.forward, self.sources = config, rotary_emb, forward, sources

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
        _check(self.rotary_emb, trial, self.forward, list(sources))

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
