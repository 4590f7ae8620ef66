"""A small bidirectional transformer classifier over 2-D-positioned tokens, and one (task, scheme, seed) run of it.

Shapes: B batch, S side, L = S * S tokens (row-major), E width, H heads, D head_dim, C classes.

The model: token embedding (+ a learned S0 x S0 table for "learned-2d") -> pre-LayerNorm blocks (full, not causal,
self-attention with one shared 2-D :class:`rotary.Rotary` on q and k; GELU MLP) -> LayerNorm -> mean over
tokens (one label per image; skipped for a label per token) -> linear head. Positions are the task's (row, column)
of each token (:meth:`rotary.lab.experiments.grid.GridTask.positions`). The learned table is defined on the training
side S0; at other sides it is resized bilinearly (what ViTs do when fine-tuning at a new resolution).

A run trains for ``steps`` AdamW steps (warm-up, cosine decay) on batches that are a function of (seed, step),
initial weights drawn from a generator seeded with the run's seed, then evaluates accuracy at every evaluation
side and writes ``out/runs/<run>.json`` atomically. Runs take seconds: a run that was interrupted starts again
(the comparison skips runs whose result exists), so there are no mid-run checkpoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rotary import Rotary
from rotary.lab.experiments.grid import GridTask
from rotary.lab.experiments.schemes import SCHEMES_2D
from rotary.lab.experiments.train import RunResult, atomic_json, run_name, warmup_cosine

__all__ = ["QUICK_2D", "GridClassifier", "GridConfig", "evaluate", "train_run"]



@dataclass
class GridConfig:
    """Budget and model of the 2-D runs (stored in ``out/config.json`` with the comparison's settings)."""

    steps: int = 200  # of the grid task; digits trains DigitsTask.step_factor times as many
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 30
    dims: int = 48
    heads: int = 4
    layers: int = 2
    mlp: int = 2  # MLP width / model width
    base: float = 100.0  # RoPE base: positions here are below 16, 10000 would leave most pairs idle
    eval_batches: int = 8
    eval_every: int = 50


QUICK_2D = GridConfig(steps=20, batch=8, dims=16, heads=2, layers=1, eval_batches=1, eval_every=10, warmup=5)


class _Block(nn.Module):
    def __init__(self, dims: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dims), nn.LayerNorm(dims)
        self.qkv = nn.Linear(dims, 3 * dims)
        self.proj = nn.Linear(dims, dims)
        self.mlp = nn.Sequential(nn.Linear(dims, mlp * dims), nn.GELU(), nn.Linear(mlp * dims, dims))

    def forward(self, x: Tensor, rotary: Rotary | None, positions: Tensor) -> Tensor:
        B, L, E = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, E // self.heads).unbind(2)  # (B, L, H, D)
        if rotary is not None:
            q, k = rotary.rotate_qk(q, k, positions=positions, layout="BTHD")
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, L, D)
        x = x + self.proj(att.transpose(1, 2).reshape(B, L, E))
        return x + self.mlp(self.ln2(x))


class GridClassifier(nn.Module):
    """See the module docstring. ``side``: the training side (the learned table's size)."""

    def __init__(self, vocab: int, classes: int, scheme: str, cfg: GridConfig, side: int, per_token: bool = False):
        super().__init__()
        self.per_token = per_token
        if scheme not in SCHEMES_2D:
            raise ValueError(f"unknown 2-D scheme {scheme!r}; choose from {', '.join(SCHEMES_2D)}")
        self.scheme, self.side = scheme, side
        self.embed = nn.Embedding(vocab, cfg.dims)
        self.table = nn.Parameter(torch.zeros(side, side, cfg.dims)) if scheme == "learned-2d" else None
        kwargs = SCHEMES_2D[scheme]
        self.rotary = None if kwargs is None else Rotary(cfg.dims, cfg.heads, axes=2, base=cfg.base, **kwargs)
        self.blocks = nn.ModuleList(_Block(cfg.dims, cfg.heads, cfg.mlp) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.dims)
        self.head = nn.Linear(cfg.dims, classes)

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens ``(B, S * S)`` at positions ``(S * S, 2)`` -> logits ``(B, C)``, or ``(B, S * S, C)`` per token."""
        side = math.isqrt(tokens.shape[1])
        x = self.embed(tokens)  # (B, L, E)
        if self.table is not None:
            table = self.table
            if side != self.side:  # (S0, S0, E) -> (S, S, E)
                table = F.interpolate(table.permute(2, 0, 1).unsqueeze(0), size=(side, side), mode="bilinear",
                                      align_corners=False).squeeze(0).permute(1, 2, 0)
            x = x + table.reshape(side * side, -1)
        positions = positions.to(tokens.device)
        for block in self.blocks:
            x = block(x, self.rotary, positions)
        x = self.ln(x)
        return self.head(x if self.per_token else x.mean(1))


@torch.no_grad()
def init_weights(model: GridClassifier, generator: torch.Generator) -> None:
    """Random weights from ``generator`` alone (PyTorch's nn.Linear default, GPT-2's 0.02 normal for the
    embedding, 0.02 for the table); LayerNorm and the rotary parameters keep their deterministic initialisation."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            bound = 1 / math.sqrt(module.in_features)
            nn.init.uniform_(module.weight, -bound, bound, generator=generator)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02, generator=generator)
    if model.table is not None:
        nn.init.normal_(model.table, std=0.02, generator=generator)


def _loss(logits: Tensor, labels: Tensor, mask: Tensor | None, reduction: str = "mean") -> Tensor:
    """Cross-entropy over the images, or over the tokens the mask selects."""
    if mask is not None:
        logits, labels = logits[mask], labels[mask]
    return F.cross_entropy(logits, labels, reduction=reduction)


@torch.no_grad()
def evaluate(model: GridClassifier, task: GridTask, side: int, seed: int, cfg: GridConfig,
             device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the task's validation batches at ``side``; for a label per token,
    balanced accuracy (the mean over classes of each class's accuracy, so that chance is 1 / classes)."""
    model.eval()
    loss = total = 0.0
    correct = torch.zeros(task.classes, dtype=torch.float64)
    count = torch.zeros(task.classes, dtype=torch.float64)
    for tokens, labels, mask in task.val_batches(side, cfg.eval_batches, 2 * cfg.batch, seed):
        tokens, labels = tokens.to(device), labels.to(device)
        logits = model(tokens, task.positions(side))
        if mask is not None:
            mask = mask.to(device)
            logits, labels = logits[mask], labels[mask]
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        total += len(labels)
        hit = (logits.argmax(-1) == labels).double().cpu()
        correct += torch.zeros_like(correct).index_add_(0, labels.cpu(), hit)
        count += torch.bincount(labels.cpu(), minlength=task.classes).double()
    model.train()
    if task.per_token:
        accuracy = float((correct / count.clamp_min(1))[count > 0].mean())
    else:
        accuracy = float(correct.sum() / total)
    return loss / total, accuracy


def side_key(side: int, train_side: int) -> str:
    return f"{side / train_side:g}x"


def train_run(task: GridTask, scheme: str, seed: int, cfg: GridConfig, out: Path, *, device="cpu",
              on_step=None) -> RunResult:
    """Train and evaluate one run, write ``out/runs/<run>.json``; see the module docstring."""
    model = GridClassifier(task.vocab, task.classes, scheme, cfg, task.side, per_token=task.per_token)
    init_weights(model, torch.Generator().manual_seed(seed))
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    curve, elapsed = [], 0.0
    positions = task.positions(task.side)
    steps = cfg.steps * task.step_factor
    for step in range(steps):
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, steps, cfg.lr, cfg.warmup)
        tokens, labels, mask = task.batch("train", seed, step, cfg.batch, task.side)
        mask = None if mask is None else mask.to(device)
        loss = _loss(model(tokens.to(device), positions), labels.to(device), mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed += time.perf_counter() - start
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, evaluate(model, task, task.side, seed, cfg, device)[0]))
        if on_step:
            on_step()
    result = RunResult(task=task.name, scheme=scheme, seed=seed, steps=steps,
                        params=sum(p.numel() for p in model.parameters()), train_seconds=elapsed,
                        tokens_per_second=steps * cfg.batch * task.side ** 2 / max(elapsed, 1e-9), curve=curve)
    for side in task.eval_sides:
        key = side_key(side, task.side)
        result.loss[key], result.accuracy[key] = evaluate(model, task, side, seed, cfg, device)
    atomic_json(asdict(result), Path(out) / "runs" / f"{run_name(task.name, scheme, seed)}.json")
    return result


def settings_2d(cfg: GridConfig) -> dict:
    return asdict(cfg)
