"""2-D tasks for `rotary compare`: a sequence of tokens laid out on a side x side grid, one label per sequence.

Shapes: B batch, S side, L = S * S tokens in row-major order (token ``i`` sits at row ``i // S``, column ``i % S``).
A batch is ``(tokens, labels, mask)``: tokens ``(B, L)`` long; labels ``(B,)`` long for a label per image
(``mask`` None), or ``(B, L)`` with ``mask`` ``(B, L)`` bool for a label per token scored where the mask is
set. Every batch is a pure function of
``(seed, step)`` (training) or of the validation batch index and the side (evaluation), as in
:mod:`rotary.lab.experiments.data`.

- ``grid``: one cell holds the marker A, the others random noise symbols; every cell answers "am I on one of
  the two diagonals through A (``|dr| == |dc| > 0``)?", scored on the diagonal cells and on their near misses
  (``||dr| - |dc|| == 1``), with balanced accuracy (the mean of the two classes' accuracies: chance is 50%). The
  answer is a relation between the axes that does not split into a row part plus a column part. Trained on
  8 x 8, evaluated on 12 x 12 and 16 x 16 as well (more and longer offsets than training saw).
- ``digits``: scikit-learn's bundled 8 x 8 handwritten digits (1797 images, no download), each pixel a token of
  its intensity (0..16). Evaluated on held-out images at 8 x 8 and, upsampled bilinearly, at 12 x 12 and 16 x 16:
  resolutions the model never saw. There positions are the pixel centres in units of the training grid,
  ``(i + 0.5) * 8 / S - 0.5`` (float positions: the same image, sampled more finely), as a ViT's position table
  is resized; the grid task keeps integer positions (a larger board, the same spacing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TASKS_2D", "DiagonalTask", "DigitsTask", "GridTask", "make_grid_task"]

TASKS_2D = ("grid", "digits")


def _generator(seed: int, step: int, split: str) -> torch.Generator:
    salt = {"train": 0, "val": 1}[split]
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 2 + salt + 7_919)  # apart from the 1-D tasks'


class GridTask:
    """A 2-D classification task: ``side`` is the training side, ``eval_sides`` the sides it is evaluated at."""

    axes = 2
    metric = "accuracy"

    def __init__(self, name: str, vocab: int, classes: int, description: str, side: int = 8,
                 eval_sides: tuple[int, ...] = (8, 12, 16)):
        self.name, self.vocab, self.classes, self.description = name, vocab, classes, description
        self.side, self.eval_sides = side, eval_sides

    per_token = False  # one label per token (with a mask) rather than per image
    step_factor = 1  # this task trains for step_factor x the comparison's 2-D steps

    def batch(self, split: str, seed: int, step: int, batch: int, side: int) -> tuple[Tensor, Tensor, Tensor | None]:
        raise NotImplementedError

    def positions(self, side: int) -> Tensor:
        """``(side * side, 2)`` (row, column) of each token, row-major: integer cells."""
        r = torch.arange(side)
        return torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).view(-1, 2)

    def val_batches(self, side: int, batches: int, batch: int, seed: int):
        """The fixed validation batches at ``side``."""
        for k in range(batches):
            yield self.batch("val", seed, k, batch, side)


class DiagonalTask(GridTask):
    """Which cells lie on a diagonal through A? See the module docstring."""

    per_token = True

    def __init__(self, noise: int = 6, side: int = 8, eval_sides: tuple[int, ...] = (8, 12, 16)):
        super().__init__("grid", noise + 1, 2, f"every cell: am I on a diagonal through the marked cell? "
                         f"({side}x{side} grid of {noise} noise symbols; scored on diagonal cells and near misses, "
                         f"balanced accuracy; evaluated at sides {', '.join(map(str, eval_sides))})",
                         side, eval_sides)
        self.noise = noise

    def batch(self, split, seed, step, batch, side):
        gen = _generator(seed, step, split)
        L = side * side
        tokens = torch.randint(0, self.noise, (batch, L), generator=gen)
        a = torch.randint(0, L, (batch,), generator=gen)
        tokens[torch.arange(batch), a] = self.noise  # the marker A
        cells = torch.arange(L)
        dr = (cells // side).unsqueeze(0) - (a // side).unsqueeze(1)  # (B, L)
        dc = (cells % side).unsqueeze(0) - (a % side).unsqueeze(1)
        gap = (dr.abs() - dc.abs()).abs()
        labels = ((gap == 0) & (dr != 0)).long()
        mask = labels.bool() | (gap == 1)
        return tokens, labels, mask


class DigitsTask(GridTask):
    """scikit-learn's 8 x 8 digits, pixels as tokens; a fixed split of 1437 training and 360 held-out images.
    Relative schemes learn it more slowly than the grid task: it trains twice as many steps."""

    step_factor = 2

    def __init__(self, eval_sides: tuple[int, ...] = (8, 12, 16)):
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        super().__init__("digits", 17, 10, "scikit-learn's 8x8 digits, one token per pixel intensity (0..16); "
                         f"held-out images evaluated at {', '.join(f'{s}x{s}' for s in eval_sides)} "
                         "(bilinear upsampling)", 8, eval_sides)
        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32)  # (1797, 8, 8), values 0..16
        labels = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # one split for all runs
        cut = len(labels) - 360
        self.images = {"train": images[order[:cut]], "val": images[order[cut:]]}
        self.labels = {"train": labels[order[:cut]], "val": labels[order[cut:]]}

    def positions(self, side: int) -> Tensor:
        """Pixel centres in training-grid units: integers at 8 x 8, fractions at finer resolutions."""
        if side == self.side:
            return super().positions(side)
        r = (torch.arange(side, dtype=torch.float32) + 0.5) * (self.side / side) - 0.5
        return torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).view(-1, 2)

    def _tokens(self, images: Tensor, side: int) -> Tensor:
        if side != images.shape[-1]:
            images = F.interpolate(images.unsqueeze(1), size=(side, side), mode="bilinear", align_corners=False)
            images = images.squeeze(1)
        return images.round().clamp(0, 16).long().flatten(1)  # (B, side * side)

    def batch(self, split, seed, step, batch, side):
        if split == "train":
            index = torch.randint(0, len(self.labels["train"]), (batch,), generator=_generator(seed, step, split))
        else:  # validation: consecutive held-out images, the same for every run
            n = len(self.labels["val"])
            index = torch.arange(step * batch, (step + 1) * batch) % n
        return self._tokens(self.images[split][index], side), self.labels[split][index], None

    def val_batches(self, side, batches, batch, seed):
        n = len(self.labels["val"])  # all held-out images, once each, whatever ``batches`` says
        for start in range(0, n, batch):
            index = torch.arange(start, min(n, start + batch))
            yield self._tokens(self.images["val"][index], side), self.labels["val"][index], None


def make_grid_task(name: str) -> GridTask:
    if name == "grid":
        return DiagonalTask()
    if name == "digits":
        return DigitsTask()
    raise ValueError(f"unknown 2-D task {name!r}; choose from {TASKS_2D}")
