"""The benchmark suites ``rotary bench <suite> ...`` runs: one registry, one runner, the environment record.

Adding a suite is one entry in :data:`SUITES`::

    "gpu": Suite("rotary.lab.bench.gpu:suite", "the Triton kernel against the anchors", devices=("cuda",)),

The entry names, as ``"module:function"``, a function imported only when the suite runs (so that ``rotary bench
--help`` and the other suites never import its dependencies). The function's interface::

    def suite(*, quick: bool, device: torch.device, seed: int, repeats: int | None,
              log: Callable[[str], None], **options) -> list[Row]

- ``quick``: a smoke run, seconds long: tiny shapes, one to three repeats; the numbers mean nothing.
- ``device``: where to run; always one of the entry's ``devices`` (the runner picks it, see :func:`run_suite`).
- ``seed``: seed of the ``torch.Generator`` the suite draws its inputs (and trained-looking parameters) from; a
  suite never seeds or reads the global RNG on purpose (the CLI seeds it before each suite, for the modules
  that draw from it at construction).
- ``repeats``: timed repeats of each contender; None is the suite's own default (fewer with ``quick``).
- ``log``: one line per thing skipped (a package not installed), never a print.
- ``options``: keyword options only that suite knows (``kernels``: ``dtypes``, ``contenders``, ``compile``,
  ``progress``); the CLI passes a suite only the options meant for it.

It returns :class:`rotary.lab.bench.rows.Row` objects with ``suite`` set to its registry name, time rows from
:func:`rotary.lab.bench.rows.time_rows` and ratio rows from :func:`rotary.lab.bench.rows.ratio_row` (timings
from :mod:`rotary.lab.bench.timing`, interleaved medians; peak memory from :mod:`rotary.lab.bench.memory`). A
ratio row that a target should judge carries a ``key``; the target itself is one line in
:data:`rotary.lab.bench.targets.TARGETS`. A suite whose third-party package is missing raises ImportError (the
runner turns that into one logged line); one that can skip part of its work logs that part instead.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from rotary.lab.bench.rows import Row
from rotary.lab.bench.targets import judge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Suite:
    run: str | Callable[..., list[Row]]  # "module:function" (imported when the suite runs), or the function
    help: str
    devices: tuple[str, ...] = ("cpu", "cuda")  # device types it can run on, in order of preference

    def load(self) -> Callable[..., list[Row]]:
        if callable(self.run):
            return self.run
        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)


SUITES: dict[str, Suite] = {
    "kernels": Suite("rotary.lab.bench.kernels:suite",
                     "the op against other RoPE implementations: speed and peak memory, fp32 and bf16"),
    "core": Suite("rotary.lab.bench.core_speed:suite",
                  "the core op at a training shape: apply_rotary and Rotary against a copy, rotary-embedding-torch, "
                  "the original module"),
    "decode": Suite("rotary.lab.bench.decode:suite",
                    "one-token calls at decode shapes; openai-whisper greedy decoding per token", devices=("cpu",)),
    "nd": Suite("rotary.lab.bench.nd_speed:suite", "N-D positions (2-D and 3-D) against 1-D at the same shape"),
    "decoder": Suite("rotary.lab.bench.decoder_speed:suite",
                     "the reference decoder: training step, decoding after fold, rotary share, positional modes"),
    "hf": Suite("rotary.lab.bench.hf_speed:suite", "a transformers Llama: training step installed, generate() "
                "after fold", devices=("cpu",)),
    "lora": Suite("rotary.lab.bench.lora_speed:suite", "LoRA (peft) on a transformers Llama: training step with rotary "
                  "installed through PEFT against LoRA alone, generate() after merge_and_unload and fold",
                  devices=("cpu",)),
    "train": Suite("rotary.lab.bench.train_speed:suite", "a transformers Llama at hidden 1024: full fine-tuning and "
                   "LoRA training steps with P on the weights and on the activations against stock",
                   devices=("cpu",)),
    "hf-whisper": Suite("rotary.lab.bench.hf_whisper_speed:suite",
                        "transformers' Whisper: decoding per token and a training step, installed against stock"),
    "gpu": Suite("rotary.lab.bench.gpu:suite", "the Triton kernel against the torch path, torch.compile, Liger-Kernel, "
                 "transformers and flash-attn on CUDA: GB/s of the device's peak; a correctness pass", devices=("cuda",
                 "cpu")),
}


def expand(names: list[str]) -> list[str]:
    """Suite names in registry order, ``all`` (or no name) standing for every suite; KeyError for unknown ones."""
    names = names or ["all"]
    unknown = [n for n in names if n != "all" and n not in SUITES]
    if unknown:
        raise KeyError(f"unknown suite(s) {unknown}; choose from {['all', *SUITES]}")
    return list(SUITES) if "all" in names else [n for n in SUITES if n in names]


def pick_device(name: str, requested: str | None) -> torch.device | None:
    """Where suite ``name`` runs: the requested device (default: cuda when available, else the cpu) if the suite
    runs there, else the first device type it runs on that is present; None if none is."""
    wanted = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    devices = SUITES[name].devices
    if wanted.type in devices:
        return wanted
    for kind in devices:
        if kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()):
            return torch.device(kind)
    return None


def run_suite(name: str, *, quick: bool = False, device: str | None = None, seed: int = 0,
              repeats: int | None = None, log: Callable[[str], None] | None = None, **options) -> list[Row]:
    """Run one suite and judge its rows against the targets table; [] (and one logged line) when it cannot run
    here: no device it supports, or a package it needs is not installed."""
    log = log or _log_warning
    dev = pick_device(name, device)
    if dev is None:
        log(f"skipped suite {name}: needs {' or '.join(SUITES[name].devices)}, none available")
        return []
    if device is not None and dev.type != torch.device(device).type:
        log(f"suite {name} runs on {dev.type} only: measured there")
    try:
        rows = SUITES[name].load()(quick=quick, device=dev, seed=seed, repeats=repeats, log=log, **options)
    except ImportError as e:
        log(f"skipped suite {name}: {e.name or e} not installed; pip install 'rotary[bench]'")
        return []
    return judge(rows)


def _log_warning(line: str) -> None:
    log.warning("%s", line)


def environment(device: str | None = None) -> dict:
    """Date, machine, torch and the packages measured against: what a figure needs to be compared."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs, {platform.machine()}, {platform.system()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("rotary", "rotary-embedding-torch", "transformers", "peft", "torchtune", "openai-whisper"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def to_json(rows: list[Row], env: dict, command: str | None = None) -> dict:
    """The ``--json`` document: the environment, the command, every row (and each target's text)."""
    return {"environment": env, "command": command, "rows": [asdict(r) for r in rows]}
