"""Data for `rotary compare`: a byte-level corpus and two generated tasks that need position information.

Every batch is a pure function of ``(seed, step)``: no sampler state, so a resumed run sees exactly the batches
an uninterrupted one would, and data-parallel ranks slice one global batch.

Shapes: B batch, L sequence length. A batch is ``(tokens, targets, mask)``: tokens ``(B, L)`` long, targets
``(B, L)`` long (the token to predict at each position), mask ``(B, L)`` bool (positions that count).
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

CORPUS_BYTES = 3_000_000  # of the default corpus; 90% train, 10% validation
MIN_CORPUS_BYTES = 20_000


class DataError(ValueError):
    """Bad ``--data``: unreadable, empty or too short. The message is one line for the CLI."""


def stdlib_corpus(limit: int = CORPUS_BYTES) -> tuple[bytes, str]:
    """The default corpus: the running interpreter's own standard library source, needing no download.

    The top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]`` in sorted name order, concatenated,
    cut at ``limit`` bytes. Deterministic for a given Python version (3.11 and 3.12 ship different files).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    text = b"".join(chunks)[:limit]
    return text, f"Python {sysconfig.get_python_version()} standard library ({len(text):,} bytes from {root})"


def read_corpus(path: str | None) -> tuple[bytes, str]:
    """``--data``: a text file, or a folder whose files are read recursively in sorted order."""
    if path is None:
        return stdlib_corpus()
    p = Path(path)
    try:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        text = b"".join(f.read_bytes() for f in files)[:CORPUS_BYTES * 10]
    except OSError as e:
        raise DataError(f"cannot read --data {path}: {e.strerror or e}") from None
    if len(text) < MIN_CORPUS_BYTES:
        raise DataError(f"--data {path} has {len(text):,} bytes; at least {MIN_CORPUS_BYTES:,} are needed")
    return text, f"{path} ({len(text):,} bytes)"


@dataclass
class Task:
    """A training task: its vocabulary and a batch function ``batch(split, seed, step, B, L)``."""

    name: str
    vocab: int
    metric: str  # "loss" (language modelling) or "accuracy" (generated tasks)
    description: str

    def batch(self, split: str, seed: int, step: int, batch: int, length: int) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError


def _generator(seed: int, step: int, split: str) -> torch.Generator:
    salt = {"train": 0, "val": 1}[split]
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 2 + salt)


class TextTask(Task):
    """Next-byte prediction on a corpus; validation windows come from its last 10%."""

    def __init__(self, text: bytes, description: str):
        super().__init__("text", 256, "loss", f"next-byte prediction on {description}")
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        cut = int(len(data) * 0.9)
        self.splits = {"train": data[:cut], "val": data[cut:]}

    def batch(self, split, seed, step, batch, length):
        data = self.splits[split]
        if len(data) <= length + 1:
            raise DataError(f"the {split} split has {len(data)} bytes, fewer than a window of {length + 1}")
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=_generator(seed, step, split))
        windows = torch.stack([data[s : s + length + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:], torch.ones(batch, length, dtype=torch.bool)


class LookbackTask(Task):
    """Random symbols; at every position predict the symbol ``lag`` places back. Purely positional: a relative
    encoding solves it at any length, an absolute one only where it was trained."""

    def __init__(self, symbols: int = 32, lag: int = 8):
        super().__init__("lookback", symbols, "accuracy", f"predict the symbol {lag} places back ({symbols} symbols)")
        self.lag = lag

    def batch(self, split, seed, step, batch, length):
        tokens = torch.randint(0, self.vocab, (batch, length), generator=_generator(seed, step, split))
        targets = torch.roll(tokens, self.lag, dims=1)
        mask = torch.zeros(batch, length, dtype=torch.bool)
        mask[:, self.lag :] = True
        return tokens, targets, mask


class CopyTask(Task):
    """A random half-sequence, then the same again: predict the repeat. At the training length the copy source
    is always the same distance back, so attending by relative position solves it; at longer evaluation lengths
    the distance grows with the sequence, and only content-based copying (an induction head) still works. It
    shows which schemes learned the shortcut (with this budget: all of them)."""

    def __init__(self, symbols: int = 32):
        super().__init__("copy", symbols, "accuracy", f"repeat a random half-sequence ({symbols} symbols)")

    def batch(self, split, seed, step, batch, length):
        period = (length + 2) // 2
        first = torch.randint(0, self.vocab, (batch, period), generator=_generator(seed, step, split))
        seq = torch.cat([first, first], dim=1)[:, : length + 1]  # (B, L + 1)
        mask = torch.zeros(batch, length, dtype=torch.bool)
        mask[:, period:] = True  # from here the current symbol is a repeat: its successor is known
        return seq[:, :-1], seq[:, 1:], mask


TASKS = ("text", "lookback", "copy")


def make_task(name: str, data: str | None = None) -> Task:
    if name == "text":
        return TextTask(*read_corpus(data))
    if name == "lookback":
        return LookbackTask()
    if name == "copy":
        return CopyTask()
    raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
