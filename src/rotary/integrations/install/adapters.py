"""What an install must know of adapter wrappers (PEFT's LoRA, DoRA, OFT, ... and its ``modules_to_save``).

Nothing here imports peft: the wrappers are recognised by the public attributes PEFT documents
(``get_base_layer()``, ``lora_A``/``lora_B``, ``merged_adapters``, ``original_module``/``modules_to_save``,
``active_adapters``, ``disable_adapters``), so that the install mechanism stays independent of the adapter library.

Two kinds of wrapper matter:

- a wrapped projection (``BaseTunerLayer``): its output is ``base(x) + delta(x)``. P must act on that whole output,
  so it is applied on the wrapper's output (:class:`rotary.integrations.install.mix.MixedOutput`), whatever the
  adapter. Folding P into weights is exact for a plain LoRA (``P (W + s B A) = (P W) + s (P B) A``: P into the base
  weight and into every ``lora_B``) and refused for other adapters (DoRA's magnitude normalises each output row of
  ``W + delta``, which P mixes): merge them first (``merge_and_unload()``), then fold.
- a wrapped Rotary (``ModulesToSaveWrapper``): PEFT trains and saves a copy per adapter; the P in use is the
  active adapter's copy, or the original while adapters are disabled (:func:`active`).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["active", "describe", "fold_linears", "is_adapter_layer", "is_training_wrapper"]


def is_adapter_layer(module) -> bool:
    """A projection wrapped by an adapter (PEFT's ``BaseTunerLayer``: LoRA, DoRA, OFT, ...)."""
    return isinstance(module, nn.Module) and callable(getattr(type(module), "get_base_layer", None))


def is_training_wrapper(module) -> bool:
    """A module PEFT trains and saves as a copy per adapter (``ModulesToSaveWrapper``)."""
    return isinstance(module, nn.Module) and "modules_to_save" in module._modules and "original_module" in (
        module._modules)


def active(module: nn.Module) -> nn.Module:
    """The module in use: for a training wrapper, the active adapter's copy (the original while adapters are
    disabled, or none is active); any other module itself."""
    if not is_training_wrapper(module):
        return module
    adapters = module.active_adapters
    copies = module._modules["modules_to_save"]
    if module.disable_adapters or not adapters or adapters[0] not in copies:
        return module._modules["original_module"]
    return copies[adapters[0]]


def describe(module) -> str:
    """A short name for messages: the class, and the adapter of a wrapped projection."""
    if is_adapter_layer(module):
        kind = type(module)
        return f"{kind.__module__}.{kind.__qualname__} (an adapter around {type(module.get_base_layer()).__name__})"
    return type(module).__name__


def _plain(linear) -> bool:
    """An nn.Linear (or a subclass computing with its weight, as openai-whisper's) whose weight is a floating-point
    tensor: a quantised layer's packed integer weight cannot absorb P."""
    weight = getattr(linear, "weight", None)
    return (isinstance(linear, nn.Linear) and not is_adapter_layer(linear) and isinstance(weight, Tensor)
            and type(weight) in (Tensor, nn.Parameter) and weight.is_floating_point())


def fold_linears(module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers whose output rows P folds into, so that P times ``module``'s output is exactly what
    the module computes afterwards; raises ValueError, naming why, where no fold is exact."""
    if _plain(module):
        return [module]
    if not is_adapter_layer(module):
        raise ValueError(f"{describe(module)} is not an nn.Linear (a quantised or custom projection?): its weights "
                         f"cannot absorb P")
    base = module.get_base_layer()
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    variants = {k: v for k, v in dict(getattr(module, "lora_variant", None) or {}).items() if v is not None}
    dora = any(dict(getattr(module, "use_dora", None) or {}).values())
    if not isinstance(lora_b, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict) or dora or variants:
        kind = "DoRA" if dora else (f"a LoRA variant ({sorted(variants)})" if variants else describe(module))
        raise ValueError(
            f"P folds exactly into an unmerged plain LoRA only, not {kind}: merge the adapter first "
            f"(peft_model.merge_and_unload()), then fold"
        )
    if len(lora_b) != 1:
        raise ValueError(f"the projection carries {len(lora_b)} LoRA adapters ({sorted(lora_b)}): P belongs to one; "
                         f"merge_and_unload() the one to ship (or delete the others), then fold")
    linears = [base, *lora_b.values()]
    if not all(_plain(linear) for linear in linears):
        raise ValueError(f"{describe(module)}: its base layer or lora_B is not a floating-point nn.Linear "
                         f"({[type(linear).__name__ for linear in linears]}): merge the adapter first, then fold")
    return linears
