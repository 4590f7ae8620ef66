"""The report of `rotary compare --tasks extend`: per-variant tables (loss, retrieval accuracy and loss by
position, each mean ± 95% interval over seeds), paired differences against the unchanged model and YaRN, the goal
check of the rotary-only variants, the plain statements of what wins per trained number at each length, and
``extend.png``."""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

import torch

from rotary.lab.experiments.extend import ExtendConfig, pretrained_path
from rotary.lab.experiments.extend_variants import VARIANTS
from rotary.lab.experiments.report import interval95

__all__ = ["COPIES", "GOAL", "aggregate", "copying_seeds", "goal_rows", "load_results", "markdown", "plot",
           "pretrain_seconds", "pretraining"]

# The goal of a rotary-only variant (issue 28): within GOAL["1x"] nats of the unchanged model at 1x L, lower loss
# than zero-shot YaRN at factor x and 2 factor x L (paired 95% interval below zero), retrieval at 2 factor x L at
# least YaRN's (mean).
GOAL = {"1x": 0.02}


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "runs").glob("extend-*.json"))]


def pretraining(out: Path, cfg: ExtendConfig, data: str | None) -> dict[int, dict]:
    """``{seed: {"seconds", "curve"}}`` of the seeds whose pretrained model is in ``out``."""
    found = {}
    for seed in range(cfg.seeds):
        path = pretrained_path(out, cfg, data, seed)
        if path.exists():
            with contextlib.suppress(Exception):  # an unreadable file is reported where it is loaded
                state = torch.load(path, map_location="cpu", weights_only=True)
                found[seed] = {"seconds": float(state["seconds"]), "curve": [tuple(c) for c in state["curve"]]}
    return found


def pretrain_seconds(out: Path, cfg: ExtendConfig, data: str | None) -> float | None:
    """Mean pretraining seconds over the seeds whose pretrained model is in ``out`` (None: none is)."""
    found = pretraining(out, cfg, data)
    return statistics.fmean(p["seconds"] for p in found.values()) if found else None


def _pretraining_line(found: dict[int, dict], agg: dict) -> str:
    """Per seed: the pretrained model's validation loss at 1x L (one batch) at the end and at 80% of the steps,
    and its retrieval accuracy at 1x L; the seeds whose loss rose over the last 20% and those that do not copy
    (accuracy below :data:`COPIES`), named."""
    if not found:
        return ""
    plain = dict(zip(agg["plain"]["seeds"], agg["plain"]["retrieval"].get("1x", []))) if "plain" in agg else {}
    cells, rose, blind = [], [], []
    for seed, p in sorted(found.items()):
        curve = p["curve"]
        late = next((loss for step, loss in curve if step >= 0.8 * curve[-1][0]), curve[-1][1])
        copy = plain.get(seed)
        cells.append(f"seed {seed} {curve[-1][1]:.3f} ({late:.3f})" + ("" if copy is None else f", copies {copy:.2f}"))
        if curve[-1][1] > late + 0.02:
            rose.append(str(seed))
        if copy is not None and copy < COPIES:
            blind.append(str(seed))
    text = ("Pretraining, per seed: validation loss at 1x L (one batch) at the end and at 80% of the steps, and the "
            "pretrained model's retrieval accuracy at 1x L: " + "; ".join(cells) + ". ")
    text += f"Loss rose over the last 20% for seed(s) {', '.join(rose)}. " if rose else (
        "Every seed converged (no rise over the last 20% of the steps). ")
    if blind:
        text += (f"Seed(s) {', '.join(blind)} did not learn to copy (retrieval at 1x L below {COPIES}): their "
                 f"retrieval numbers are at chance for every variant.")
    return text + "\n"


def aggregate(results: list[dict]) -> dict:
    """``{variant: {"params", "seeds", "loss"/"buckets"/"retrieval": {key: [per seed]}, "train_seconds": mean}}``,
    in VARIANTS order, seeds sorted (so that variants pair by seed)."""
    agg = {}
    for variant in VARIANTS:
        runs = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["seed"])
        if runs:
            agg[variant] = {"params": runs[0]["params"], "seeds": [r["seed"] for r in runs],
                            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs)}
            for what in ("loss", "buckets", "retrieval", "retrieval_distance"):
                agg[variant][what] = {k: [r.get(what, {}).get(k) for r in runs] for k in runs[0].get(what, {})}
    return agg


def _ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% confidence interval, Student t; 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return interval95((statistics.fmean(values), std), len(values))


def _cell(values: list, digits: int = 3) -> str:
    if not values or any(v is None for v in values):
        return "n/a"
    m, h = _ci(values)
    return f"{m:.{digits}f} ± {h:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def _paired(agg: dict, a: str, b: str, key: str, what: str = "loss") -> tuple[float, float, int] | None:
    """a's value minus b's at ``key``, paired by seed: (mean, 95% half-width, seeds); None without common seeds."""
    if a not in agg or b not in agg:
        return None
    va = dict(zip(agg[a]["seeds"], agg[a][what].get(key, [])))
    vb = dict(zip(agg[b]["seeds"], agg[b][what].get(key, [])))
    common = sorted(s for s in set(va) & set(vb) if va[s] is not None and vb[s] is not None)
    if not common:
        return None
    return (*_ci([va[s] - vb[s] for s in common]), len(common))


def _verdict(d: tuple[float, float, int] | None, lower: str = "lower", higher: str = "higher") -> str:
    if d is None:
        return "n/a"
    if d[2] < 2:
        return f"{d[0]:+.3f} (one seed)"
    word = lower if d[0] + d[1] < 0 else higher if d[0] - d[1] > 0 else "no significant difference"
    return f"{d[0]:+.3f} ± {d[1]:.3f} ({word})"


def _mean(agg: dict, v: str, key: str, what: str = "loss") -> float | None:
    values = agg[v][what].get(key)
    return None if not values or any(x is None for x in values) else statistics.fmean(values)


def _pareto(agg: dict, key: str) -> list[str]:
    """The variants that no variant with at most as many trained numbers beats on mean loss at ``key``."""
    mean = {v: _mean(agg, v, key) for v in agg}
    return [v for v in sorted(agg, key=lambda v: (agg[v]["params"], mean[v]))
            if not any(w != v and agg[w]["params"] <= agg[v]["params"] and mean[w] < mean[v] for w in agg)]


# A pretrained model copies when its retrieval accuracy at 1x L is at least this (chance is about 0.04): only then
# can the probe at longer lengths show whether a variant uses the far context.
COPIES = 0.5


def copying_seeds(agg: dict) -> list[int]:
    """The seeds whose pretrained model (``plain``) copies at 1x L (retrieval accuracy at least :data:`COPIES`)."""
    if "plain" not in agg:
        return []
    accuracy = agg["plain"]["retrieval"].get("1x", [])
    return [s for s, a in zip(agg["plain"]["seeds"], accuracy) if a is not None and a >= COPIES]


def _subset(agg: dict, seeds: list[int]) -> dict:
    """``agg`` with only the runs of ``seeds`` (variants without any left out)."""
    out = {}
    for v, e in agg.items():
        keep = [i for i, s in enumerate(e["seeds"]) if s in seeds]
        if keep:
            out[v] = {**e, "seeds": [e["seeds"][i] for i in keep],
                      **{w: {k: [xs[i] for i in keep] for k, xs in e[w].items()}
                         for w in ("loss", "buckets", "retrieval", "retrieval_distance")}}
    return out


def goal_rows(agg: dict, cfg: ExtendConfig) -> list[dict]:
    """Per rotary-only or searched variant: the paired differences the goal is judged on and whether it is met.
    Retrieval is compared over the seeds whose pretrained model copies (:func:`copying_seeds`)."""
    train, far = f"{cfg.factor}x", f"{2 * cfg.factor}x"
    copying = _subset(agg, copying_seeds(agg))
    rows = []
    for v in agg:
        if VARIANTS[v].group not in ("rotary only", "search"):
            continue
        short = _paired(agg, v, "plain", "1x")
        at_train, at_far = _paired(agg, v, "yarn", train), _paired(agg, v, "yarn", far)
        ret = _paired(copying, v, "yarn", far, "retrieval")
        met = (short is not None and short[0] <= GOAL["1x"] and at_train is not None and at_train[0] + at_train[1] < 0
               and at_far is not None and at_far[0] + at_far[1] < 0 and ret is not None and ret[0] >= 0
               and at_far[2] >= 2)
        rows.append({"variant": v, "params": agg[v]["params"], "vs_plain_1x": short, "vs_yarn_train": at_train,
                     "vs_yarn_far": at_far, "retrieval_vs_yarn_far": ret, "met": met})
    return rows


def _at_distance(rkeys: list[str], dist: dict) -> list[str]:
    """Retrieval column headers: the length, and how many bytes back the key is (mean over the windows)."""
    return [f"@{k}" + ("" if dist[k][0] is None else f" ({statistics.fmean(dist[k]):.0f} back)") for k in rkeys]


def markdown(agg: dict, cfg: ExtendConfig, pretrain_seconds: float | None = None,
             pretrained: dict[int, dict] | None = None) -> str:
    """The extend section of the report: the tables, the paired comparisons, the goal and the plain statements."""
    if not agg:
        return ""
    keys = list(next(iter(agg.values()))["loss"])
    train, far = f"{cfg.factor}x", f"{2 * cfg.factor}x"
    lines = ["### extend\n",
             f"Pretrained at L = {cfg.length} ({cfg.pretrain_steps} steps of {cfg.pretrain_batch} x {cfg.length} "
             f"bytes, {cfg.probe_share:.0%} of the windows holding a key-value pair and its repeat; {cfg.layers} "
             f"layers, width {cfg.dims}, {cfg.heads} heads; plain RoPE, P and learned "
             f"frequencies present and frozen at the identity"
             + (f"; {pretrain_seconds:.1f} s per seed" if pretrain_seconds is not None else "") + "). "
             f"Each trained variant: {cfg.steps} AdamW steps of {cfg.batch} x {cfg.factor * cfg.length} bytes "
             f"({cfg.factor}x L; variants that mix give {cfg.mix_share:.0%} of those tokens to 1x L windows; PoSE "
             f"positions reach {cfg.pose_span} = {max(cfg.eval_factors)}x L) from that model, everything else "
             f"frozen, warm-up then cosine decay, peak learning rate {cfg.rotary_lr:g} for the rotary numbers, "
             f"{cfg.adapter_lr:g} for LayerNorm gains, biases and LoRA, {cfg.lr:g} for weight matrices; the search "
             f"scores as many candidates as the others take steps. "
             f"Validation loss (nats per byte): mean ± half-width of the 95% confidence interval (Student t) over "
             f"the seeds in the `seeds` column; every variant of a seed starts from the same pretrained model and "
             f"sees the same batches and validation windows; `plain` is that model. `stock`: whether the result is "
             f"one set of per-pair factors, which a stock `longrope` config holds (short = long).\n",
             _pretraining_line(pretrained or {}, agg),
             "| variant | kind | trained numbers | stock | seeds | " + " | ".join(f"loss @{k}" for k in keys)
             + " | train s |",
             "|---|---|---:|---|---:|" + "---:|" * len(keys) + "---:|"]
    for v, e in agg.items():
        cells = [_cell(e["loss"][k]) for k in keys]
        lines.append(f"| {v} | {VARIANTS[v].group} | {e['params']:,} | "
                     f"{'yes' if VARIANTS[v].exportable else 'no'} | {len(e['seeds'])} | {' | '.join(cells)} | "
                     f"{e['train_seconds']:.1f} |")
    lines.append("")
    goals = goal_rows(agg, cfg)
    if goals and "plain" in agg and "yarn" in agg:
        lines += [f"The goal, per rotary-only (or searched) variant: within {GOAL['1x']} nats of `plain` at 1x L "
                  f"(mean paired difference), lower loss than `yarn` at {train} and {far} L (paired 95% interval "
                  f"below zero), retrieval accuracy at {far} L at least `yarn`'s (mean paired difference >= 0, over "
                  f"the seeds whose pretrained model copies):\n",
                  f"| variant | numbers | Δ loss vs plain @1x | Δ loss vs yarn @{train} | Δ loss vs yarn @{far} | "
                  f"Δ retrieval vs yarn @{far} | goal |", "|---|---:|---|---|---|---|---|"]
        for g in goals:
            lines.append(f"| {g['variant']} | {g['params']:,} | {_verdict(g['vs_plain_1x'])} | "
                         f"{_verdict(g['vs_yarn_train'])} | {_verdict(g['vs_yarn_far'])} | "
                         f"{_verdict(g['retrieval_vs_yarn_far'])} | {'met' if g['met'] else 'not met'} |")
        lines.append("")
    shown = [v for v in agg if v not in ("plain", "yarn")]
    for ref in ("plain", "yarn"):
        if ref not in agg:
            continue
        lines += [f"Loss minus `{ref}`'s, paired by seed (negative = better than `{ref}`), 95% interval:\n",
                  "| variant | " + " | ".join(f"Δ @{k}" for k in keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {v} | " + " | ".join(_verdict(_paired(agg, v, ref, k)) for k in keys) + " |"
                  for v in shown if v != ref]
        lines.append("")
    rkeys = list(next(iter(agg.values()))["retrieval"])
    copying = copying_seeds(agg)
    if rkeys and copying:
        dist = next(iter(agg.values()))["retrieval_distance"]
        sub = _subset(agg, copying)
        lines += [f"Retrieval probe over the seeds whose pretrained model copies at 1x L (`plain`'s accuracy at least "
                  f"{COPIES}): seed(s) {', '.join(map(str, copying))} of {len(agg['plain']['seeds'])}; the others "
                  f"are in the next table. Accuracy on the values, mean ± 95% interval:\n",
                  "| variant | seeds | " + " | ".join(_at_distance(rkeys, dist)) + " |",
                  "|---|---:|" + "---:|" * len(rkeys)]
        lines += [f"| {v} | {len(e['seeds'])} | " + " | ".join(_cell(e["retrieval"][k], 2) for k in rkeys) + " |"
                  for v, e in sub.items()]
        lines.append("")
    if rkeys:
        dist = next(iter(agg.values()))["retrieval_distance"]
        lines += [f"Retrieval probe, every seed: accuracy on the {cfg.retrieval} values per length (4 random capital "
                  f"letters after a 4-letter key early in a validation window, asked for at its end; chance about "
                  f"1/26), mean ± 95% interval; the key's distance to its repeat is in the header:\n",
                  "| variant | " + " | ".join(_at_distance(rkeys, dist)) + " |", "|---|" + "---:|" * len(rkeys)]
        lines += [f"| {v} | " + " | ".join(_cell(e["retrieval"][k], 2) for k in rkeys) + " |" for v, e in agg.items()]
        lines.append("")
    bkeys = list(next(iter(agg.values()))["buckets"])
    if bkeys:
        lines += [f"Loss by position at {keys[-1]} L (mean over the tokens at those positions, in multiples of L):\n",
                  "| variant | " + " | ".join(f"{k}" for k in bkeys) + " |", "|---|" + "---:|" * len(bkeys)]
        lines += [f"| {v} | " + " | ".join(_cell(e["buckets"][k]) for k in bkeys) + " |" for v, e in agg.items()]
        lines.append("")
    for k in keys:
        what = " (the fine-tuning length)" if k == train else " (the pretraining length)" if k == "1x" else ""
        mean = {v: _mean(agg, v, k) for v in agg}
        best = min(mean, key=mean.get)
        text = f"- At {k} L{what}: lowest loss `{best}` ({mean[best]:.3f}, {agg[best]['params']:,} trained)"
        for g in ("zero-shot", "search", "rotary only"):
            members = [v for v in agg if VARIANTS[v].group == g]
            if members:
                b = min(members, key=mean.get)
                text += f"; best {g} `{b}` ({mean[b]:.3f})"
        lines.append(text + ". Per trained number (each beats every variant with as few or fewer): " + ", ".join(
            f"`{v}` ({agg[v]['params']:,}: {mean[v]:.3f})" for v in _pareto(agg, k)) + ".")
    lines.append("")
    lines.append("Variants: " + "; ".join(f"`{v}` {VARIANTS[v].description}" for v in agg) + f" (factor "
                 f"{cfg.factor}, LoRA rank {cfg.lora_rank}).")
    return "\n".join(lines)


def plot(agg: dict, out: Path) -> Path:
    """``extend.png``: loss against evaluation length (zero-shot dashed); retrieval accuracy against length over
    the seeds whose pretrained model copies (every seed if none does); and every variant's loss at the
    fine-tuning length and twice it against its number of trained numbers (zero-shot at 0.5 on the log axis),
    each point named. Error bars are the 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colors = {v: plt.get_cmap("tab20")(i % 20) for i, v in enumerate(VARIANTS)}  # a variant's colour everywhere
    markers = {"zero-shot": "s", "search": "D", "rotary only": "o", "baseline": "^"}
    copying = copying_seeds(agg)
    panels = ((axes[0], agg, "loss"), (axes[1], _subset(agg, copying) if copying else agg, "retrieval"))
    for ax, data, what in panels:
        for v, e in data.items():
            keys = [k for k in e[what] if all(x is not None for x in e[what][k])]
            if not keys:
                continue
            xs = [float(k[:-1]) for k in keys]
            cis = [_ci(e[what][k]) for k in keys]
            ax.errorbar(xs, [c[0] for c in cis], yerr=[c[1] for c in cis], marker=markers[VARIANTS[v].group],
                        markersize=3, capsize=2, label=v, color=colors[v], linewidth=1,
                        linestyle="--" if VARIANTS[v].group == "zero-shot" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}x" for x in xs])
        ax.set_xlabel("evaluation length / pretraining length L")
    axes[0].set_ylabel("validation loss (nats per byte)")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set_ylabel("retrieval accuracy (value letters)")
    axes[1].set_title("retrieval probe, seeds whose pretrained model copies: "
                      + (", ".join(map(str, copying)) if copying else "none (every seed shown)"), fontsize=9)
    ax = axes[2]
    keys = list(next(iter(agg.values()))["loss"])
    train = keys[len(keys) // 2]  # the fine-tuning length sits in the middle of 1x .. 4 factor x
    for k, color in ((train, "tab:blue"), (keys[len(keys) // 2 + 1], "tab:red")):
        xs = [max(e["params"], 0.5) for e in agg.values()]
        ys = [_ci(e["loss"][k])[0] for e in agg.values()]
        ax.scatter(xs, ys, s=14, color=color, label=f"loss @{k}")
        for v, x, y in zip(agg, xs, ys):
            ax.annotate(v, (x, y), fontsize=5, color=color, xytext=(3, 0), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trained numbers (zero-shot at 0.5)")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.legend(fontsize=7)
    ax.set_title("every variant against its trained numbers", fontsize=9)
    fig.tight_layout()
    path = Path(out) / "extend.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
