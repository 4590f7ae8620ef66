"""Install a learned rotation into Hugging Face transformers models, in place, without editing transformers.

    rotary.hf.install(model)                                          # e.g. an AutoModelForCausalLM
    model = rotary.hf.from_pretrained(AutoModelForCausalLM, folder)   # after model.save_pretrained(folder)

Causal LMs whose attention applies the model's own RoPE (Llama, Mistral, Qwen2, Qwen3, Gemma, ...) are handled
by :mod:`rotary.hf.causal`; Whisper (``config.model_type == "whisper"``) by :mod:`rotary.hf.whisper`.
``rotary.fold(model)`` moves the learned P into the query/key projections, after which ``model.save_pretrained``
writes a stock checkpoint. transformers is an optional dependency: ``pip install 'rotary[hf]'``.
"""

from __future__ import annotations

import os

from torch import nn

from ._common import forget, read_tensors, recorded, require_transformers

__all__ = ["from_pretrained", "install", "installed", "uninstall"]


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

    Causal LMs: see :func:`rotary.hf.causal.install` (``mixing=``, ``per_layer=``, ``learned_freq=``,
    ``scaling=``). Whisper: see :mod:`rotary.hf.whisper`. The options are recorded in ``model.config``, so that
    ``model.save_pretrained`` checkpoints (Trainer's included) reload with :func:`from_pretrained`.
    """
    return _integration(model).install(model, **options)


def uninstall(model: nn.Module) -> nn.Module:
    """Remove what :func:`install` added, in place, restoring transformers' own module tree; returns the model.

    The weights stay as they are: an unfolded P is dropped with the rotary (call ``rotary.fold(model)`` first to
    keep what it learned).
    """
    return _integration(model).uninstall(model)


def installed(model: nn.Module) -> dict | None:
    """The options of the rotary installed in ``model`` (as recorded in its config), or None."""
    return recorded(getattr(model, "config", None))


def from_pretrained(model_class, path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a checkpoint written by ``model.save_pretrained`` from a model with a rotary installed.

    ``model_class`` is a transformers class (``AutoModelForCausalLM``, ``LlamaForCausalLM``, ...); kwargs go to its
    ``from_pretrained`` (``dtype=``, ...), except ``rotary=``: the install options you expect, checked against the
    recorded ones. Loads the stock weights, installs the recorded rotary and loads its tensors from the checkpoint:
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
    if expected is not None and dict(sorted(dict(expected).items())) != options:
        expected = dict(sorted(dict(expected).items()))
        raise ValueError(f"{path}: rotary configuration mismatch: expected {expected}, found {options}")
    forget(config)  # the stock load below must see a stock config; install records the options again
    model, info = model_class.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    before = set(model.state_dict())
    install(model, **options)
    added = sorted(set(model.state_dict()) - before)
    # transformers reports the rotary's tensors as unexpected, since the stock model has no place for them
    found = sorted(info.get("unexpected_keys", ()))
    tensors = read_tensors(path, added)
    if found != added or len(tensors) != len(added):
        uninstall(model)
        raise ValueError(
            f"{path}: the checkpoint's rotary tensors do not match its recorded install {options}: expected "
            f"{added}, found {found}"
        )
    model.load_state_dict(tensors, strict=False)
    return model
