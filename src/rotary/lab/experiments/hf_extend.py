"""Context extension by training only the rotary, on the path users take: a Hugging Face ``LlamaForCausalLM``,
transformers' ``Trainer``, ``rotary.fold``, ``save_pretrained``, and a stock ``from_pretrained``.

    rotary hf-extend --out runs/hf-extend

A small byte-level Llama (vocabulary 256) is pretrained with ``Trainer`` at length L on the text corpus
(:func:`rotary.lab.experiments.data.stdlib_corpus`), then each row of :data:`ROWS` is evaluated (mean next-byte
loss, nats per byte, on validation windows) at 1x, 2x, 4x, 8x and 16x L:

- ``stock``: the pretrained model as it is;
- ``yarn``: zero-shot YaRN at ``factor``, set as a user would: ``from_pretrained(folder, rope_parameters=...)``;
- ``freq``: ``rotary.hf.install(model, mixing=None, learned_freq=True)``, every transformers weight frozen, the
  log frequency scales (one per rotated pair, shared by all layers) trained with ``Trainer`` on windows of
  ``factor`` x L; then ``rotary.fold`` (stock ``rope_parameters``: longrope with equal short and long factors),
  ``save_pretrained``, and the folder evaluated by ``transformers.AutoModelForCausalLM.from_pretrained`` in a
  process that never imports rotary;
- ``freq-low``: the same, with the pairs whose wavelength ``2 pi / w_i`` is shorter than L kept at their
  pretrained frequency (a gradient mask): the pairs that already turn within the pretraining length need no
  extension, and learning them costs at 1x L.

For the trained rows the table's numbers are the stock-reloaded model's; the installed (unfolded) model is
evaluated on the same windows, and the largest logit difference between the two is recorded, beside the one
between the stock pretrained model and the same model installed untrained (float64 angles against transformers'
float32 ones: the rounding that fold cannot remove). Results go to ``<out>/results.json`` and ``<out>/table.md``;
the checkpoints (pretrained, each trained row folded) to ``<out>/models/``.

Shapes: N windows, T tokens per window, V = 256 bytes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rotary
from rotary.lab.experiments.data import TextTask, stdlib_corpus

__all__ = ["QUICK", "ROWS", "HFExtendConfig", "build_model", "evaluate", "install_and_train", "logits_by_length",
           "pretrain", "run", "ship", "stock_evaluate", "table", "trained_mask", "yarn_model"]

log = logging.getLogger(__name__)

ROWS = {
    "stock": "the pretrained model as it is (zero-shot)",
    "yarn": "YaRN at the factor, set in rope_parameters (zero-shot)",
    "freq": "rotary only: learned frequencies, every pair",
    "freq-low": "rotary only: learned frequencies, pairs with wavelength >= L (shorter ones fixed)",
}


@dataclass(frozen=True)
class HFExtendConfig:
    """Model, pretraining, rotary training and evaluation of the experiment (stored in results.json)."""

    length: int = 64  # L, the pretraining length
    factor: int = 4  # rotary training at factor x L; YaRN's factor
    eval_factors: tuple[int, ...] = (1, 2, 4, 8, 16)
    hidden: int = 128
    heads: int = 4  # head_dim = hidden / heads
    layers: int = 2
    intermediate: int = 384
    rope_theta: float = 10000.0
    pretrain_steps: int = 500
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 30
    steps: int = 150  # rotary training
    batch: int = 8  # windows of factor x L
    lr: float = 5e-2  # the log frequency scales (Adam: about lr per step while the gradient's sign holds)
    warmup: int = 10
    eval_tokens: int = 16384  # per length: eval_tokens // (k L) windows of k L
    seed: int = 0
    corpus_bytes: int = 3_000_000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


QUICK = HFExtendConfig(length=8, eval_factors=(1, 2, 4), hidden=32, heads=2, layers=1, intermediate=64,
                       pretrain_steps=20, pretrain_batch=8, pretrain_warmup=2, steps=8, batch=4, warmup=1,
                       eval_tokens=256, corpus_bytes=200_000)


# --------------------------------------------------------------------------------------------- data
class Windows(torch.utils.data.Dataset):
    """Training windows for ``Trainer``: ``{"input_ids": (T,), "labels": (T,)}`` (the model shifts the labels)."""

    def __init__(self, tokens: Tensor):
        self.tokens = tokens  # (N, T)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def windows(task: TextTask, split: str, seed: int, count: int, length: int, chunk: int = 256) -> Tensor:
    """``count`` windows of ``length`` bytes (N, T): those of :meth:`TextTask.batch`, drawn in chunks."""
    parts = [task.batch(split, seed, step, min(chunk, count - step * chunk), length)[0]
             for step in range(math.ceil(count / chunk))]
    return torch.cat(parts)


def eval_sets(task: TextTask, cfg: HFExtendConfig) -> dict[int, tuple[Tensor, Tensor]]:
    """Validation windows per length k L: ``(tokens, targets)``, each (N, k L), about ``eval_tokens`` tokens."""
    sets = {}
    for k in cfg.eval_factors:
        n = max(1, cfg.eval_tokens // (k * cfg.length))
        tokens, targets, _ = task.batch("val", cfg.seed, k, n, k * cfg.length)
        sets[k * cfg.length] = (tokens, targets)
    return sets


# --------------------------------------------------------------------------------------------- models
def build_model(cfg: HFExtendConfig):
    """A fresh ``LlamaForCausalLM`` over bytes, drawn under ``torch.manual_seed(cfg.seed)`` in a forked RNG."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.length, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return transformers.LlamaForCausalLM(config)


def _train(model: nn.Module, dataset: Windows, *, steps: int, batch: int, lr: float, warmup: int, seed: int,
           folder: Path) -> list[dict]:
    """transformers' ``Trainer`` over ``dataset`` (AdamW on the parameters that require grad, warmup then cosine,
    on the CPU, nothing saved or reported); returns its log history."""
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(folder), use_cpu=True, report_to="none", max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=0.0, optim="adamw_torch",
        logging_steps=max(1, steps // 10), save_strategy="no", seed=seed, data_seed=seed, disable_tqdm=True,
    )
    with torch.random.fork_rng(devices=[]):  # Trainer seeds torch's global generator: the caller's is kept
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the library never prints
        trainer.train()
    return trainer.state.log_history


def pretrain(cfg: HFExtendConfig, task: TextTask, folder: Path):
    """A model of :func:`build_model` pretrained with ``Trainer`` at L; returns it in eval mode."""
    model = build_model(cfg)
    count = cfg.pretrain_steps * cfg.pretrain_batch
    data = Windows(windows(task, "train", cfg.seed, count, cfg.length))
    _train(model, data, steps=cfg.pretrain_steps, batch=cfg.pretrain_batch, lr=cfg.pretrain_lr,
           warmup=cfg.pretrain_warmup, seed=cfg.seed, folder=folder)
    return model.eval()


def yarn_model(pretrained_folder: Path, cfg: HFExtendConfig):
    """The pretrained checkpoint with YaRN at ``factor``, as a user sets it: ``from_pretrained`` with the new
    ``rope_parameters`` and ``max_position_embeddings`` (no rotary involved)."""
    import transformers

    params = {"rope_type": "yarn", "factor": float(cfg.factor), "original_max_position_embeddings": cfg.length,
              "rope_theta": cfg.rope_theta}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        pretrained_folder, rope_parameters=params, max_position_embeddings=cfg.factor * cfg.length)
    return model.eval()


def trained_mask(cfg: HFExtendConfig, low_only: bool) -> Tensor:
    """Which log frequency scales train (r/2,) bool: every pair, or (``low_only``) those whose wavelength
    ``2 pi / w_i`` (``w_i = theta^(-2i/r)``) is at least L."""
    r = cfg.head_dim
    freqs = cfg.rope_theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)  # (r/2,)
    return 2 * math.pi / freqs >= cfg.length if low_only else torch.ones(r // 2, dtype=torch.bool)


def install_and_train(pretrained: nn.Module, cfg: HFExtendConfig, task: TextTask, *, low_only: bool,
                      folder: Path) -> tuple[nn.Module, dict]:
    """A copy of ``pretrained`` with ``rotary.hf.install(mixing=None, learned_freq=True)``, every transformers
    weight frozen, the log frequency scales (those of :func:`trained_mask`) trained with ``Trainer`` on windows of
    ``factor`` x L. Returns the installed model (eval mode) and what was trained: ``parameters`` (the count of
    trained scales), ``scales`` (exp of the log scales, per pair) and ``history`` (Trainer's log)."""
    model = rotary.hf.install(copy.deepcopy(pretrained), mixing=None, learned_freq=True)
    model.requires_grad_(False)
    log_scale = model.model.rotary.angles.log_freq_scale  # (r/2,), shared by all layers
    log_scale.requires_grad_(True)
    fixed = ~trained_mask(cfg, low_only).to(log_scale.device)
    handle = log_scale.register_hook(lambda grad: grad.masked_fill(fixed, 0))  # Adam moves no always-0 gradient
    data = Windows(windows(task, "train", cfg.seed + 1, cfg.steps * cfg.batch, cfg.factor * cfg.length))
    try:
        history = _train(model, data, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, warmup=cfg.warmup,
                         seed=cfg.seed, folder=folder)
    finally:
        handle.remove()
    log_scale.requires_grad_(False)
    info = {"parameters": int((~fixed).sum()), "scales": log_scale.detach().double().exp().tolist(),
            "history": history}
    return model.eval(), info


def ship(model: nn.Module, folder: Path, length: int) -> dict:
    """``rotary.fold``, ``config.max_position_embeddings = length`` (the length the rotary was trained at: engines
    cap their context at it; the written longrope's explicit ``attention_factor`` keeps the angles as they are),
    then ``save_pretrained(folder)``: a stock checkpoint. Returns its ``rope_parameters``."""
    rotary.fold(model)
    model.config.max_position_embeddings = length
    model.save_pretrained(folder)
    return dict(model.config.rope_parameters)


# --------------------------------------------------------------------------------------------- evaluation
def logits_by_length(model: nn.Module, sets: dict[int, tuple[Tensor, Tensor]], tokens_per_call: int = 8192
                     ) -> dict[int, Tensor]:
    """The model's logits (N, T, V) on each set's tokens, in calls of about ``tokens_per_call`` tokens."""
    out = {}
    with torch.no_grad():
        for length, (tokens, _) in sets.items():
            step = max(1, tokens_per_call // length)
            out[length] = torch.cat([model(input_ids=tokens[i : i + step]).logits.float()
                                     for i in range(0, len(tokens), step)])
    return out


def losses(logits: dict[int, Tensor], sets: dict[int, tuple[Tensor, Tensor]]) -> dict[int, float]:
    """Mean next-byte cross-entropy (nats per byte) per length."""
    return {n: F.cross_entropy(logits[n].flatten(0, 1), sets[n][1].flatten()).item() for n in logits}


def evaluate(model: nn.Module, sets: dict[int, tuple[Tensor, Tensor]]) -> dict[int, float]:
    """:func:`losses` of :func:`logits_by_length`."""
    return losses(logits_by_length(model, sets), sets)


# Run as `python -c` in a fresh process: it imports transformers and torch, never rotary, and asserts that.
_STOCK_EVAL = """
import sys, torch, transformers
folder, sets_file, out_file = sys.stdin.read().splitlines()[:3]  # the three paths, one a line
model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
sets = torch.load(sets_file)
out = {}
with torch.no_grad():
    for length, tokens in sets.items():
        step = max(1, 8192 // length)
        out[length] = torch.cat([model(input_ids=tokens[i : i + step]).logits.float()
                                 for i in range(0, len(tokens), step)])
assert not [m for m in sys.modules if m == "rotary" or m.startswith("rotary.")], "rotary was imported"
torch.save(out, out_file)
"""


def stock_evaluate(folder: Path, sets: dict[int, tuple[Tensor, Tensor]]) -> dict[int, Tensor]:
    """The logits per length of ``AutoModelForCausalLM.from_pretrained(folder)`` in a process that never imports
    rotary (raises RuntimeError, with the process's last words, if it fails or imports rotary)."""
    with tempfile.TemporaryDirectory() as tmp:
        sets_file, out_file = Path(tmp) / "sets.pt", Path(tmp) / "logits.pt"
        torch.save({n: tokens for n, (tokens, _) in sets.items()}, sets_file)
        done = subprocess.run([sys.executable, "-c", _STOCK_EVAL], input=f"{folder}\n{sets_file}\n{out_file}\n",
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"the stock evaluation of {folder} failed: {done.stderr[-2000:]}")
        return torch.load(out_file)


def _max_diff(a: dict[int, Tensor], b: dict[int, Tensor]) -> dict[int, float]:
    """The largest absolute difference per length."""
    return {n: (a[n] - b[n]).abs().max().item() for n in a}


def _cos_sin(model: nn.Module, length: int) -> Tensor:
    """``model.model.rotary_emb``'s cos and sin at positions 0..length-1, stacked: (2, 1, T, r)."""
    positions = torch.arange(length).unsqueeze(0)  # (1, T)
    with torch.no_grad():
        return torch.stack(model.model.rotary_emb(torch.zeros(1), positions))


# --------------------------------------------------------------------------------------------- the experiment
def run(cfg: HFExtendConfig, out: Path, corpus: tuple[bytes, str] | None = None) -> dict:
    """The whole experiment; writes ``out/results.json``, ``out/table.md`` and ``out/models/``; returns the
    results (see the module docstring)."""
    out = Path(out)
    models = out / "models"
    text, description = corpus if corpus is not None else stdlib_corpus(cfg.corpus_bytes)
    task = TextTask(text, description)
    sets = eval_sets(task, cfg)
    results = {"config": asdict(cfg), "corpus": description, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "rows": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        log.info("pretraining at L = %d (%d steps)", cfg.length, cfg.pretrain_steps)
        pretrained = pretrain(cfg, task, Path(scratch) / "pretrain")
        pretrained.save_pretrained(models / "pretrained")
        stock_logits = logits_by_length(pretrained, sets)
        results["rows"]["stock"] = {"loss": losses(stock_logits, sets), "parameters": 0}
        untrained = rotary.hf.install(copy.deepcopy(pretrained), mixing=None, learned_freq=True).eval()
        results["angle_rounding"] = _max_diff(logits_by_length(untrained, sets), stock_logits)
        results["angle_rounding_cos_sin"] = (_cos_sin(untrained, max(sets)) - _cos_sin(pretrained, max(sets))
                                             ).abs().max().item()
        del untrained
        results["rows"]["yarn"] = {"loss": evaluate(yarn_model(models / "pretrained", cfg), sets), "parameters": 0}
        for name, low_only in (("freq", False), ("freq-low", True)):
            log.info("%s: training the rotary at %d x L (%d steps)", name, cfg.factor, cfg.steps)
            model, info = install_and_train(pretrained, cfg, task, low_only=low_only, folder=Path(scratch) / name)
            installed, angles = logits_by_length(model, sets), _cos_sin(model, max(sets))
            rope_parameters = ship(model, models / name, cfg.factor * cfg.length)
            reloaded = stock_evaluate(models / name, sets)
            results["rows"][name] = {
                "loss": losses(reloaded, sets), "loss_installed": losses(installed, sets),
                "max_logit_diff": _max_diff(reloaded, installed),
                "max_cos_sin_diff": (_cos_sin(model, max(sets)) - angles).abs().max().item(),
                "parameters": info["parameters"],
                "scales": info["scales"], "rope_type": rope_parameters["rope_type"],
                "train_loss": [h["loss"] for h in info["history"] if "loss" in h],
            }
    results["seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(table(results) + "\n")
    return results


def table(results: dict) -> str:
    """The results as a markdown table: loss (nats per byte) per row at each length, trained parameters."""
    cfg = HFExtendConfig(**{**results["config"], "eval_factors": tuple(results["config"]["eval_factors"])})
    lengths = [k * cfg.length for k in cfg.eval_factors]
    head = ("| row | trained parameters | " + " | ".join(f"{n // cfg.length}L = {n}" for n in lengths) + " |")
    lines = [head, "|---|---:|" + "---:|" * len(lengths)]
    for name, row in results["rows"].items():
        losses_ = [row["loss"][n] if n in row["loss"] else row["loss"][str(n)] for n in lengths]
        lines.append(f"| {name}: {ROWS[name]} | {row['parameters']} | " + " | ".join(f"{v:.3f}" for v in losses_)
                     + " |")
    return "\n".join(lines)
