"""What every Hugging Face integration of rotary shares: the optional import, and the install record in the config.

An install writes its options into the model's config under :data:`CONFIG_KEY` (``config.rotary_install``, the
JSON values of :meth:`rotary.integrations.install.InstallOptions.to_dict`; installs before that record existed
wrote their keyword arguments, which :func:`rotary.hf.from_pretrained` still reads). ``model.save_pretrained`` and
Trainer checkpoints therefore carry them in ``config.json``, and :func:`rotary.hf.from_pretrained` reinstalls from
them. Uninstalling, or folding everything away, deletes the record, so a stock model's config is left as it was.

Records of earlier versions sit at ``config.rotary`` (:data:`OLD_CONFIG_KEY`); they are read, and deleted by
:func:`forget`, only where that field holds a dict: some hosts have a field of their own by that name (Falcon's
boolean ``config.rotary``), which is never read, written or deleted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from types import ModuleType

from torch import Tensor

from ..install.record import CONFIG_KEY

__all__ = ["CONFIG_KEY", "OLD_CONFIG_KEY", "forget", "read_tensors", "recorded", "require_transformers"]

OLD_CONFIG_KEY = "rotary"  # where earlier versions kept the record: a name hosts use too (Falcon: a bool)


def require_transformers() -> ModuleType:
    """Import transformers, or fail with the extra that provides it."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "rotary.hf needs Hugging Face transformers, which is an optional extra: pip install 'rotary[hf]'"
        ) from error
    return transformers


def recorded(config) -> dict | None:
    """The install options recorded in a transformers config (a copy), or None: ``config.rotary_install``, or a
    record of an earlier version at ``config.rotary`` (a dict; anything else there is the host's own field)."""
    options = getattr(config, CONFIG_KEY, None)
    if options is None:
        old = getattr(config, OLD_CONFIG_KEY, None)
        options = old if isinstance(old, dict) else None
    return None if options is None else dict(sorted(options.items()))  # sorted, as config.json stores them


def forget(config) -> None:
    """Delete the install record from a transformers config, if any (an earlier version's at ``config.rotary``
    too, where that is a dict); a host's own ``config.rotary`` stays."""
    fields = vars(config)
    if CONFIG_KEY in fields:
        delattr(config, CONFIG_KEY)
    if isinstance(fields.get(OLD_CONFIG_KEY), dict):
        delattr(config, OLD_CONFIG_KEY)


def read_tensors(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, Tensor]:
    """Tensors ``names`` from a ``save_pretrained`` folder (``model.safetensors``, sharded or not), on the CPU.

    Names the checkpoint lacks are left out of the result (the caller reports them).
    """
    from safetensors import safe_open

    directory = os.fspath(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        weight_map = None
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors (or its index) from save_pretrained")
    wanted = list(names)
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        file = "model.safetensors" if weight_map is None else weight_map.get(name)
        if file is not None:
            by_file.setdefault(file, []).append(name)
    tensors: dict[str, Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(os.path.join(directory, file), framework="pt", device="cpu") as f:
            present = set(f.keys())
            for name in file_names:
                if name in present:
                    tensors[name] = f.get_tensor(name)
    return tensors
