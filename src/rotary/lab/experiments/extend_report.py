"""The report of `rotary compare --tasks extend`: per-variant table (loss ± 95% interval over seeds), paired
differences, the plain statements of what wins per parameter at each length, and ``extend.png``."""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

import torch

from rotary.lab.experiments.extend import ExtendConfig, pretrained_path
from rotary.lab.experiments.extend_variants import VARIANTS
from rotary.lab.experiments.report import interval95

__all__ = ["aggregate", "load_results", "markdown", "plot", "pretrain_seconds"]


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "runs").glob("extend-*.json"))]


def pretrain_seconds(out: Path, cfg: ExtendConfig, data: str | None) -> float | None:
    """Mean pretraining seconds over the seeds whose pretrained model is in ``out`` (None: none is)."""
    seconds = []
    for seed in range(cfg.seeds):
        path = pretrained_path(out, cfg, data, seed)
        if path.exists():
            with contextlib.suppress(Exception):  # an unreadable file is reported where it is loaded
                seconds.append(float(torch.load(path, map_location="cpu", weights_only=True)["seconds"]))
    return statistics.fmean(seconds) if seconds else None


def aggregate(results: list[dict]) -> dict:
    """``{variant: {"params", "seeds", "loss": {key: [per seed]}, "train_seconds": mean}}``, in VARIANTS order,
    seeds sorted (so that variants pair by seed)."""
    agg = {}
    for variant in VARIANTS:
        runs = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["seed"])
        if runs:
            agg[variant] = {"params": runs[0]["params"], "seeds": [r["seed"] for r in runs],
                            "loss": {k: [r["loss"][k] for r in runs] for k in runs[0]["loss"]},
                            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs)}
    return agg


def _ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% confidence interval, Student t; 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return interval95((statistics.fmean(values), std), len(values))


def _paired(agg: dict, a: str, b: str, key: str) -> tuple[float, float] | None:
    """a's loss minus b's at ``key``, paired by seed: (mean, 95% half-width); None without common seeds."""
    common = sorted(set(agg[a]["seeds"]) & set(agg[b]["seeds"]))
    if not common:
        return None
    va = dict(zip(agg[a]["seeds"], agg[a]["loss"][key]))
    vb = dict(zip(agg[b]["seeds"], agg[b]["loss"][key]))
    return _ci([va[s] - vb[s] for s in common])


def _verdict(d: tuple[float, float] | None, n: int) -> str:
    if d is None:
        return "n/a"
    if n < 2:
        return f"{d[0]:+.3f} (one seed)"
    word = "lower" if d[0] + d[1] < 0 else "higher" if d[0] - d[1] > 0 else "no significant difference"
    return f"{d[0]:+.3f} ± {d[1]:.3f} ({word})"


def _pareto(agg: dict, key: str) -> list[str]:
    """The variants that no variant with at most as many trained parameters beats on mean loss at ``key``."""
    mean = {v: statistics.fmean(e["loss"][key]) for v, e in agg.items()}
    return [v for v in sorted(agg, key=lambda v: (agg[v]["params"], mean[v]))
            if not any(w != v and agg[w]["params"] <= agg[v]["params"] and mean[w] < mean[v] for w in agg)]


def _statement(agg: dict, key: str, what: str, n: int) -> str:
    """One line: the lowest loss, the best of each group, rotary only against zero-shot, the Pareto front."""
    mean = {v: statistics.fmean(e["loss"][key]) for v, e in agg.items()}
    best = min(mean, key=mean.get)
    text = f"- At {key} L{what}: lowest loss `{best}` ({mean[best]:.3f}, {agg[best]['params']:,} trained)"
    groups: dict[str, list[str]] = {}
    for v in agg:
        groups.setdefault(VARIANTS[v].group, []).append(v)
    for g in ("zero-shot", "rotary only"):
        if g in groups:
            b = min(groups[g], key=mean.get)
            text += f"; best {g} `{b}` ({mean[b]:.3f})"
    if "rotary only" in groups and "zero-shot" in groups:
        r = min(groups["rotary only"], key=mean.get)
        z = min(groups["zero-shot"], key=mean.get)
        text += f"; `{r}` minus `{z}`: {_verdict(_paired(agg, r, z, key), n)}"
    return text + ". Per trained parameter (each beats every variant with as few or fewer): " + ", ".join(
        f"`{v}` ({agg[v]['params']:,}: {mean[v]:.3f})" for v in _pareto(agg, key)) + "."


def markdown(agg: dict, cfg: ExtendConfig, pretrain_seconds: float | None = None) -> str:
    """The extend section of the report: the table, the paired comparisons and the plain statements."""
    if not agg:
        return ""
    keys = list(next(iter(agg.values()))["loss"])
    n = max(len(e["seeds"]) for e in agg.values())
    lines = ["### extend\n",
             f"Pretrained at L = {cfg.length} ({cfg.pretrain_steps} steps of {cfg.pretrain_batch} x {cfg.length} "
             f"bytes; {cfg.layers} layers, width {cfg.dims}, {cfg.heads} heads; plain RoPE, P and learned "
             f"frequencies present and frozen at the identity"
             + (f"; {pretrain_seconds:.1f} s per seed" if pretrain_seconds is not None else "") + "). "
             f"Each trained variant: {cfg.steps} AdamW steps of {cfg.batch} x {cfg.factor * cfg.length} bytes "
             f"({cfg.factor}x L) from that model, everything else frozen, warm-up then cosine decay, peak learning "
             f"rate {cfg.rotary_lr:g} for P's angles and the log frequency scales, {cfg.adapter_lr:g} for LayerNorm "
             f"gains, biases and LoRA, {cfg.lr:g} for weight matrices. "
             f"Validation loss (nats per byte) at {', '.join(keys)} L: mean ± half-width of the 95% confidence "
             f"interval (Student t) over {n} seed(s); every variant of a seed starts from the same pretrained "
             "model and sees the same batches and validation windows; `plain` is that model.\n",
             "| variant | kind | trained params | " + " | ".join(f"loss @{k}" for k in keys) + " | train s |",
             "|---|---|---:|" + "---:|" * len(keys) + "---:|"]
    for v, e in agg.items():
        cells = [f"{m:.3f} ± {h:.3f}" for m, h in (_ci(e["loss"][k]) for k in keys)]
        lines.append(f"| {v} | {VARIANTS[v].group} | {e['params']:,} | {' | '.join(cells)} | "
                     f"{e['train_seconds']:.1f} |")
    lines.append("")
    rotary_only = [v for v in agg if VARIANTS[v].group == "rotary only"]
    references = [r for r in ("plain", "yarn", "lora") if r in agg]
    if rotary_only and references:
        lines.append("Rotary-only variants against references: loss difference paired by seed (negative = the "
                     "rotary-only variant is better), 95% interval:\n")
        lines.append("| rotary only | against | " + " | ".join(f"Δ loss @{k}" for k in keys) + " |")
        lines.append("|---|---|" + "---|" * len(keys))
        for v in rotary_only:
            for r in references:
                lines.append(f"| {v} | {r} | " + " | ".join(_verdict(_paired(agg, v, r, k), n) for k in keys) + " |")
        lines.append("")
    train_key = f"{cfg.factor}x"
    for k in keys:
        what = " (the fine-tuning length)" if k == train_key else " (the pretraining length)" if k == "1x" else ""
        lines.append(_statement(agg, k, what, n))
    lines.append("")
    lines.append("Variants: " + "; ".join(f"`{v}` {VARIANTS[v].description}" for v in agg) + f" (factor "
                 f"{cfg.factor}, LoRA rank {cfg.lora_rank}).")
    return "\n".join(lines)


def plot(agg: dict, out: Path) -> Path:
    """``extend.png``: loss against evaluation length, zero-shot and rotary-only variants on the left, the
    baselines (with plain and YaRN for reference) on the right; error bars are the 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    colors = {v: plt.get_cmap("tab20")(i % 20) for i, v in enumerate(VARIANTS)}  # a variant's colour in both panels
    panels = (("zero-shot", "rotary only"), ("baseline",))
    for ax, groups in zip(axes, panels):
        shown = [v for v in agg if VARIANTS[v].group in groups or (groups == ("baseline",) and v in ("plain", "yarn"))]
        for v in shown:
            keys = list(agg[v]["loss"])
            xs = [float(k[:-1]) for k in keys]
            cis = [_ci(agg[v]["loss"][k]) for k in keys]
            ax.errorbar(xs, [c[0] for c in cis], yerr=[c[1] for c in cis], marker="o", capsize=2, label=v,
                        color=colors[v], linestyle="--" if VARIANTS[v].group == "zero-shot" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}x" for x in xs])
        ax.set_xlabel("evaluation length / pretraining length L")
        ax.set_title(" and ".join(groups), fontsize=9)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("validation loss (nats per byte)")
    fig.tight_layout()
    path = Path(out) / "extend.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
