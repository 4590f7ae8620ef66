"""Training and evaluation of one (task, scheme, seed) run, resumable and data-parallel.

A run's state lives in ``out/checkpoints/<run>.pt`` (written atomically every ``checkpoint_every`` steps) until
it finishes; then its results go to ``out/runs/<run>.json`` (atomically) and the checkpoint is removed. Batches
are a function of (seed, step) and initial weights a function of seed (drawn from a ``torch.Generator``; the
global RNG is never seeded here), so a resumed run trains on exactly the batches it would have seen.

A checkpoint records the run it belongs to and the comparison's settings, and both are checked when it is
loaded: a checkpoint of another run or other settings stops the run with :class:`CompareError`. A checkpoint
that cannot be read (truncated, corrupt) is reported through ``logging`` by name, and that run restarts from
step 0 (its next checkpoint replaces the unreadable file).

Data parallel: under ``torchrun`` every rank takes an equal slice of each global batch; gradients are averaged
by DistributedDataParallel; rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rotary.core.module import Rotary
from rotary.integrations.decoder import Decoder, DecoderConfig
from rotary.lab.experiments.data import Task
from rotary.lab.experiments.schemes import EVAL_SCALINGS, SCALED_SCHEMES, SCHEMES, eval_scaling

log = logging.getLogger(__name__)


class CompareError(ValueError):
    """A bad combination of arguments, outputs or checkpoints; the message is one line for the CLI."""


@dataclass
class TrainConfig:
    """Budget and model size shared by every scheme of one comparison (stored in ``out/config.json``)."""

    steps: int = 300
    batch: int = 32
    length: int = 64  # training sequence length; evaluation at 1x, 2x, 4x, 8x
    eval_factors: tuple[int, ...] = (1, 2, 4, 8)
    eval_batches: int = 4
    eval_every: int = 50
    checkpoint_every: int = 100
    lr: float = 3e-3
    warmup: int = 30
    dims: int = 64
    heads: int = 4
    layers: int = 2


@dataclass
class RunResult:
    task: str
    scheme: str
    seed: int
    steps: int
    params: int
    train_seconds: float
    tokens_per_second: float
    curve: list[tuple[int, float]]  # (step, validation loss at the training length)
    loss: dict[str, float | None] = field(default_factory=dict)  # eval length -> masked loss (None: cannot)
    accuracy: dict[str, float | None] = field(default_factory=dict)
    # evaluation-time context extension: scaling name -> eval length -> (loss, accuracy)
    scaled: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    note: str | None = None


def run_name(task: str, scheme: str, seed: int) -> str:
    return f"{task}-{scheme}-seed{seed}"


def build_model(task: Task, scheme: str, cfg: TrainConfig, generator: torch.Generator) -> Decoder:
    """The run's decoder, its random weights drawn from ``generator`` (see :func:`init_weights`)."""
    longest = cfg.length * max(cfg.eval_factors)
    overrides = dict(SCHEMES[scheme])
    # the learned table only covers what training saw; sinusoids are a fixed function, so they cover evaluation too
    ctx = cfg.length if overrides["positional"] == "learned" else longest
    model = Decoder(DecoderConfig(vocab=task.vocab, ctx=ctx, dims=cfg.dims, heads=cfg.heads, layers=cfg.layers,
                                  **overrides))
    init_weights(model, generator)
    return model


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Redraw every randomly initialised parameter of a reference decoder from ``generator`` (a CPU generator;
    the model must be on the CPU), with the distributions its constructors use: PyTorch's default for
    ``nn.Linear`` (uniform in +-1/sqrt(fan_in), weight and bias), GPT-2's normals for the tables (std 0.02 for
    token embeddings, 0.01 for a learned positional table). The other parameters start deterministic (LayerNorm
    ones and zeros, mixing and frequency parameters at the identity) and are left alone. The run's seed alone
    then decides its initial weights, without seeding the global RNG."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)), nn.Linear's own default
            nn.init.uniform_(module.weight, -bound, bound, generator=generator)
            if module.bias is not None:
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02, generator=generator)
    table = getattr(model, "positional_embedding", None)
    if isinstance(table, nn.Parameter):
        nn.init.normal_(table, std=0.01, generator=generator)


def warmup_cosine(step: int, steps: int, lr: float, warmup: int) -> float:
    """The learning rate at ``step``: linear warm-up, then cosine decay to a tenth of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _masked_loss_sum(logits, targets, mask):
    """Summed cross-entropy over the positions ``mask`` selects."""
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return (losses * mask).sum()


@torch.no_grad()
def evaluate(model: Decoder, task: Task, seed: int, length: int, batches: int, batch: int,
             device) -> tuple[float, float]:
    """Masked validation loss and accuracy at ``length`` on fixed validation batches."""
    model.eval()
    total_loss = total_correct = total = 0.0
    for k in range(batches):
        tokens, targets, mask = (t.to(device) for t in task.batch("val", seed, k, batch, length))
        logits = model(tokens)
        total_loss += float(_masked_loss_sum(logits, targets, mask))
        total_correct += float(((logits.argmax(-1) == targets) & mask).sum())
        total += float(mask.sum())
    model.train()
    return total_loss / total, total_correct / total


def _scaled_copy(rotary: Rotary, scaling: dict) -> Rotary:
    """The same trained Rotary (parameters and all) with a frequency-scaling scheme added."""
    scaled = Rotary(rotary.dims, rotary.heads, base=rotary.base, mixing=rotary.options.mixing,
                    interleaved=rotary.interleaved, rotary_dim=rotary.rotary_dim,
                    learned_freq=rotary.angles.log_freq_scale is not None, scaling=scaling)
    scaled.load_state_dict(rotary.state_dict())
    return scaled.to(rotary.angles.cos_table.device)


def evaluate_scaled(model: Decoder, task: Task, seed: int, cfg: TrainConfig, device) -> dict:
    """Loss and accuracy past the training length with each evaluation-time scaling scheme swapped in."""
    original = model.rotary
    out: dict = {}
    try:
        for name in EVAL_SCALINGS:
            out[name] = {}
            for factor in (f for f in cfg.eval_factors if f > 1):
                model.rotary = _scaled_copy(original, eval_scaling(name, factor, cfg.length))
                out[name][f"{factor}x"] = evaluate(model, task, seed, cfg.length * factor, cfg.eval_batches,
                                                   max(1, cfg.batch // factor), device)
    finally:
        model.rotary = original
    return out


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_json(obj, path: Path) -> None:
    """Write ``obj`` as JSON to ``path`` so that a reader (or a crash) never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_settings(cfg: TrainConfig) -> dict:
    """The settings a run checks its checkpoint against when it is trained alone (not by ``run_comparison``)."""
    return json.loads(json.dumps({"train": asdict(cfg)}))


def _load_checkpoint(path: Path, name: str, settings: dict, device) -> dict | None:
    """The checkpoint's state if it can continue run ``name`` under ``settings``; None if there is none or it is
    unreadable (warned); CompareError if it belongs to another run or other settings."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        missing = {"run", "settings", "model", "optimizer", "step", "elapsed", "curve"} - set(state)
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))}")
    except Exception as e:  # torch.load's failures on a bad file are of many types (zip, pickle, EOF, OS)
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        log.warning("checkpoint %s cannot be read (%s): run %s restarts from step 0", path, reason, name)
        return None
    if state["run"] != name or state["settings"] != settings:
        what = f"run {state['run']}" if state["run"] != name else "a comparison with other settings"
        raise CompareError(f"checkpoint {path} belongs to {what}: delete it, or choose another --out")
    return state


def resume(ckpt_path: Path, name: str, settings: dict, device, model: nn.Module,
           opt: torch.optim.Optimizer) -> tuple[int, float, list]:
    """Load a run's checkpoint into ``model`` and ``opt`` if there is one; ``(step, elapsed, curve)`` to go on
    from (zeros for a fresh run). Checks as :func:`_load_checkpoint`."""
    state = _load_checkpoint(ckpt_path, name, settings, device)
    if state is None:
        return 0, 0.0, []
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return state["step"], state["elapsed"], [tuple(p) for p in state["curve"]]


def train_run(task: Task, scheme: str, seed: int, cfg: TrainConfig, out: Path, *, device, settings=None,
              on_step=None, on_trained=None, interrupt_after: int | None = None) -> RunResult | None:
    """Train one run to ``cfg.steps`` (resuming from its checkpoint if present); None if interrupted.

    settings: the comparison's settings (JSON-like), recorded in the checkpoints and checked when one is loaded;
    default :func:`run_settings`. on_step: called after each optimizer step (progress display). on_trained:
    called with the model on every rank once training ends (the data-parallel test inspects parameters).
    interrupt_after: stop, as if killed, after this many steps in this call (tests use it to exercise
    ``--resume``).
    """
    rank, world = rank_and_world()
    if cfg.batch % world:
        raise ValueError(f"batch {cfg.batch} must be divisible by the number of processes {world}")
    name = run_name(task.name, scheme, seed)
    ckpt_path = out / "checkpoints" / f"{name}.pt"
    settings = run_settings(cfg) if settings is None else settings
    model = build_model(task, scheme, cfg, torch.Generator().manual_seed(seed)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, elapsed, curve = resume(ckpt_path, name, settings, device, model, opt)
    trained = model
    if world > 1:
        # buffers are deterministic (cos/sin tables); rank 0 alone grows them while evaluating longer sequences
        trained = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    rows = slice(rank * cfg.batch // world, (rank + 1) * cfg.batch // world)
    done_here = 0

    def save_checkpoint():
        _atomic_save({"run": name, "settings": settings, "model": model.state_dict(), "optimizer": opt.state_dict(),
                      "step": step, "elapsed": elapsed, "curve": curve}, ckpt_path)

    while step < cfg.steps:
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup)
        tokens, targets, mask = (t[rows].to(device) for t in task.batch("train", seed, step, cfg.batch, cfg.length))
        loss = _masked_loss_sum(trained(tokens), targets, mask) / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        done_here += 1
        elapsed += time.perf_counter() - start
        if rank == 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            curve.append((step, evaluate(model, task, seed, cfg.length, 1, cfg.batch, device)[0]))
        if rank == 0 and (step % cfg.checkpoint_every == 0 and step < cfg.steps):
            save_checkpoint()
        if on_step:
            on_step()
        if interrupt_after is not None and done_here >= interrupt_after and step < cfg.steps:
            if rank == 0:
                save_checkpoint()
            return None
    if on_trained:
        on_trained(model)
    result = None
    if rank == 0:
        result = RunResult(task=task.name, scheme=scheme, seed=seed, steps=step,
                           params=sum(p.numel() for p in model.parameters()), train_seconds=elapsed,
                           tokens_per_second=step * cfg.batch * cfg.length / max(elapsed, 1e-9), curve=curve)
        for factor in cfg.eval_factors:
            length = cfg.length * factor
            key = f"{factor}x"
            if model.config.positional in ("learned", "sinusoidal") and length > model.config.ctx:
                result.loss[key] = result.accuracy[key] = None
                result.note = f"its table ends at {model.config.ctx} positions"
                continue
            result.loss[key], result.accuracy[key] = evaluate(model, task, seed, length, cfg.eval_batches,
                                                              max(1, cfg.batch // factor), device)
        if scheme in SCALED_SCHEMES:
            result.scaled = evaluate_scaled(model, task, seed, cfg, device)
        atomic_json(asdict(result), out / "runs" / f"{name}.json")
        if ckpt_path.exists():
            ckpt_path.unlink()
    if world > 1:
        dist.barrier()
    return result

