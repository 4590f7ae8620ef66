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


def pose_positions(seed: int, step: int, batch: int, length: int, span: int) -> Tensor:
    """PoSE's skipped positions (Zhu et al., 2024): ``(B, length)`` long, each row a window of ``length`` tokens cut
    in two chunks at a random point, the second moved forward by a random skip, so that short windows carry the
    relative distances of a ``span``-token context. Row b: ``arange(length) + skip_b * (arange(length) >= cut_b)``
    with ``cut_b`` uniform in ``[1, length)`` and ``skip_b`` uniform in ``[0, span - length]``: strictly increasing,
    starting at 0, at most ``span - 1`` (reached when the skip is the largest). A pure function of (seed, step)."""
    if span < length or length < 2:
        raise ValueError(f"PoSE needs 2 <= length <= span, got length {length}, span {span}")
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 2 + 7_919)  # not the batches' own stream
    cut = torch.randint(1, length, (batch, 1), generator=g)
    skip = torch.randint(0, span - length + 1, (batch, 1), generator=g)
    steps = torch.arange(length)
    return steps + skip * (steps >= cut)  # (B, length)


# The retrieval probe: a key of KEY random capital letters followed by VALUE more, early in a text window; at its
# end the key again, and the model must continue with the value. Capital runs of 4 are rare in the corpus, so the
# key is unique in the window and only copying from the early occurrence predicts the value (an induction head).
RETRIEVAL_KEY, RETRIEVAL_VALUE = 4, 4
RETRIEVAL_MIN_LENGTH = 2 * (RETRIEVAL_KEY + RETRIEVAL_VALUE) + 1


def with_probes(tokens: Tensor, targets: Tensor, seed: int, step: int, share: float) -> tuple[Tensor, Tensor]:
    """A training batch ``(tokens, targets)`` ``(B, L)`` in which a ``share`` of the rows (drawn per row) hold a key
    and value of ``KEY + VALUE`` random capital letters and, later in the window, the same letters again, both at
    random places: the copying that the retrieval probe asks for, at the distances a window of L allows. Rows
    shorter than two copies are left alone. A pure function of (seed, step); the inputs are not changed."""
    B, L = tokens.shape
    n = RETRIEVAL_KEY + RETRIEVAL_VALUE
    window = torch.cat([tokens, targets[:, -1:]], dim=1)  # (B, L + 1)
    if 2 * n > L + 1 or share <= 0:
        return tokens, targets
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 2 + 104_729)
    letters = torch.randint(ord("A"), ord("Z") + 1, (B, n), generator=g)
    chosen = torch.rand(B, generator=g) < share
    first = (torch.rand(B, generator=g) * (L + 2 - 2 * n)).long()  # uniform in [0, L + 1 - 2n]
    second = first + n + (torch.rand(B, generator=g) * (L + 2 - 2 * n - first)).long()  # in [first + n, L + 1 - n]
    for b in chosen.nonzero().flatten().tolist():
        window[b, first[b] : first[b] + n] = letters[b]
        window[b, second[b] : second[b] + n] = letters[b]
    return window[:, :-1], window[:, 1:]


def retrieval_batch(task: TextTask, seed: int, step: int, batch: int, length: int
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(tokens, targets, mask, where)`` of the retrieval probe at ``length`` tokens, from validation windows.

    Each row: a validation window (the text task's validation batch ``step`` of a stream of its own) with the key
    and value written at ``where`` (``(B,)``, uniform in ``[0, length // 8]``, at most ``length -
    RETRIEVAL_MIN_LENGTH + 1``), and the key then the value as the window's last ``KEY + VALUE`` tokens (the value's
    last letter is the last target). ``mask`` selects the VALUE targets of the final copy: a correct prediction
    there needs the key-value pair seen ``length - KEY - VALUE - where`` tokens earlier."""
    if length < RETRIEVAL_MIN_LENGTH:
        raise ValueError(f"the retrieval probe needs at least {RETRIEVAL_MIN_LENGTH} tokens, got {length}")
    n = RETRIEVAL_KEY + RETRIEVAL_VALUE
    tokens, targets, _ = task.batch("val", seed, 1_000_000 + step, batch, length)
    window = torch.cat([tokens, targets[:, -1:]], dim=1)  # (B, length + 1)
    g = _generator(seed, 1_000_000 + step, "val")
    letters = torch.randint(ord("A"), ord("Z") + 1, (batch, n), generator=g)  # (B, KEY + VALUE)
    where = torch.randint(0, min(length // 8, length + 1 - RETRIEVAL_MIN_LENGTH) + 1, (batch,), generator=g)
    rows = torch.arange(batch)[:, None]
    window[rows, where[:, None] + torch.arange(n)] = letters
    window[:, length + 1 - n :] = letters
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, length - RETRIEVAL_VALUE :] = True  # targets length - VALUE + 1 .. length of the window: the value
    return window[:, :-1], window[:, 1:], mask, where


TASKS = ("text", "lookback", "copy")


def make_task(name: str, data: str | None = None) -> Task:
    if name == "text":
        return TextTask(*read_corpus(data))
    if name == "lookback":
        return LookbackTask()
    if name == "copy":
        return CopyTask()
    raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
