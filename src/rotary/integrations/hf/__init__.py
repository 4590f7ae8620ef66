"""Install a learned rotation into Hugging Face transformers models, in place, without editing transformers.

    rotary.hf.install(model)                                          # e.g. an AutoModelForCausalLM
    model = rotary.hf.from_pretrained(AutoModelForCausalLM, folder)   # after model.save_pretrained(folder)

Causal LMs whose attention applies the model's own RoPE (Llama, Mistral, Qwen2, Qwen3, Gemma, ...) are handled
by :mod:`rotary.integrations.hf.causal`; Whisper (``config.model_type == "whisper"``) by
:mod:`rotary.integrations.hf.whisper`.
``rotary.fold(model)`` moves the learned P into the query/key projections, after which ``model.save_pretrained``
writes a stock checkpoint. transformers is an optional dependency: ``pip install 'rotary[hf]'``.
"""

from __future__ import annotations

import os

from torch import nn

from ..install import Install, InstallOptions, find, is_record
from ._common import forget, read_tensors, recorded, require_transformers

__all__ = ["from_pretrained", "install", "installed", "uninstall"]

_HOSTS = ("hf.causal", "hf.whisper")


def _integration(model: nn.Module):
    """The module that handles this model: rotary.hf.whisper for Whisper, rotary.hf.causal otherwise."""
    require_transformers()
    if getattr(getattr(model, "config", None), "model_type", None) == "whisper":
        from . import whisper

        return whisper
    from . import causal

    return causal


def install(model: nn.Module, **options) -> nn.Module:
    """Install a rotary into a transformers model, in place; returns the model.

    Causal LMs: see :func:`rotary.integrations.hf.causal.install` (``mixing=``, ``per_layer=``, ``learned_freq=``,
    ``scaling=``). Whisper: see :mod:`rotary.integrations.hf.whisper`. The options are recorded in ``model.config``,
    so that ``model.save_pretrained`` checkpoints (Trainer's included) reload with :func:`from_pretrained`. A PEFT model
    (``get_peft_model(...)``): see :mod:`rotary.integrations.hf.peft`; P then trains and is saved with the adapter.
    ``adapter=folder`` (and no other option): the install a saved PEFT adapter was trained with, before
    ``PeftModel.from_pretrained(model, folder)``.
    """
    from .peft import install as install_peft
    from .peft import install_for_adapter, is_peft_model

    if "adapter" in options:
        folder = options.pop("adapter")
        if options:
            raise TypeError(f"adapter= takes the install's options from the adapter's folder, got {sorted(options)}")
        return install_for_adapter(model, folder)
    if is_peft_model(model):
        return install_peft(model, **options)
    return _integration(model).install(model, **options)


def uninstall(model: nn.Module) -> nn.Module:
    """Remove what :func:`install` added, in place, restoring transformers' own module tree; returns the model.

    The weights stay as they are: an unfolded P is dropped with the rotary (call ``rotary.fold(model)`` first to
    keep what it learned).
    """
    return _integration(model).uninstall(model)


def installed(model: nn.Module) -> Install | None:
    """The record of the rotary :func:`install` put into ``model`` (its ``options``, an :class:`InstallOptions`,
    and ``rotaries``), or None; as :func:`rotary.whisper.installed` for openai-whisper."""
    return find(model, _HOSTS) if isinstance(model, nn.Module) else None


def _as_record(options) -> dict:
    """Expected install options as a record: an :class:`InstallOptions`, its ``to_dict()``, or (installs before the
    record existed) a dict of keyword arguments, sorted."""
    if isinstance(options, InstallOptions):
        return options.to_dict()
    options = dict(options)
    return options if is_record(options) else dict(sorted(options.items()))


def from_pretrained(model_class, path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a checkpoint written by ``model.save_pretrained`` from a model with a rotary installed.

    ``model_class`` is a transformers class (``AutoModelForCausalLM``, ``LlamaForCausalLM``, ...); kwargs go to its
    ``from_pretrained`` (``dtype=``, ...), except ``rotary=``: the install options you expect, checked against the
    recorded ones (an :class:`InstallOptions` or its ``to_dict()``). Loads the stock weights, installs the recorded
    rotary (records written by earlier versions, keyword dicts, too) and loads its tensors from the checkpoint:
    parameters come back bit-identical. A checkpoint without a record (a stock or folded one) is refused: load it
    with ``model_class.from_pretrained``.
    """
    transformers = require_transformers()
    expected = kwargs.pop("rotary", None)
    config = kwargs.pop("config", None)
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path)
    options = recorded(config)
    if options is None:
        raise ValueError(
            f"{path}: its config records no rotary install (a stock or folded checkpoint): load it with "
            f"{getattr(model_class, '__name__', model_class)}.from_pretrained"
        )
    if expected is not None and _as_record(expected) != options:
        raise ValueError(f"{path}: rotary configuration mismatch: expected {_as_record(expected)}, found {options}")
    forget(config)  # the stock load below must see a stock config; install records the options again
    model, info = model_class.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    before = set(model.state_dict())
    if is_record(options):
        install(model, options=InstallOptions.from_dict(options))
    else:  # written before the record existed: its keyword arguments
        install(model, **options)
    # The record's extra state (the options) may be absent (older checkpoints kept it elsewhere, or nowhere):
    # the tensors must match.
    added = sorted(k for k in set(model.state_dict()) - before if not k.endswith("_extra_state"))
    # transformers reports the rotary's tensors as unexpected, since the stock model has no place for them
    found = sorted(k for k in info.get("unexpected_keys", ()) if not k.endswith("_extra_state"))
    extra = sorted(k for k in set(model.state_dict()) - before if k.endswith("_extra_state"))
    tensors = read_tensors(path, added + extra)
    if found != added or not set(added) <= set(tensors):
        uninstall(model)
        raise ValueError(
            f"{path}: the checkpoint's rotary tensors do not match its recorded install {options}: expected "
            f"{added}, found {found}"
        )
    model.load_state_dict(tensors, strict=False)
    return model
