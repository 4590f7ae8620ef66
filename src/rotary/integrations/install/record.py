"""``Install``: the record of one install, what it put where and how to take it out.

An install builds plain :class:`rotary.Rotary` modules from one :class:`InstallOptions`, registers them in the
host model, and changes the host only through public extension points, each kept in the record:

- forward hooks, forward pre-hooks and ``load_state_dict`` pre-hooks: the ``RemovableHandle`` their ``register_*``
  call returned (torch's hook dictionaries are never read or edited);
- replaced forwards (and other instance attributes): an instance attribute shadowing the class's own, deleted
  (or given its old value back) on removal;
- the registered Rotaries (``<parent>.rotary``), with the q/k projections each one's P acts on.

:meth:`Install.remove` undoes all of it, newest first; :meth:`Install.prepare_fold` is the fold of the whole
install (:class:`rotary.core.fold.Foldable`). The record is a module without parameters, registered as
``rotary_install`` in the module that holds the install (whisper's decoder, a transformers base model), so that
``rotary.fold`` finds it in ``model.modules()`` and ``copy.deepcopy`` / ``torch.save(model)`` carry it (its
references to host modules are plain attributes, remapped by the copy like any other). Its extra state
(``..rotary_install._extra_state``) holds the options, so that a state_dict cannot be loaded into a model
installed with other options; a state_dict without it (written before the record existed) loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...core.fold import check_placement
from ...core.module import Rotary
from .adapters import active, describe, fold_linears, is_adapter_layer, is_training_wrapper
from .mix import MixedOutput, MixedWeights, commutes_with_rotations, fold_rows, plain_linear
from .options import InstallOptions

__all__ = ["RECORD_NAME", "Install", "Placed", "Target", "find"]


RECORD_NAME = "rotary_install"  # where the record is registered, next to the Rotary
# the config attribute mirroring the options (Hugging Face's config.json); "rotary" collides with hosts' own fields
CONFIG_KEY = "rotary_install"


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


class _Registered:
    """A module an install registered at ``parent.<name>``."""

    def __init__(self, parent: nn.Module, name: str, module: nn.Module):
        self.parent, self.name, self.module = parent, name, module

    def undo(self) -> None:
        _unregister(self.parent, self.name, self.module)


class _Hook:
    """A hook an install registered, by the handle its ``register_*`` call returned."""

    def __init__(self, handle):
        self.handle = handle

    def undo(self) -> None:
        self.handle.remove()


@dataclass(eq=False)
class Target:
    """Where a P acts: the projection at ``owner.<name>`` (looked up at every use: an adapter library may wrap or
    unwrap it), its output channels ``rows`` (None: all; a fused qkv projection: the query and key ones), and the
    module P is applied to now with the change that applies it."""

    owner: nn.Module
    name: str
    rows: slice | Tensor | None = None
    module: nn.Module | None = None
    change: object = None

    def current(self) -> nn.Module:
        return getattr(self.owner, self.name)

    def where(self) -> str:
        return f"{type(self.owner).__name__}.{self.name}"


@dataclass(eq=False)
class Placed:
    """One Rotary of an install: where it is registered (``parent.<name>``), the q/k projections its P acts on and
    folds into (:class:`Target`), the modules P acts after (per-head norms, checked at fold), whether it stays once
    its P is folded (it also computes angles) or goes (it held only P), and the changes that apply its P after
    norms (undone by a fold)."""

    rotary: Rotary
    parent: nn.Module
    name: str
    targets: list[Target]
    keep_after_fold: bool
    after: list[tuple[str, nn.Module]] = field(default_factory=list)
    mixing: list = field(default_factory=list)

    def current(self) -> Rotary:
        """The Rotary in use: the registered one, or the active adapter's copy where PEFT trains it (see
        :func:`rotary.integrations.install.adapters.active`)."""
        module = self.parent._modules.get(self.name)
        return self.rotary if module is None else active(module)

    def changes(self) -> list:
        return [t.change for t in self.targets if t.change is not None] + self.mixing


class Install(nn.Module):
    """The record of one install: its options, its Rotaries, and every change it made to the host (see the module
    docstring). Build it, add the Rotaries, :meth:`attach` it, make the changes through its methods;
    :meth:`remove` undoes them all.

    ``host`` names the integration (``"whisper"``, ``"hf.causal"``, ``"hf.whisper"``); ``config`` is an object whose
    ``rotary_install`` attribute (:data:`CONFIG_KEY`) mirrors ``options.to_dict()`` while installed (Hugging Face's
    ``model.config``), or None; ``fold_angles``, for an install that changed the host's angles: called by
    :meth:`prepare_fold` before anything changes, it checks that the angles can be written as the host's stock
    configuration (raising ``ValueError`` naming why not) and returns the action that writes it; after that action
    the whole install is removed.
    """

    def __init__(self, host: str, options: InstallOptions, *, config=None,
                 fold_angles: Callable[[], Callable[[], None]] | None = None):
        super().__init__()
        self.host, self.options, self.config = host, options, config
        self.fold_angles = fold_angles
        self.rotaries: list[Placed] = []  # plain lists: nothing here is a submodule of the record
        self.changes: list = []
        self.home: list = []  # [parent, name] where the record is registered

    # --------------------------------------------------------------------------------------- building
    def add_rotary(self, rotary: Rotary, parent: nn.Module, *, name: str = "rotary", folds_into=(),
                   keep_after_fold: bool = True) -> Placed:
        """Register ``rotary`` at ``parent.<name>``. Its P acts on the projections :meth:`mix_projection` names,
        or, where the Rotary applies P itself (``R(m) P q``: the Whisper hosts), on those named in ``folds_into``
        (``(owner, attribute name)`` pairs), which a fold then absorbs P into."""
        _free(parent, name)
        setattr(parent, name, rotary)
        targets = [Target(owner, attr, module=getattr(owner, attr)) for owner, attr in folds_into]
        placed = Placed(rotary, parent, name, targets, keep_after_fold)
        self.rotaries.append(placed)
        return placed

    def attach(self, parent: nn.Module) -> None:
        """Register the record at ``parent.rotary_install`` (``parent`` holds every Rotary of the install, at any
        depth), check the state_dicts loaded into ``parent``, and mirror the options into the config."""
        _free(parent, RECORD_NAME)
        setattr(parent, RECORD_NAME, self)
        self.home[:] = [parent, RECORD_NAME]
        self.changes.append(_Hook(parent.register_load_state_dict_pre_hook(_CheckRotaryTensors(self))))
        self.forward_pre_hook(parent, self._sync_hook)
        self._mirror()

    def add_module(self, parent: nn.Module, name: str, module: nn.Module) -> None:
        """Register a module of the install that is not a Rotary (a container of Rotaries) at ``parent.<name>``,
        deleted by :meth:`remove`."""
        _free(parent, name)
        setattr(parent, name, module)
        self.changes.append(_Registered(parent, name, module))

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

    def mix_projection(self, placed: Placed, owner: nn.Module, name: str, rows: slice | Tensor | None = None) -> None:
        """Apply ``placed``'s P to the projection at ``owner.<name>`` (its output ``rows``; None: all): on its
        weights if it is a plain ``nn.Linear`` and ``options.mix_on`` is ``"weights"``, else on its output."""
        target = Target(owner, name, rows)
        self._mix(placed, target)
        placed.targets.append(target)

    def _mix(self, placed: Placed, target: Target) -> None:
        module = target.current()
        if self.options.mix_on == "weights" and plain_linear(module):
            change = _Attribute(module, "forward", MixedWeights(module, placed.current, target.rows))
            module.forward = change.value
        else:  # an adapter- or quantised-wrapped projection: P on its whole output, whatever it computes
            change = _Hook(module.register_forward_hook(MixedOutput(placed.current, target.rows)))
        target.module, target.change = module, change

    def mix_after(self, placed: Placed, name: str, module: nn.Module) -> None:
        """Apply ``placed``'s P to the output of ``module``, which sits between a projection and RoPE (a per-head
        norm): always on the activations; a fold checks that P moves through it."""
        placed.mixing.append(_Hook(module.register_forward_hook(MixedOutput(placed.current))))
        placed.after.append((name, module))

    def sync(self) -> None:
        """Follow the projections an adapter library wrapped or unwrapped since P was applied (``get_peft_model``,
        ``merge_and_unload``): P moves to the module now in place, so that it acts on the whole adapted output.
        Runs before every forward of the module holding the record, and before a fold; a few identity checks
        when nothing changed.

        A projection wrapped by an adapter while the Rotary is not trained with it (the install came before
        ``get_peft_model`` and was not handed to it) is an error: P would be frozen and lost from the adapter.
        """
        for placed in self.rotaries:
            for target in placed.targets:
                module = target.current()
                if module is target.module:
                    continue
                if is_adapter_layer(module) and not is_training_wrapper(placed.parent._modules.get(placed.name)):
                    weights_only = ", act on the base weights only" if target.change is not None else ""
                    raise RuntimeError(
                        f"{target.where()} is now {describe(module)}, wrapped after rotary was installed, but the "
                        f"rotary at {type(placed.parent).__name__}.{placed.name} is not trained with that adapter "
                        f"(it would stay frozen{weights_only} and be missing from the saved adapter): call "
                        f"rotary.hf.install(peft_model) once after get_peft_model"
                    )
                if target.change is None:  # the Rotary applies P itself (R(m) P q): nothing to move
                    target.module = module
                    continue
                target.change.undo()
                self._mix(placed, target)

    def _sync_hook(self, module, args) -> None:
        self.sync()

    # --------------------------------------------------------------------------------------- removing
    def remove(self) -> None:
        """Undo every change, newest first: hooks removed, forwards restored, Rotaries and the record deleted."""
        for placed in reversed(self.rotaries):
            for change in reversed(placed.changes()):
                change.undo()
            placed.mixing.clear()
            placed.targets.clear()
        for change in reversed(self.changes):
            change.undo()
        self.changes.clear()
        for placed in reversed(self.rotaries):
            _unregister(placed.parent, placed.name)
        self.rotaries.clear()
        if self.home:
            _unregister(*self.home, self)
            self.home.clear()
        if self.config is not None and CONFIG_KEY in vars(self.config):
            delattr(self.config, CONFIG_KEY)  # only the record: a host's own config.rotary (Falcon) stays

    # --------------------------------------------------------------------------------------- folding
    def prepare_fold(self) -> Callable[[], None] | None:
        """:class:`rotary.core.fold.Foldable`: every Rotary's P into its projections, checked before anything changes.

        Then the changes that applied P go, a Rotary that held only P goes, and the options say ``mixing=None``;
        an install with nothing left is removed entirely (the model is stock again).
        """
        self.sync()  # P where the projections are now (after merge_and_unload, ...): changes no output
        placed = [p for p in self.rotaries if p.current().mixer is not None]
        stock_angles = self.fold_angles() if self.fold_angles is not None else None  # raises before any change
        if not placed and stock_angles is None:
            return None
        check_placement(self.options.placement)
        plan = []  # per Rotary: [(the nn.Linears one target folds into, its rows)]
        for p in placed:
            head_dim = p.current().head_dim
            for name, module in p.after:
                reason = commutes_with_rotations(module, head_dim)
                if reason is not None:
                    raise ValueError(
                        f"cannot fold P exactly: {name} ({type(module).__name__}) sits between the projection and "
                        f"RoPE, and {reason}. P moves through such a norm only if the norm is an RMSNorm whose "
                        f"weight is uniform within each head (then norm(P y) = P norm(y)). Nothing was changed. "
                        f"Install with P before the norm (mix_norm='before', the default), which folds whatever "
                        f"the norm weight; or ship the model with the rotary installed."
                    )
            folds = []
            for target in p.targets:
                try:
                    linears = fold_linears(target.module)
                except ValueError as error:
                    raise ValueError(f"cannot fold P into {target.where()}: {error}. Nothing was changed.") from None
                folds.append((linears, target.rows))
            plan.append(folds)

        def action():
            for p, folds in zip(placed, plan):
                P = p.current().remove_mixing()  # float64 (D, D)
                for linears, rows in folds:
                    fold_rows(P, linears, rows)
                for change in reversed(p.changes()):
                    change.undo()
                p.mixing.clear()
                p.targets.clear()
                if not p.keep_after_fold:
                    _unregister(p.parent, p.name)
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

        return action

    # --------------------------------------------------------------------------------------- state
    def _mirror(self) -> None:
        if self.config is not None:
            setattr(self.config, CONFIG_KEY, self.options.to_dict())

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

    def rotary_keys(self) -> dict[str, list[str]]:
        """The state_dict keys of the Rotaries, relative to the module the record is registered in, by copy: ``""``
        for the installed Rotaries, an adapter's name for the copies PEFT trains for it."""
        names = {id(m): n for n, m in self.home[0].named_modules()} if self.home else {}
        keys: dict[str, list[str]] = {}
        for p in self.rotaries:
            slot = p.parent._modules.get(p.name)
            copies = {"": p.rotary}
            if is_training_wrapper(slot):
                copies.update(slot._modules["modules_to_save"].items())
            elif isinstance(slot, Rotary):  # PEFT's merge_and_unload put the adapter's copy in the Rotary's place
                copies[""] = slot
            for kind, rotary in copies.items():
                if id(rotary) in names:
                    keys.setdefault(kind, []).extend(f"{names[id(rotary)]}.{k}" for k in rotary.state_dict())
        return keys

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
        # every copy (the installed Rotaries, or one adapter's) whose tensors the state_dict carries must be whole:
        # a full checkpoint carries the installed ones, a PEFT adapter its own
        by_copy = {kind: sorted(prefix + k for k in keys) for kind, keys in self.record.rotary_keys().items()}
        found = sorted(k for k in state_dict if k.startswith(prefix) and _is_rotary_key(k[len(prefix):]))
        carried = {kind: keys for kind, keys in by_copy.items() if set(keys) & set(found)}
        expected = sorted(k for keys in (carried or by_copy).values() for k in keys)
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
    record.setdefault("mix_norm", "after")  # as InstallOptions.from_dict reads records written before the field
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


def _unregister(parent: nn.Module, name: str, module: nn.Module | None = None) -> None:
    """Delete ``parent.<name>`` if it holds ``module`` (the record), or, without one, a Rotary of the install: the
    registered one, or what PEFT put in its place (its training wrapper, or after ``merge_and_unload`` the copy)."""
    found = parent._modules.get(name)
    if found is None:
        return
    if module is not None and found is not module:
        return
    if module is None and not isinstance(active(found), Rotary):
        return
    delattr(parent, name)


def find(model: nn.Module, hosts: tuple[str, ...] | None = None) -> Install | None:
    """The install record in ``model`` (of one of ``hosts``, if given), or None."""
    for module in model.modules():
        if isinstance(module, Install) and (hosts is None or module.host in hosts):
            return module
    return None
