"""`rotary compare --tasks extend`: can learned rotary parameters alone extend a pretrained model's context?

Per seed, one small reference decoder is pretrained on the text corpus at length L with plain RoPE: its Givens P
and learned frequencies are present but frozen at the identity, so every variant starts from the same plain-RoPE
model. Each variant (:mod:`rotary.lab.experiments.extend_variants`) then fine-tunes that model at ``factor`` x L,
with every pretrained weight frozen except those the variant names, on the same batches, steps and schedule, and
is evaluated at 1x, ``factor`` x and 2 ``factor`` x L (default 1x, 4x, 8x). Zero-shot variants (the model as it
is; NTK-aware and YaRN scaling at ``factor``, the library's own ``scaling=`` set on the Rotary) train nothing.
The report: :mod:`rotary.lab.experiments.extend_report`.

The folder (see :mod:`rotary.lab.experiments.compare` for its rules): a pretraining run checkpoints in
``checkpoints/extend-pretrain-seed<s>.pt`` (resumable like every run), then its model goes to
``pretrained/extend-<key>-seed<s>.pt``, where ``key`` is a hash of the pretraining settings that the file also
records and that are checked when it is loaded. A fine-tuning run checkpoints in
``checkpoints/extend-<variant>-seed<s>.pt`` and writes ``runs/extend-<variant>-seed<s>.json``. Every file is
written atomically; batches are a function of (seed, step) and LoRA's initial A a function of the seed, so a run
resumed after a kill (at any point) equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from rotary.integrations.decoder import Decoder, DecoderConfig
from rotary.lab.experiments.data import TextTask
from rotary.lab.experiments.extend_variants import VARIANTS, build_variant
from rotary.lab.experiments.train import (
    CompareError,
    _atomic_save,
    _masked_loss_sum,
    atomic_json,
    evaluate,
    init_weights,
    resume,
    warmup_cosine,
)

__all__ = ["DESCRIPTION", "MAX_LENGTH", "QUICK_EXTEND", "ExtendConfig", "check", "finetune_run", "pending_steps",
           "pretrain", "pretrained_path", "run_extend", "run_name"]

log = logging.getLogger(__name__)

# The longest sequence this experiment evaluates (2 x factor x L). The decoder's RoPE has no table limit, but
# attention costs grow as the square of the length: at 4096 tokens one evaluation batch of this model already
# takes seconds on a CPU core, and the budget holds 13 variants x 3 lengths x seeds of them.
MAX_LENGTH = 4096

DESCRIPTION = ("pretrain at L on the text corpus, then train only the rotary (or another small part) at a longer "
               "length, against zero-shot scaling")


@dataclass
class ExtendConfig:
    """Model, pretraining and fine-tuning budget of the extend task (stored in ``out/config.json``)."""

    length: int = 32  # L, the pretraining length
    factor: int = 4  # fine-tuning at factor x L; evaluation at 1x, factor x and 2 factor x L
    seeds: int = 3
    dims: int = 64
    heads: int = 4
    layers: int = 2
    pretrain_steps: int = 800
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 40
    steps: int = 150  # fine-tuning steps of every trained variant
    batch: int = 16  # fine-tuning sequences of factor x L tokens
    # peak learning rates, each the best at 4x L of a sweep on seed 100, which no report uses (docs/results.md)
    lr: float = 3e-3  # weight matrices (wqk, all)
    adapter_lr: float = 1e-1  # LayerNorm gains, biases, LoRA
    rotary_lr: float = 1e-1  # P's angles and the log frequency scales
    warmup: int = 15
    lora_rank: int = 1
    eval_batches: int = 8
    eval_batch: int = 32  # sequences per evaluation batch at 1x L; divided by the length factor beyond
    eval_every: int = 50
    checkpoint_every: int = 50

    @property
    def eval_factors(self) -> tuple[int, ...]:
        return 1, self.factor, 2 * self.factor


QUICK_EXTEND = ExtendConfig(length=16, seeds=1, dims=32, heads=2, layers=1, pretrain_steps=30, pretrain_batch=8,
                            pretrain_warmup=5, steps=10, batch=4, warmup=2, eval_batches=1, eval_batch=8,
                            eval_every=5, checkpoint_every=5)


def run_name(variant: str, seed: int) -> str:
    return f"extend-{variant}-seed{seed}"


def pretrain_settings(cfg: ExtendConfig, data: str | None) -> dict:
    """What a pretrained model depends on: its file is keyed by (and records) these."""
    fields = ("length", "dims", "heads", "layers", "pretrain_steps", "pretrain_batch", "pretrain_lr",
              "pretrain_warmup")
    return {"data": data, **{f: getattr(cfg, f) for f in fields}}


def pretrained_path(out: Path, cfg: ExtendConfig, data: str | None, seed: int) -> Path:
    key = hashlib.sha256(json.dumps(pretrain_settings(cfg, data), sort_keys=True).encode()).hexdigest()[:12]
    return Path(out) / "pretrained" / f"extend-{key}-seed{seed}.pt"


def check(cfg: ExtendConfig, task: TextTask, data: str | None) -> None:
    """CompareError (one line, naming the numbers) for a length or factor the experiment cannot run, or a corpus
    too short for its longest windows."""
    if cfg.length < 4:
        raise CompareError(f"extend: L = {cfg.length} is too short; give --extend-length 4 or more")
    if cfg.factor < 2:
        raise CompareError(f"extend: factor {cfg.factor} extends nothing; give --extend-factor 2 or more")
    longest = cfg.length * max(cfg.eval_factors)
    if longest > MAX_LENGTH:
        raise CompareError(f"extend: L = {cfg.length} at factor {cfg.factor} evaluates {2 * cfg.factor} x L = "
                           f"{longest:,} tokens, more than the {MAX_LENGTH:,} this experiment runs; lower "
                           f"--extend-length or --extend-factor")
    for split, length in (("train", cfg.factor * cfg.length), ("val", longest)):
        have = len(task.splits[split])
        if have <= length + 1:
            source = "the corpus" if data is None else f"--data {data}"
            part = "training split (the first 90%)" if split == "train" else "validation split (the last 10%)"
            raise CompareError(f"extend: the {part} of {source} has {have:,} bytes, too few for windows of "
                               f"{length + 1:,} (L = {cfg.length} at factor {cfg.factor}); give more text or a "
                               f"smaller --extend-length")


def pretrained_config(cfg: ExtendConfig, vocab: int) -> DecoderConfig:
    """The pretrained decoder: RoPE on q and k, P and learned frequencies present (frozen while pretraining)."""
    return DecoderConfig(vocab=vocab, ctx=cfg.length, dims=cfg.dims, heads=cfg.heads, layers=cfg.layers,
                         positional="rotary", placement="attention", mixing="givens", learned_freq=True)


def _train(model: Decoder, groups: list[tuple[list[nn.Parameter], float]], task: TextTask, seed: int, *,
           steps: int, batch: int, length: int, first_batch: int, warmup: int, ckpt_path: Path, name: str,
           settings: dict, cfg: ExtendConfig, device, on_step, interrupt_after) -> tuple[float, list] | None:
    """Train ``model``'s ``groups`` (parameters, peak learning rate) to ``steps``, resuming from ``ckpt_path``;
    batch ``k`` is the task's training batch ``first_batch + k``. Returns (seconds, curve), or None when
    interrupted (after ``interrupt_after`` steps in this call, leaving a checkpoint)."""
    opt = torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in groups], weight_decay=0.0)
    trained = [p for ps, _ in groups for p in ps]
    step, elapsed, curve = resume(ckpt_path, name, settings, device, model, opt)

    def save_checkpoint():
        _atomic_save({"run": name, "settings": settings, "model": model.state_dict(), "optimizer": opt.state_dict(),
                      "step": step, "elapsed": elapsed, "curve": curve}, ckpt_path)

    done_here = 0
    while step < steps:
        start = time.perf_counter()
        for group, (_, lr) in zip(opt.param_groups, groups):
            group["lr"] = warmup_cosine(step, steps, lr, warmup)
        tokens, targets, mask = (t.to(device) for t in task.batch("train", seed, first_batch + step, batch, length))
        loss = _masked_loss_sum(model(tokens), targets, mask) / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        done_here += 1
        elapsed += time.perf_counter() - start
        if step % cfg.eval_every == 0 or step == steps:
            sequences = max(1, cfg.eval_batch * cfg.length // length)
            curve.append((step, evaluate(model, task, seed, length, 1, sequences, device)[0]))
        if step % cfg.checkpoint_every == 0 and step < steps:
            save_checkpoint()
        if on_step:
            on_step()
        if interrupt_after is not None and done_here >= interrupt_after and step < steps:
            save_checkpoint()
            return None
    return elapsed, curve


def _load_pretrained(path: Path, expected: dict, device) -> Decoder | None:
    """The pretrained model in ``path``; None if it cannot be read (warned: it is pretrained again);
    CompareError if it records other settings."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        settings = state["settings"]
        if settings == expected:
            model = Decoder(DecoderConfig(**state["config"])).to(device)
            model.load_state_dict(state["model"])
    except Exception as e:  # a bad file fails in many ways (zip, pickle, EOF, OS, missing keys)
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        log.warning("pretrained model %s cannot be read (%s): it is pretrained again", path, reason)
        return None
    if settings != expected:
        raise CompareError(f"pretrained model {path} was trained with other settings: delete it, or choose another "
                           f"--out")
    return model


def pretrain(task: TextTask, seed: int, cfg: ExtendConfig, out: Path, *, data: str | None, settings: dict,
             device="cpu", on_step=None, interrupt_after=None) -> Decoder | None:
    """The seed's pretrained model: loaded from ``out/pretrained`` if it is there, else trained (resuming from
    its checkpoint) and written there; None if interrupted."""
    out = Path(out)
    path = pretrained_path(out, cfg, data, seed)
    expected = pretrain_settings(cfg, data)
    name = f"extend-pretrain-seed{seed}"
    ckpt = out / "checkpoints" / f"{name}.pt"
    if path.exists():
        model = _load_pretrained(path, expected, device)
        if model is not None:
            ckpt.unlink(missing_ok=True)  # left behind by a kill between the two writes
            return model
    model = Decoder(pretrained_config(cfg, task.vocab))
    init_weights(model, torch.Generator().manual_seed(seed))
    model.to(device)
    model.requires_grad_(False)
    weights = [p for n, p in model.named_parameters() if not n.startswith("rotary.")]  # P, frequencies stay frozen
    for p in weights:
        p.requires_grad_(True)
    done = _train(model, [(weights, cfg.pretrain_lr)], task, seed, steps=cfg.pretrain_steps,
                  batch=cfg.pretrain_batch, length=cfg.length, first_batch=0, warmup=cfg.pretrain_warmup,
                  ckpt_path=ckpt, name=name, settings=settings, cfg=cfg, device=device, on_step=on_step,
                  interrupt_after=interrupt_after)
    if done is None:
        return None
    model.requires_grad_(False)
    seconds, curve = done
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({"settings": expected, "config": asdict(model.config), "model": model.state_dict(),
                  "seconds": seconds, "curve": curve}, path)
    ckpt.unlink(missing_ok=True)
    return model


def finetune_run(task: TextTask, variant: str, seed: int, cfg: ExtendConfig, out: Path, pretrained: Decoder, *,
                 settings: dict, device="cpu", on_step=None, on_trained=None, interrupt_after=None) -> dict | None:
    """Fine-tune (or, zero-shot, only evaluate) ``variant`` from the seed's pretrained model; writes and returns
    its result, or None if interrupted. on_trained: called with the model once it is trained (tests)."""
    out = Path(out)
    name = run_name(variant, seed)
    model, by_group = build_variant(pretrained, variant, factor=cfg.factor, length=cfg.length,
                                    lora_rank=cfg.lora_rank, generator=torch.Generator().manual_seed(seed))
    trained = [p for ps in by_group.values() for p in ps]
    seconds, curve = 0.0, []
    ckpt = out / "checkpoints" / f"{name}.pt"
    if trained:
        lrs = {"rotary": cfg.rotary_lr, "adapter": cfg.adapter_lr, "weights": cfg.lr}
        groups = [(ps, lrs[g]) for g, ps in by_group.items() if ps]
        # fine-tuning batches continue the pretraining stream: windows the pretraining never drew as a batch
        done = _train(model, groups, task, seed, steps=cfg.steps, batch=cfg.batch, length=cfg.factor * cfg.length,
                      first_batch=cfg.pretrain_steps, warmup=cfg.warmup, ckpt_path=ckpt, name=name,
                      settings=settings, cfg=cfg, device=device, on_step=on_step, interrupt_after=interrupt_after)
        if done is None:
            return None
        seconds, curve = done
    if on_trained:
        on_trained(model)
    loss = {f"{f}x": evaluate(model, task, seed, f * cfg.length, cfg.eval_batches, max(1, cfg.eval_batch // f),
                              device)[0] for f in cfg.eval_factors}
    result = {"task": "extend", "variant": variant, "seed": seed, "steps": cfg.steps if trained else 0,
              "params": sum(p.numel() for p in trained), "train_seconds": seconds, "curve": curve, "loss": loss}
    atomic_json(result, out / "runs" / f"{name}.json")
    ckpt.unlink(missing_ok=True)
    return result


def pending_steps(out: Path, cfg: ExtendConfig, data: str | None) -> int:
    """Optimizer steps still to take (the progress bar's share of the extend task)."""
    total = 0
    for seed in range(cfg.seeds):
        todo = [v for v in VARIANTS if not (Path(out) / "runs" / f"{run_name(v, seed)}.json").exists()]
        if todo and not pretrained_path(out, cfg, data, seed).exists():
            total += cfg.pretrain_steps
        total += sum(cfg.steps for v in todo if VARIANTS[v].trains)
    return total


def run_extend(task: TextTask, cfg: ExtendConfig, out: Path, *, data: str | None, settings: dict, device="cpu",
               bar=None, interrupt_after=None) -> bool:
    """Every seed's pretraining and variants not yet done; False if interrupted."""
    out = Path(out)
    on_step = (lambda: bar.update(1)) if bar is not None else None
    for seed in range(cfg.seeds):
        todo = [v for v in VARIANTS if not (out / "runs" / f"{run_name(v, seed)}.json").exists()]
        if not todo:
            continue
        if bar is not None:
            bar.set_description(f"extend-pretrain-seed{seed}")
        model = pretrain(task, seed, cfg, out, data=data, settings=settings, device=device, on_step=on_step,
                         interrupt_after=interrupt_after)
        if model is None:
            return False
        for variant in todo:
            if bar is not None:
                bar.set_description(run_name(variant, seed))
            if finetune_run(task, variant, seed, cfg, out, model, settings=settings, device=device, on_step=on_step,
                            interrupt_after=interrupt_after) is None:
                return False
    return True
