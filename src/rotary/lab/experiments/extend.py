"""`rotary compare --tasks extend`: can learned rotary parameters alone extend a pretrained model's context?

Per seed, one small reference decoder is pretrained on the text corpus at length L with plain RoPE: its Givens P
and learned frequencies are present but frozen at the identity, so every variant starts from the same plain-RoPE
model. Each variant (:mod:`rotary.lab.experiments.extend_variants`) then fine-tunes that model at ``factor`` x L,
with every pretrained weight frozen except those the variant names, on the same batches, token budget, steps and
schedule (or, for the LongRoPE-style search, with as many loss evaluations as the others take steps). Some
variants give a share of each batch's tokens to 1x L windows (``mix_share``), or PoSE's skipped positions to the
long windows, reaching the longest evaluation length. Zero-shot variants (the model as it is; NTK-aware and YaRN
scaling at ``factor``, the library's own ``scaling=`` set on the Rotary) train nothing.

Evaluation, on validation windows every variant of a seed shares: the loss at 1x, 2x, 4x, ... 4 ``factor`` x L
(``ExtendConfig.eval_factors``); the loss by position bucket at the longest of them (does a long context help
the later tokens or only not hurt them?); and a retrieval probe at each length
(:func:`~rotary.lab.experiments.data.retrieval_batch`: a key and value early in the window, the key again at its
end; accuracy on the value), which shows whether the far context is used, not only tolerated. A share of the
pretraining and fine-tuning windows carry such key-value pairs at shorter range (``data.with_probes``), so that
the model can learn to copy at all. The report: :mod:`rotary.lab.experiments.extend_report`.

The folder (see :mod:`rotary.lab.experiments.compare` for its rules): a pretraining run checkpoints in
``checkpoints/extend-pretrain-seed<s>.pt`` (resumable like every run), then its model goes to
``pretrained/extend-<key>-seed<s>.pt``, where ``key`` is a hash of the pretraining settings that the file also
records and that are checked when it is loaded. A fine-tuning run checkpoints in
``checkpoints/extend-<variant>-seed<s>.pt`` and writes ``runs/extend-<variant>-seed<s>.json``. Every file is
written atomically; batches, positions and probes are functions of (seed, step) and LoRA's initial A a function
of the seed, so a run resumed after a kill (at any point) equals an uninterrupted one. A run's result does not
depend on how many seeds or which variants the comparison holds (:data:`GROWABLE`): a folder grows by more seeds
or other variants under ``--resume``, keeping what it has.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rotary.core.module import Rotary
from rotary.integrations.decoder import Decoder, DecoderConfig
from rotary.lab.experiments.data import (
    RETRIEVAL_MIN_LENGTH,
    TextTask,
    pose_positions,
    retrieval_batch,
    with_probes,
)
from rotary.lab.experiments.extend_search import longrope_search
from rotary.lab.experiments.extend_variants import (
    DEFAULT_VARIANTS,
    VARIANTS,
    build_variant,
    export_rope_parameters,
    frequencies_of,
)
from rotary.lab.experiments.schemes import eval_scaling
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

__all__ = ["DESCRIPTION", "GROWABLE", "MAX_LENGTH", "QUICK_EXTEND", "SIZES", "ExtendConfig", "check",
           "finetune_run", "pending_steps", "pretrain", "pretrained_path", "run_extend", "run_name"]

log = logging.getLogger(__name__)

# The longest sequence this experiment evaluates (4 x factor x L). The decoder's RoPE has no table limit, but
# attention costs grow as the square of the length: at 4096 tokens one evaluation batch of this model already
# takes seconds on a CPU core, and the budget holds variants x lengths x seeds of them.
MAX_LENGTH = 4096

DESCRIPTION = ("pretrain at L on the text corpus, then train only the rotary (or another small part) at a longer "
               "length, against zero-shot scaling and LongRoPE's search")

# Settings a folder may grow by under --resume: no single run's result depends on them.
GROWABLE = ("seeds", "variants")


@dataclass
class ExtendConfig:
    """Model, pretraining and fine-tuning budget of the extend task (stored in ``out/config.json``)."""

    length: int = 32  # L, the pretraining length
    factor: int = 4  # fine-tuning at factor x L; evaluation at 1x, 2x, ... 4 factor x L
    seeds: int = 3
    dims: int = 64
    heads: int = 4
    layers: int = 2
    # 2,400 steps: by 800 the small model had not yet learned to copy (retrieval at 1x L at chance), by 2,400 it has
    pretrain_steps: int = 2400
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 40
    # of the training windows (pretraining and fine-tuning), those holding a key-value pair and its repeat
    # (data.with_probes): without them the pretrained model never learns to copy, and the retrieval probe reads chance
    probe_share: float = 0.5
    steps: int = 150  # fine-tuning steps of every trained variant (loss evaluations of the search)
    batch: int = 16  # fine-tuning sequences of factor x L tokens (or the same tokens, a share at 1x L)
    # peak learning rates, each the best at 4x L of a sweep on seed 100, which no report uses (docs/results.md)
    lr: float = 3e-3  # weight matrices (wqk, all)
    adapter_lr: float = 1e-1  # LayerNorm gains, biases, LoRA
    rotary_lr: float = 1e-1  # P's angles, the log frequency scales, the ramp's numbers
    warmup: int = 15
    lora_rank: int = 1
    mix_share: float = 0.25  # of each batch's tokens, as 1x L windows, in the variants that mix
    search_population: int = 10  # candidates per generation of the search
    eval_batches: int = 8
    eval_batch: int = 32  # sequences per evaluation batch at 1x L; divided by the length factor beyond
    retrieval: int = 64  # sequences of the retrieval probe per length
    eval_every: int = 50
    checkpoint_every: int = 50
    variants: tuple[str, ...] = DEFAULT_VARIANTS

    @property
    def eval_factors(self) -> tuple[int, ...]:
        """1, 2, 4, ... up to 4 x factor, with factor and 2 x factor among them."""
        powers = [2**k for k in range(int(math.log2(4 * self.factor)) + 1)]
        return tuple(sorted({*powers, self.factor, 2 * self.factor, 4 * self.factor}))

    @property
    def pose_span(self) -> int:
        """The positions PoSE's windows reach: the longest evaluation length."""
        return max(self.eval_factors) * self.length


# --extend-size: the model and its pretraining length (everything else as ExtendConfig's defaults)
SIZES = {"small": {"length": 32, "dims": 64, "heads": 4, "layers": 2},
         "large": {"length": 64, "dims": 128, "heads": 4, "layers": 4}}

QUICK_EXTEND = ExtendConfig(length=16, seeds=1, dims=32, heads=2, layers=1, pretrain_steps=30, pretrain_batch=8,
                            pretrain_warmup=5, steps=10, batch=4, warmup=2, eval_batches=1, eval_batch=8,
                            retrieval=8, eval_every=5, checkpoint_every=5)


def run_name(variant: str, seed: int) -> str:
    return f"extend-{variant}-seed{seed}"


def run_settings(settings: dict) -> dict:
    """What a run's checkpoint records and is checked against: the comparison's settings but :data:`GROWABLE`."""
    ext = settings.get("extend")
    if not isinstance(ext, dict):
        return settings
    return {**settings, "extend": {k: v for k, v in ext.items() if k not in GROWABLE}}


def pretrain_settings(cfg: ExtendConfig, data: str | None) -> dict:
    """What a pretrained model depends on: its file is keyed by (and records) these."""
    fields = ("length", "dims", "heads", "layers", "pretrain_steps", "pretrain_batch", "pretrain_lr",
              "pretrain_warmup", "probe_share")
    return {"data": data, **{f: getattr(cfg, f) for f in fields}}


def pretrained_path(out: Path, cfg: ExtendConfig, data: str | None, seed: int) -> Path:
    key = hashlib.sha256(json.dumps(pretrain_settings(cfg, data), sort_keys=True).encode()).hexdigest()[:12]
    return Path(out) / "pretrained" / f"extend-{key}-seed{seed}.pt"


def check(cfg: ExtendConfig, task: TextTask, data: str | None) -> None:
    """CompareError (one line, naming the numbers) for a length, factor or variant the experiment cannot run, or a
    corpus too short for its longest windows."""
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown or not cfg.variants:
        raise CompareError(f"extend: unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from "
                           f"{', '.join(VARIANTS)}")
    if cfg.length < 4:
        raise CompareError(f"extend: L = {cfg.length} is too short; give --extend-length 4 or more")
    if cfg.factor < 2:
        raise CompareError(f"extend: factor {cfg.factor} extends nothing; give --extend-factor 2 or more")
    longest = cfg.length * max(cfg.eval_factors)
    if longest > MAX_LENGTH:
        raise CompareError(f"extend: L = {cfg.length} at factor {cfg.factor} evaluates {max(cfg.eval_factors)} x L "
                           f"= {longest:,} tokens, more than the {MAX_LENGTH:,} this experiment runs; lower "
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


LossOf = Callable[[Decoder, int], Tensor]  # (model, step) -> the step's mean training loss


def _train_batch(task: TextTask, seed: int, step: int, batch: int, length: int, share: float, device):
    """The task's training batch ``step`` with its probes (:func:`with_probes`), on ``device``."""
    tokens, targets, mask = task.batch("train", seed, step, batch, length)
    tokens, targets = with_probes(tokens, targets, seed, step, share)
    return tokens.to(device), targets.to(device), mask.to(device)


def _text_loss(task: TextTask, seed: int, first_batch: int, batch: int, length: int, share: float,
               device) -> LossOf:
    """Plain training: step k's loss on the training batch ``first_batch + k`` of ``batch`` x ``length``."""
    def loss_of(model: Decoder, step: int) -> Tensor:
        tokens, targets, mask = _train_batch(task, seed, first_batch + step, batch, length, share, device)
        return _masked_loss_sum(model(tokens), targets, mask) / mask.sum()
    return loss_of


def _finetune_loss(task: TextTask, seed: int, cfg: ExtendConfig, *, mix: bool, pose: bool, device) -> LossOf:
    """A fine-tuning step's loss: ``batch`` windows of factor x L from the training stream that continues the
    pretraining's (windows pretraining never drew as a batch), PoSE positions on them if ``pose``; with ``mix``, a
    ``mix_share`` of the same token budget as 1x L windows from a stream of their own instead (the first rows of
    the long windows are those the other variants see). The mean over every token of both."""
    long = cfg.factor * cfg.length
    short_rows = round(cfg.mix_share * cfg.batch * cfg.factor) if mix else 0
    long_rows = cfg.batch - round(cfg.mix_share * cfg.batch) if mix else cfg.batch
    first = cfg.pretrain_steps

    def loss_of(model: Decoder, step: int) -> Tensor:
        tokens, targets, mask = _train_batch(task, seed, first + step, long_rows, long, cfg.probe_share, device)
        positions = pose_positions(seed, first + step, long_rows, long, cfg.pose_span).to(device) if pose else None
        total, count = _masked_loss_sum(model(tokens, positions=positions), targets, mask), mask.sum()
        if short_rows:
            tokens, targets, mask = _train_batch(task, seed, 2_000_000 + first + step, short_rows, cfg.length,
                                                 cfg.probe_share, device)
            total, count = total + _masked_loss_sum(model(tokens), targets, mask), count + mask.sum()
        return total / count
    return loss_of


def _train(model: Decoder, groups: list[tuple[list[nn.Parameter], float]], task: TextTask, seed: int,
           loss_of: LossOf, *, steps: int, eval_length: int, warmup: int, ckpt_path: Path, name: str,
           settings: dict, cfg: ExtendConfig, device, on_step, interrupt_after) -> tuple[float, list] | None:
    """Train ``model``'s ``groups`` (parameters, peak learning rate) on ``loss_of`` to ``steps``, resuming from
    ``ckpt_path``; the curve is the validation loss at ``eval_length``. Returns (seconds, curve), or None when
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
        loss = loss_of(model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        done_here += 1
        elapsed += time.perf_counter() - start
        if step % cfg.eval_every == 0 or step == steps:
            sequences = max(1, cfg.eval_batch * cfg.length // eval_length)
            curve.append((step, evaluate(model, task, seed, eval_length, 1, sequences, device)[0]))
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
    loss_of = _text_loss(task, seed, 0, cfg.pretrain_batch, cfg.length, cfg.probe_share, device)
    done = _train(model, [(weights, cfg.pretrain_lr)], task, seed, loss_of, steps=cfg.pretrain_steps,
                  eval_length=cfg.length, warmup=cfg.pretrain_warmup, ckpt_path=ckpt, name=name,
                  settings=settings, cfg=cfg, device=device, on_step=on_step, interrupt_after=interrupt_after)
    if done is None:
        return None
    model.requires_grad_(False)
    seconds, curve = done
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({"settings": expected, "config": asdict(model.config), "model": model.state_dict(),
                  "seconds": seconds, "curve": curve}, path)
    ckpt.unlink(missing_ok=True)
    return model


def _search_budget(cfg: ExtendConfig) -> tuple[int, int]:
    """(population, generations) of the search: whole generations within ``steps`` loss evaluations."""
    population = max(2, min(cfg.search_population, cfg.steps))
    return population, cfg.steps // population


def _search(model: Decoder, pretrained: Decoder, task: TextTask, seed: int, cfg: ExtendConfig, device,
            on_step) -> tuple[float, list]:
    """Set ``model``'s log frequency scales by :func:`longrope_search`, each generation scored on the training
    batch a fine-tuning step of the same index sees (factor x L); returns (seconds, [(evaluations, best loss)])."""
    start = time.perf_counter()
    scale = model.rotary.angles.log_freq_scale  # (r/2,) the frequencies are base / lambda: log scale = -log lambda
    base = pretrained.rotary.frequencies().detach().double().cpu()

    def factors(name: str) -> Tensor:  # log lambda of a zero-shot rule at the factor
        rot = Rotary(pretrained.rotary.dims, pretrained.rotary.heads, mixing=None,
                     scaling=eval_scaling(name, cfg.factor, cfg.length))
        return (base / rot.frequencies().detach().double()).log()

    starts = [torch.zeros_like(base), torch.full_like(base, math.log(cfg.factor)), factors("ntk"), factors("yarn")]
    loss_of = _text_loss(task, seed, cfg.pretrain_steps, cfg.batch, cfg.factor * cfg.length, cfg.probe_share,
                         device)
    curve = []

    @torch.no_grad()
    def loss_at(candidate: Tensor, generation: int) -> float:
        scale.copy_(-candidate.to(scale))
        return float(loss_of(model, generation))

    population, generations = _search_budget(cfg)
    best, loss = longrope_search(loss_at, starts, evaluations=population * generations, population=population,
                                 highest=math.log(4 * cfg.factor), generator=torch.Generator().manual_seed(seed),
                                 on_evaluation=on_step)
    with torch.no_grad():
        scale.copy_(-best.to(scale))
    curve.append((population * generations, loss))
    return time.perf_counter() - start, curve


@torch.no_grad()
def _evaluate(model: Decoder, task: TextTask, seed: int, cfg: ExtendConfig, device) -> dict:
    """Loss at every evaluation length, loss by position bucket at the longest, retrieval accuracy per length
    (None where the probe does not fit), and the probe's mean key-to-cue distance per length."""
    model.eval()
    loss, retrieval, distance, buckets = {}, {}, {}, {}
    longest = max(cfg.eval_factors)
    for f in cfg.eval_factors:
        length, sequences = f * cfg.length, max(1, cfg.eval_batch // f)
        total = torch.zeros(length, dtype=torch.float64)  # summed loss per position
        for k in range(cfg.eval_batches):
            tokens, targets, mask = (t.to(device) for t in task.batch("val", seed, k, sequences, length))
            losses = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), reduction="none")
            total += (losses.view_as(targets) * mask).sum(0).double().cpu()
        per_position = total / (cfg.eval_batches * sequences)  # text: every position counts
        loss[f"{f}x"] = float(per_position.mean())
        if f == longest:
            edges = [0, *cfg.eval_factors]
            buckets = {f"{a}x-{b}x": float(per_position[a * cfg.length : b * cfg.length].mean())
                       for a, b in itertools.pairwise(edges)}
        if length < RETRIEVAL_MIN_LENGTH:
            retrieval[f"{f}x"] = distance[f"{f}x"] = None
            continue
        correct = seen = far = 0.0
        for k in range(math.ceil(cfg.retrieval / sequences)):
            rows = min(sequences, cfg.retrieval - k * sequences)
            tokens, targets, mask, where = retrieval_batch(task, seed, k, rows, length)
            tokens, targets, mask = tokens.to(device), targets.to(device), mask.to(device)
            correct += float(((model(tokens).argmax(-1) == targets) & mask).sum())
            seen += float(mask.sum())
            far += float((length + 1 - RETRIEVAL_MIN_LENGTH // 2 - where).sum())
        retrieval[f"{f}x"], distance[f"{f}x"] = correct / seen, far / cfg.retrieval
    model.train()
    return {"loss": loss, "buckets": buckets, "retrieval": retrieval, "retrieval_distance": distance}


def finetune_run(task: TextTask, variant: str, seed: int, cfg: ExtendConfig, out: Path, pretrained: Decoder, *,
                 settings: dict, device="cpu", on_step=None, on_trained=None, interrupt_after=None) -> dict | None:
    """Fine-tune (or search, or, zero-shot, only evaluate) ``variant`` from the seed's pretrained model; writes and
    returns its result, or None if interrupted. on_trained: called with the model once it is trained (tests).

    The result: ``params`` the numbers the variant trains (or searches), ``loss``/``buckets``/``retrieval`` (see
    :func:`_evaluate`), ``factors`` each layer's per-pair factors (pretrained frequency over the variant's: YaRN's
    lambda), ``rope_parameters`` the stock config holding them (None where none does)."""
    out = Path(out)
    name = run_name(variant, seed)
    spec = VARIANTS[variant]
    model, by_group, count = build_variant(pretrained, variant, factor=cfg.factor, length=cfg.length,
                                           lora_rank=cfg.lora_rank, generator=torch.Generator().manual_seed(seed))
    seconds, curve = 0.0, []
    ckpt = out / "checkpoints" / f"{name}.pt"
    if spec.search:
        seconds, curve = _search(model, pretrained, task, seed, cfg, device, on_step)
    elif spec.trains:
        lrs = {"rotary": cfg.rotary_lr, "adapter": cfg.adapter_lr, "weights": cfg.lr}
        groups = [(ps, lrs[g]) for g, ps in by_group.items() if ps]
        loss_of = _finetune_loss(task, seed, cfg, mix=spec.mix, pose=spec.pose, device=device)
        done = _train(model, groups, task, seed, loss_of, steps=cfg.steps, eval_length=cfg.factor * cfg.length,
                      warmup=cfg.warmup, ckpt_path=ckpt, name=name, settings=settings, cfg=cfg, device=device,
                      on_step=on_step, interrupt_after=interrupt_after)
        if done is None:
            return None
        seconds, curve = done
    if on_trained:
        on_trained(model)
    base = pretrained.rotary.frequencies().detach().double()
    try:
        stock = export_rope_parameters(model, cfg.length) if spec.exportable else None
    except ValueError:
        stock = None
    result = {"task": "extend", "variant": variant, "seed": seed, "steps": cfg.steps if spec.trains else 0,
              "params": count, "train_seconds": seconds, "curve": curve, **_evaluate(model, task, seed, cfg, device),
              "factors": [(base / f).tolist() for f in frequencies_of(model)], "rope_parameters": stock}
    atomic_json(result, out / "runs" / f"{name}.json")
    ckpt.unlink(missing_ok=True)
    return result


def pending_steps(out: Path, cfg: ExtendConfig, data: str | None) -> int:
    """Optimizer steps (and search evaluations) still to take: the progress bar's share of the extend task."""
    total = 0
    population, generations = _search_budget(cfg)
    for seed in range(cfg.seeds):
        todo = [v for v in cfg.variants if not (Path(out) / "runs" / f"{run_name(v, seed)}.json").exists()]
        if todo and not pretrained_path(out, cfg, data, seed).exists():
            total += cfg.pretrain_steps
        total += sum(population * generations if VARIANTS[v].search else cfg.steps for v in todo
                     if VARIANTS[v].trains)
    return total


def run_extend(task: TextTask, cfg: ExtendConfig, out: Path, *, data: str | None, settings: dict, device="cpu",
               bar=None, interrupt_after=None) -> bool:
    """Every seed's pretraining and variants not yet done; False if interrupted."""
    out = Path(out)
    settings = run_settings(settings)
    on_step = (lambda: bar.update(1)) if bar is not None else None
    for seed in range(cfg.seeds):
        todo = [v for v in cfg.variants if not (out / "runs" / f"{run_name(v, seed)}.json").exists()]
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
