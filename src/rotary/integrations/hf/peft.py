"""A learned rotation P in a PEFT model (LoRA, DoRA, OFT, ...) of a causal LM or a Whisper: P on the adapted
projections, trained and saved with the adapter.

    model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"]))
    rotary.hf.install(model)                 # P = I: the same outputs; P now trains with the adapter
    ...train...
    model.save_pretrained(folder)            # the adapter's tensors and P's
    merged = model.merge_and_unload()        # then (or before) rotary.fold(merged): a stock model

Either order works: :func:`install` on the PEFT model installs into the transformers model inside it, or takes
over an install made before ``get_peft_model`` (the model then forgets nothing: its P stays as trained).

- where P acts: on the whole output of each adapted q/k projection (``P (W x + delta(x))``), through a forward
  hook on PEFT's layer (:mod:`rotary.integrations.install`); a projection PEFT left alone keeps P on its weights.
  In Whisper (:mod:`rotary.hf.whisper`) the Rotary applies P itself to the q and k it rotates (``R(m) P q``), the
  adapted projections' outputs: the same function, with no hook.
  The install follows PEFT's later changes to the module tree before every forward and before a fold
  (:meth:`Install.sync`): after ``merge_and_unload()`` P is on the merged weights, exactly as before.
- training and saving: every Rotary of the install is added to each adapter's ``modules_to_save``, PEFT's own
  way to train and save a module with an adapter. PEFT then trains a copy per adapter (the installed Rotary
  stays as it was, and is the one in use while adapters are disabled); ``print_trainable_parameters`` counts P,
  ``save_pretrained`` writes it into the adapter file, ``PeftModel.from_pretrained`` restores it.
- reloading: ``rotary.hf.install(base, adapter=folder)`` on the base model, then
  ``PeftModel.from_pretrained(base, folder)``. The PEFT model's ``save_pretrained`` also writes the install's
  options (:data:`OPTIONS_FILE`, next to ``adapter_config.json``); ``install(base, adapter=folder)`` installs
  them and checks that the adapter file holds exactly the rotary tensors that install has (else it refuses,
  naming expected and found, and the base model is left as it was).
- folding (:func:`rotary.fold`): exact after ``merge_and_unload()``; before it, exact for a plain LoRA (P into the
  base weight and into ``lora_B``), refused for DoRA and other variants, naming why.
- adapters: LoRA and its variants (DoRA, rsLoRA, ...). Others (OFT, IA3, ...) are refused: their tuner's
  ``merge_and_unload`` fails on a ``modules_to_save`` module that has no weight, as a Rotary has none.

peft is an optional extra: ``pip install 'rotary[peft]'``.
"""

from __future__ import annotations

import json
import os

from torch import nn

from ..install import Install, InstallOptions, find, is_adapter_layer, is_training_wrapper
from . import causal, whisper

__all__ = ["OPTIONS_FILE", "SUPPORTED", "install", "install_for_adapter", "is_peft_model"]

OPTIONS_FILE = "rotary.json"  # beside adapter_config.json: the install the adapter's rotary tensors belong to

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


def _host(model: nn.Module):
    """The integration for the transformers model inside a PEFT model: rotary.hf.whisper or rotary.hf.causal."""
    return whisper if getattr(getattr(model, "config", None), "model_type", None) == "whisper" else causal


def install(peft_model: nn.Module, **options) -> nn.Module:
    """Install a rotary into a PEFT model (or take over the one installed before ``get_peft_model``); returns it.

    ``options`` are those of :func:`rotary.hf.causal.install` (a Whisper: :func:`rotary.hf.whisper.install`), for
    a model without an install yet; a model installed before PEFT wrapped it takes none (its install's options
    stand). Raises TypeError for an adapter or a model it cannot handle, what that install raises for bad options,
    RuntimeError for other misuse; in every case the model is left as it was.
    """
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
    host = _host(inner)
    record = find(inner)
    installed_here = record is None
    if installed_here:
        host.install(inner, **options)
        record = find(inner, (host.HOST,))
    elif options:
        raise TypeError(
            f"this model's base already has a rotary installed ({record.options.to_dict()}): call "
            f"rotary.hf.install(peft_model) without options to train it with the adapter (got {sorted(options)})"
        )
    elif record.host != host.HOST:
        raise TypeError(f"the rotary installed in this model is a {record.host!r} install, not a {host.HOST!r} one")
    elif _trained_with_peft(record):
        raise RuntimeError("the rotary of this PEFT model is already trained with its adapters: nothing to do")
    try:
        _train_with_adapters(peft_model, record, set_additional_trainable_modules)
        record.set_attribute(peft_model, "save_pretrained", _SaveWithOptions(peft_model.save_pretrained, record))
        record.sync()  # P onto the adapted projections now (rather than at the next forward)
    except BaseException:
        if installed_here:
            host.uninstall(inner)
        raise
    return peft_model


def _trained_with_peft(record: Install) -> bool:
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


class _SaveWithOptions:
    """The PEFT model's ``save_pretrained``, then the install's options written beside each adapter it saved."""

    def __init__(self, save_pretrained, record: Install):
        self.save_pretrained, self.record = save_pretrained, record

    def __call__(self, save_directory, *args, **kwargs):
        out = self.save_pretrained(save_directory, *args, **kwargs)
        for folder, _, files in os.walk(save_directory):  # the default adapter's, and one folder per other adapter
            if "adapter_config.json" in files:
                with open(os.path.join(folder, OPTIONS_FILE), "w") as f:
                    json.dump(self.record.options.to_dict(), f, indent=2, sort_keys=True)
        return out


def _adapter_rotary_keys(folder: str) -> list[str]:
    """The rotary tensors in a saved adapter, named as in the base model (PEFT's ``base_model.model.`` removed)."""
    path = os.path.join(folder, "adapter_model.safetensors")
    if os.path.exists(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
    else:
        import torch

        keys = list(torch.load(os.path.join(folder, "adapter_model.bin"), map_location="cpu", weights_only=True))
    # a tensor of what an install registers (a path through a module named "rotary"), never transformers' rotary_emb
    return sorted(k.removeprefix("base_model.model.") for k in keys if "rotary" in k.split("."))


def install_for_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Install into the base ``model`` the rotary that the adapter saved in ``folder`` was trained with (its
    :data:`OPTIONS_FILE`), so that ``PeftModel.from_pretrained(model, folder)`` restores P; returns the model.

    Refuses, naming expected and found, an adapter without the options file, one whose rotary tensors are not the
    ones that install has, and a model that already has another install; the model is then left as it was.
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, OPTIONS_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{folder}: no {OPTIONS_FILE}, so not an adapter saved from a PEFT model with a rotary "
                         f"installed (rotary.hf.install(peft_model) before training writes it at save_pretrained)")
    with open(path) as f:
        options = InstallOptions.from_dict(json.load(f))
    host = _host(model)
    record = find(model)
    installed_here = record is None
    if installed_here:
        host.install(model, options=options)
        record = find(model)
    elif record.options.to_dict() != options.to_dict():
        raise ValueError(f"{folder}: the adapter was trained with the rotary install {options.to_dict()}, but this "
                         f"model has {record.options.to_dict()} installed; call rotary.hf.uninstall(model) first")
    home = next(n for n, m in model.named_modules() if m is record.home[0])  # "model"; Whisper: "model.decoder"
    expected = sorted(f"{home}.{k}".lstrip(".") for k in record.rotary_keys().get("", []))
    found = _adapter_rotary_keys(folder)
    if found != expected:
        if installed_here:
            host.uninstall(model)
        raise ValueError(f"{folder}: the adapter's rotary tensors do not match its recorded install "
                         f"{options.to_dict()}: expected {expected}, found {found}")
    return model
