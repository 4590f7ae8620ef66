"""A learned rotation P in a PEFT model (LoRA, DoRA, OFT, ...): P on the adapted projections, trained and saved
with the adapter.

    model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"]))
    rotary.hf.install(model)                 # P = I: the same outputs; P now trains with the adapter
    ...train...
    model.save_pretrained(folder)            # the adapter's tensors and P's
    merged = model.merge_and_unload()        # then (or before) rotary.fold(merged): a stock model

Either order works: :func:`install` on the PEFT model installs into the transformers model inside it, or takes
over an install made before ``get_peft_model`` (the model then forgets nothing: its P stays as trained).

- where P acts: on the whole output of each adapted q/k projection (``P (W x + delta(x))``), through a forward
  hook on PEFT's layer (:mod:`rotary.integrations.install`); a projection PEFT left alone keeps P on its weights.
  The install follows PEFT's later changes to the module tree before every forward and before a fold
  (:meth:`Install.sync`): after ``merge_and_unload()`` P is on the merged weights, exactly as before.
- training and saving: every Rotary of the install is added to each adapter's ``modules_to_save``, PEFT's own
  way to train and save a module with an adapter. PEFT then trains a copy per adapter (the installed Rotary
  stays as it was, and is the one in use while adapters are disabled); ``print_trainable_parameters`` counts P,
  ``save_pretrained`` writes it into the adapter file, ``PeftModel.from_pretrained`` restores it.
- reloading: ``rotary.hf.install(base, **the same options)`` on the base model, then
  ``PeftModel.from_pretrained(base, folder)``. An adapter whose rotary tensors do not fit the install (another
  mixing, learned frequencies, one P per layer) is refused, naming the tensors expected and found. The adapter
  does not record options that change no tensor (a ``scaling=``): install with the options it was trained with.
- folding (:func:`rotary.fold`): exact after ``merge_and_unload()``; before it, exact for a plain LoRA (P into the
  base weight and into ``lora_B``), refused for DoRA and other variants, naming why.
- adapters: LoRA and its variants (DoRA, rsLoRA, ...). Others (OFT, IA3, ...) are refused: their tuner's
  ``merge_and_unload`` fails on a ``modules_to_save`` module that has no weight, as a Rotary has none.

peft is an optional extra: ``pip install 'rotary[peft]'``.
"""

from __future__ import annotations

from torch import nn

from ..install import Install, find, is_adapter_layer

__all__ = ["SUPPORTED", "install", "is_peft_model"]

SUPPORTED = ("LORA",)  # PEFT types whose tuner unloads a ``modules_to_save`` module without weights


def is_peft_model(model) -> bool:
    """A ``peft.PeftModel`` (or a subclass: ``PeftModelForCausalLM``, ...), recognised without importing peft."""
    return (isinstance(model, nn.Module) and isinstance(getattr(model, "peft_config", None), dict)
            and callable(getattr(model, "get_base_model", None)))


def _require_peft():
    try:
        from peft.utils.other import set_additional_trainable_modules
    except ImportError as error:
        raise ImportError(
            "rotary.hf.install on a PEFT model needs peft >= 0.18, an optional extra: pip install 'rotary[peft]'"
        ) from error
    return set_additional_trainable_modules


def install(peft_model: nn.Module, **options) -> nn.Module:
    """Install a rotary into a PEFT model (or take over the one installed before ``get_peft_model``); returns it.

    ``options`` are those of :func:`rotary.hf.causal.install`, for a model without an install yet; a model
    installed before PEFT wrapped it takes none (its install's options stand). Raises TypeError for a model the
    causal-LM install refuses, RuntimeError for other misuse; in every case the model is left as it was.
    """
    from . import causal

    set_additional_trainable_modules = _require_peft()
    kinds = {name: str(getattr(c.peft_type, "value", c.peft_type)) for name, c in peft_model.peft_config.items()}
    other = {name: kind for name, kind in kinds.items() if kind not in SUPPORTED}
    if other:
        raise TypeError(
            f"rotary trains with LoRA adapters (LoRA, DoRA, rsLoRA, ...: peft_type in {SUPPORTED}), found {other}: "
            f"PEFT can train and save P with these, but their merge_and_unload cannot unload a module without "
            f"weights (BaseTuner._replace_module), so the merged model could not keep P"
        )
    inner = peft_model.get_base_model()
    if getattr(getattr(inner, "config", None), "model_type", None) == "whisper":
        raise TypeError("rotary.hf.install on a PEFT model handles causal LMs; install into Whisper before PEFT is "
                        "not supported")
    record = find(inner)
    installed_here = record is None
    if installed_here:
        causal.install(inner, **options)
        record = find(inner, (causal.HOST,))
    elif options:
        raise TypeError(
            f"this model's base already has a rotary installed ({record.options.to_dict()}): call "
            f"rotary.hf.install(peft_model) without options to train it with the adapter (got {sorted(options)})"
        )
    elif record.host != causal.HOST:
        raise TypeError(f"the rotary installed in this model is a {record.host!r} install, not a causal-LM one")
    elif _trained_with_peft(record):
        raise RuntimeError("the rotary of this PEFT model is already trained with its adapters: nothing to do")
    try:
        _train_with_adapters(peft_model, record, set_additional_trainable_modules)
        record.sync()  # P onto the adapted projections now (rather than at the next forward)
    except BaseException:
        if installed_here:
            causal.uninstall(inner)
        raise
    return peft_model


def _trained_with_peft(record: Install) -> bool:
    from ..install import is_training_wrapper

    return any(is_training_wrapper(p.parent._modules.get(p.name)) for p in record.rotaries)


def _train_with_adapters(peft_model: nn.Module, record: Install, set_additional_trainable_modules) -> None:
    """Add the install's Rotaries to every adapter's ``modules_to_save``, and let PEFT wrap them (checked first:
    the names must reach the Rotaries and nothing else)."""
    inner = peft_model.get_base_model()
    names = sorted({p.name for p in record.rotaries})  # "rotary": PEFT matches module paths ending in it
    ours = {id(p.parent._modules[p.name]) for p in record.rotaries}
    others = [n for n, m in inner.named_modules() if any(n.endswith(x) for x in names) and id(m) not in ours
              and not is_adapter_layer(m)]
    if others:
        raise RuntimeError(f"PEFT's modules_to_save={names} would also reach {others} of the model: rotary cannot "
                           f"hand its Rotaries to PEFT under that name")
    active = set(getattr(peft_model, "active_adapters", ()) or ())
    for adapter, config in peft_model.peft_config.items():
        saved = list(getattr(config, "modules_to_save", None) or [])
        config.modules_to_save = saved + [n for n in names if n not in saved]
        set_additional_trainable_modules(model=peft_model.base_model, peft_config=config,
                                         model_config=inner.config.to_dict(), adapter_name=adapter,
                                         activate_adapter=adapter in active)
