"""``Install``: the record of one install, what it put where and how to take it out.

An install builds plain :class:`rotary.Rotary` modules from one :class:`InstallOptions`, registers them in the
host model, and changes the host only through public extension points, each kept in the record:

- forward hooks, forward pre-hooks and ``load_state_dict`` pre-hooks: the ``RemovableHandle`` their ``register_*``
  call returned (torch's hook dictionaries are never read or edited);
- replaced forwards (and other instance attributes): an instance attribute shadowing the class's own, deleted
  (or given its old value back) on removal;
- the registered Rotaries (``<parent>.rotary``), with the q/k projections each one's P acts on.

:meth:`Install.remove` undoes all of it, newest first; :meth:`Install.prepare_fold` is the fold of the whole
install (:class:`rotary.fold.Foldable`). The record is a module without parameters, registered as
``rotary_install`` in the module that holds the install (whisper's decoder, a transformers base model), so that
``rotary.fold`` finds it in ``model.modules()`` and ``copy.deepcopy`` / ``torch.save(model)`` carry it (its
references to host modules are plain attributes, remapped by the copy like any other). Its extra state
(``..rotary_install._extra_state``) holds the options, so that a state_dict cannot be loaded into a model
installed with other options; a state_dict without it (written before the record existed) loads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...core.fold import check_placement
from ...core.module import Rotary
from .mix import MixedOutput, MixedWeights, commutes_with_rotations, plain_linear, prepare_fold_into
from .options import InstallOptions

__all__ = ["RECORD_NAME", "Install", "Placed", "find"]

logger = logging.getLogger(__name__)

RECORD_NAME = "rotary_install"  # where the record is registered, next to the Rotary


class _Attribute:
    """An instance attribute an install set on a host object (a replaced ``forward``, ``generate``, ...)."""

    def __init__(self, obj, name: str, value):
        self.obj, self.name, self.value = obj, name, value
        # no sentinel object: it would not survive copy.deepcopy or pickling as itself
        self.had, self.previous = name in vars(obj), vars(obj).get(name)

    def undo(self) -> None:
        current = vars(self.obj).get(self.name)
        if not (current is self.value or (not callable(current) and current == self.value)):
            return  # replaced since by someone else: theirs now
        if self.had:
            setattr(self.obj, self.name, self.previous)
        else:
            delattr(self.obj, self.name)  # the class's own (forward, generate, ...) shows through again


class _Hook:
    """A hook an install registered, by the handle its ``register_*`` call returned."""

    def __init__(self, handle):
        self.handle = handle

    def undo(self) -> None:
        self.handle.remove()


@dataclass(eq=False)
class Placed:
    """One Rotary of an install: where it is registered (``parent.<name>``), the q/k projections its P acts on and
    folds into, the modules P acts after (per-head norms, checked at fold), whether it stays once its P is folded
    (it also computes angles) or goes (it held only P), and the changes that apply its P (undone by a fold)."""

    rotary: Rotary
    parent: nn.Module
    name: str
    projections: list[nn.Module]
    keep_after_fold: bool
    after: list[tuple[str, nn.Module]] = field(default_factory=list)
    mixing: list = field(default_factory=list)


class Install(nn.Module):
    """The record of one install: its options, its Rotaries, and every change it made to the host (see the module
    docstring). Build it, add the Rotaries, :meth:`attach` it, make the changes through its methods;
    :meth:`remove` undoes them all.

    ``host`` names the integration (``"whisper"``, ``"hf.causal"``, ``"hf.whisper"``); ``config`` is an object whose
    ``rotary`` attribute mirrors ``options.to_dict()`` while installed (Hugging Face's ``model.config``), or None;
    ``fold_warning`` is logged when a fold leaves a Rotary behind that a stock checkpoint cannot express.
    ``fold_angles``, for an install that changed the host's angles: called by :meth:`prepare_fold` before anything
    changes, it checks that the angles can be written as the host's stock configuration (raising ``ValueError``
    naming why not) and returns the action that writes it; after that action the whole install is removed.
    """

    def __init__(self, host: str, options: InstallOptions, *, config=None, fold_warning: str | None = None,
                 fold_angles: Callable[[], Callable[[], None]] | None = None):
        super().__init__()
        self.host, self.options, self.config, self.fold_warning = host, options, config, fold_warning
        self.fold_angles = fold_angles
        self.rotaries: list[Placed] = []  # plain lists: nothing here is a submodule of the record
        self.changes: list = []
        self.home: list = []  # [parent, name] where the record is registered

    # --------------------------------------------------------------------------------------- building
    def add_rotary(self, rotary: Rotary, parent: nn.Module, *, name: str = "rotary", projections=(),
                   keep_after_fold: bool = True) -> Placed:
        """Register ``rotary`` at ``parent.<name>``; ``projections``: the q/k projections its P acts on."""
        _free(parent, name)
        setattr(parent, name, rotary)
        placed = Placed(rotary, parent, name, list(projections), keep_after_fold)
        self.rotaries.append(placed)
        return placed

    def attach(self, parent: nn.Module) -> None:
        """Register the record at ``parent.rotary_install`` (``parent`` holds every Rotary of the install, at any
        depth), check the state_dicts loaded into ``parent``, and mirror the options into the config."""
        _free(parent, RECORD_NAME)
        setattr(parent, RECORD_NAME, self)
        self.home[:] = [parent, RECORD_NAME]
        self.changes.append(_Hook(parent.register_load_state_dict_pre_hook(_CheckRotaryTensors(self))))
        self._mirror()

    def set_attribute(self, obj, name: str, value) -> None:
        """Set an instance attribute of a host object (e.g. a replaced ``forward``), restored by :meth:`remove`."""
        change = _Attribute(obj, name, value)
        setattr(obj, name, value)
        self.changes.append(change)

    def replace_forward(self, module: nn.Module, forward: Callable) -> None:
        """``module.forward`` becomes ``forward`` (an instance attribute: hooks, parameters and names stay)."""
        self.set_attribute(module, "forward", forward)

    def forward_hook(self, module: nn.Module, hook: Callable, **kwargs) -> None:
        self.changes.append(_Hook(module.register_forward_hook(hook, **kwargs)))

    def forward_pre_hook(self, module: nn.Module, hook: Callable, **kwargs) -> None:
        self.changes.append(_Hook(module.register_forward_pre_hook(hook, **kwargs)))

    def mix_projection(self, placed: Placed, projection: nn.Module) -> None:
        """Apply ``placed``'s P to ``projection``, as ``options.mix_on`` says: its weights or its output."""
        if self.options.mix_on == "weights":
            if not plain_linear(projection):
                raise TypeError(
                    f"mix_on='weights' replaces nn.Linear.forward, and {type(projection).__name__} has its own "
                    f"forward (a LoRA or quantised wrapper?): use mix_on='activations'"
                )
            change = _Attribute(projection, "forward", MixedWeights(projection, placed.rotary))
            projection.forward = change.value
        else:
            change = _Hook(projection.register_forward_hook(MixedOutput(placed.rotary)))
        placed.mixing.append(change)

    def mix_after(self, placed: Placed, name: str, module: nn.Module) -> None:
        """Apply ``placed``'s P to the output of ``module``, which sits between a projection and RoPE (a per-head
        norm): always on the activations; a fold checks that P moves through it."""
        placed.mixing.append(_Hook(module.register_forward_hook(MixedOutput(placed.rotary))))
        placed.after.append((name, module))

    # --------------------------------------------------------------------------------------- removing
    def remove(self) -> None:
        """Undo every change, newest first: hooks removed, forwards restored, Rotaries and the record deleted."""
        for placed in reversed(self.rotaries):
            for change in reversed(placed.mixing):
                change.undo()
            placed.mixing.clear()
        for change in reversed(self.changes):
            change.undo()
        self.changes.clear()
        for placed in reversed(self.rotaries):
            _unregister(placed.parent, placed.name, placed.rotary)
        self.rotaries.clear()
        if self.home:
            _unregister(*self.home, self)
            self.home.clear()
        if self.config is not None and "rotary" in vars(self.config):
            delattr(self.config, "rotary")

    # --------------------------------------------------------------------------------------- folding
    def prepare_fold(self) -> Callable[[], None] | None:
        """:class:`rotary.fold.Foldable`: every Rotary's P into its projections, checked before anything changes.

        Then the changes that applied P go, a Rotary that held only P goes, and the options say ``mixing=None``;
        an install with nothing left is removed entirely (the model is stock again).
        """
        placed = [p for p in self.rotaries if p.rotary.mixer is not None]
        stock_angles = self.fold_angles() if self.fold_angles is not None else None  # raises before any change
        if not placed and stock_angles is None:
            return None
        check_placement(self.options.placement)
        for p in placed:
            for name, module in p.after:
                reason = commutes_with_rotations(module, p.rotary.head_dim)
                if reason is not None:
                    raise ValueError(
                        f"cannot fold P exactly: {name} ({type(module).__name__}) sits between the projection and "
                        f"RoPE, and {reason}. P moves through such a norm only if the norm is an RMSNorm whose "
                        f"weight is uniform within each head (then norm(P y) = P norm(y)). Nothing was changed. "
                        f"Ship the model with the rotary installed (P costs one (head_dim x head_dim) product per "
                        f"head), or train with the norms frozen at a uniform weight so that fold stays exact."
                    )
        actions = [prepare_fold_into(p.rotary, p.projections, self.options.placement) for p in placed]

        def action():
            for p, fold_p in zip(placed, actions):
                fold_p()
                for change in reversed(p.mixing):
                    change.undo()
                p.mixing.clear()
                if not p.keep_after_fold:
                    _unregister(p.parent, p.name, p.rotary)
                    self.rotaries.remove(p)
            self.options = self.options.without_mixing()
            if stock_angles is not None:
                stock_angles()  # the host's config now describes the angles: nothing of the install is left
                self.remove()
                return
            if not self.rotaries:
                self.remove()
                return
            self._mirror()
            if self.fold_warning:
                logger.warning(self.fold_warning)

        return action

    # --------------------------------------------------------------------------------------- state
    def _mirror(self) -> None:
        if self.config is not None:
            self.config.rotary = self.options.to_dict()

    def get_extra_state(self) -> Tensor:
        # A uint8 tensor rather than a dict: safetensors (save_pretrained) stores tensors only.
        text = json.dumps(self.options.to_dict(), sort_keys=True)
        return torch.tensor(list(text.encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        found = _decode(state)
        differences = _differences(found, self.options.to_dict())
        if differences:
            raise ValueError(
                f"the state_dict comes from a rotary installed with other options ({'; '.join(differences)}): it "
                f"was installed with {_flat(found)}, but this model's with {_flat(self.options.to_dict())}; "
                f"install with the checkpoint's options"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A state_dict without the record (written before it existed) loads: the record holds no tensor to miss.
        if prefix + "_extra_state" in state_dict:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)

    def rotary_keys(self) -> list[str]:
        """The state_dict keys of the Rotaries, relative to the module the record is registered in."""
        names = {id(m): n for n, m in self.home[0].named_modules()} if self.home else {}
        return [f"{names[id(p.rotary)]}.{k}" for p in self.rotaries if id(p.rotary) in names
                for k in p.rotary.state_dict()]

    def extra_repr(self) -> str:
        return f"host={self.host!r}, options={_flat(self.options.to_dict())}"


class _CheckRotaryTensors:
    """``load_state_dict`` pre-hook on the module holding the record: a state_dict that carries rotary tensors
    (a checkpoint of an installed model, e.g. when Trainer resumes) must carry exactly this install's, whatever
    ``strict`` says. It sees every key under that module (a child sees only its own)."""

    def __init__(self, record: Install):
        self.record = record

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("rotary._extra_state")]:
            del state_dict[key]  # where rotary.hf.whisper kept its options before the record held them
        ours = self.record.options.to_dict()
        theirs = state_dict.get(prefix + RECORD_NAME + "._extra_state")
        theirs = None if theirs is None else _decode(theirs)
        expected = sorted(prefix + k for k in self.record.rotary_keys())
        found = sorted(k for k in state_dict if k.startswith(prefix) and _is_rotary_key(k[len(prefix):]))
        differences = [] if theirs is None else _differences(theirs, ours)
        if differences or (found and found != expected):
            raise ValueError(
                "the state_dict comes from a different rotary install"
                + (f" ({'; '.join(differences)}): it was installed with {_flat(theirs)}, but this model's with "
                   f"{_flat(ours)}" if differences else f": this model's ({_flat(ours)})")
                + f"; this model expects rotary tensors {expected}, found {found}. Install with the checkpoint's "
                f"options"
            )


def _decode(state) -> dict:
    """The options in a record's extra-state tensor (:meth:`Install.get_extra_state`)."""
    try:
        return json.loads(bytes(state.tolist()).decode())
    except (AttributeError, TypeError, ValueError) as error:
        raise ValueError("the state_dict's rotary install record is not one this version wrote") from error


def _flat(record: dict) -> dict:
    """An ``InstallOptions.to_dict()`` record as one flat, sorted dict (``rotary.`` fields inlined), for messages."""
    record = dict(record) if isinstance(record, dict) else {}
    inner = record.pop("rotary", None)
    record.pop("format", None)
    flat = {**record, **(inner if isinstance(inner, dict) else {})}
    return dict(sorted(flat.items()))


def _differences(found: dict, expected: dict) -> list[str]:
    """What differs between two records, except how P is applied (``mix_on``: the same function and tensors either
    way, so a checkpoint of one loads into the other)."""
    a, b = _flat(found), _flat(expected)
    return [f"{k}: {a.get(k)!r} in the state_dict, {b.get(k)!r} here" for k in sorted(set(a) | set(b))
            if k != "mix_on" and a.get(k) != b.get(k)]


def _is_rotary_key(name: str) -> bool:
    return "rotary" in name.split(".")  # a tensor of what an install registers; never transformers' rotary_emb


def _free(parent: nn.Module, name: str) -> None:
    if hasattr(parent, name):
        raise RuntimeError(f"{type(parent).__name__} already has an attribute named {name!r}")


def _unregister(parent: nn.Module, name: str, module: nn.Module) -> None:
    if getattr(parent, name, None) is module:
        delattr(parent, name)


def find(model: nn.Module, hosts: tuple[str, ...] | None = None) -> Install | None:
    """The install record in ``model`` (of one of ``hosts``, if given), or None."""
    for module in model.modules():
        if isinstance(module, Install) and (hosts is None or module.host in hosts):
            return module
    return None
