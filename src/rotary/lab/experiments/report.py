"""Aggregate run results (mean ± std over seeds) into a terminal/markdown table, JSON and PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from rotary.lab.experiments.schemes import DESCRIPTIONS


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: list[dict]) -> dict:
    """``{task: {scheme: {...}}}`` with mean/std of every metric over seeds."""
    out: dict = {}
    for r in results:
        out.setdefault(r["task"], {}).setdefault(r["scheme"], []).append(r)
    agg: dict = {}
    for task, by_scheme in out.items():
        agg[task] = {}
        for scheme, runs in by_scheme.items():
            entry = {"seeds": [r["seed"] for r in runs], "params": runs[0]["params"],
                     "steps": runs[0]["steps"], "note": runs[0].get("note")}
            for metric in ("loss", "accuracy"):
                entry[metric] = {}
                for key in runs[0][metric]:
                    vals = [r[metric][key] for r in runs]
                    entry[metric][key] = None if any(v is None for v in vals) else _mean_std(vals)
            entry["scaled"] = {}
            for scaling in runs[0].get("scaled", {}):
                entry["scaled"][scaling] = {
                    key: tuple(_mean_std([r["scaled"][scaling][key][i] for r in runs]) for i in (0, 1))
                    for key in runs[0]["scaled"][scaling]
                }
            entry["tokens_per_second"] = _mean_std([r["tokens_per_second"] for r in runs])
            entry["train_seconds"] = _mean_std([r["train_seconds"] for r in runs])
            agg[task][scheme] = entry
    return agg


def _fmt(ms, digits=3, scale=1.0):
    if ms is None:
        return "n/a"
    return f"{ms[0] * scale:.{digits}f} ± {ms[1] * scale:.{digits}f}"


# Student t quantiles t(0.975, n - 1) for the 95% confidence interval of a mean over n seeds
_T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def interval95(ms, n: int):
    """(mean, half-width of the 95% confidence interval) from (mean, std) over n seeds; half-width 0 for n = 1."""
    if ms is None:
        return None
    return ms[0], (ms[1] * _T975.get(n, 1.96) / math.sqrt(n) if n > 1 else 0.0)


def markdown(agg: dict, task_metrics: dict[str, str], schemes: list[str], intervals=()) -> str:
    """The report's tables: mean ± std over seeds, or for the tasks in ``intervals`` mean ± the half-width of
    the 95% confidence interval."""
    lines = []
    for task, by_scheme in agg.items():
        metric = task_metrics.get(task, "loss")
        keys = list(next(iter(by_scheme.values()))["loss"])
        lines.append(f"### {task}\n")
        if metric == "accuracy":
            header = " | ".join(f"acc % @{k}" for k in keys)
        else:
            header = " | ".join(f"loss @{k} (ppl)" for k in keys)
        lines.append(f"| scheme | params | {header} | tokens/s | train s |")
        lines.append("|---|---:|" + "---:|" * len(keys) + "---:|---:|")
        for scheme in [s for s in schemes if s in by_scheme]:
            e = by_scheme[scheme]
            if metric == "accuracy" and task in intervals:
                cells = [_fmt(interval95(e["accuracy"][k], len(e["seeds"])), 1, 100) for k in keys]
            elif metric == "accuracy":
                cells = [_fmt(e["accuracy"][k], 1, 100) for k in keys]
            else:
                cells = [
                    "n/a" if e["loss"][k] is None else f"{_fmt(e['loss'][k])} ({math.exp(e['loss'][k][0]):.2f})"
                    for k in keys
                ]
            lines.append(f"| {scheme} | {e['params']:,} | {' | '.join(cells)} | "
                         f"{e['tokens_per_second'][0]:,.0f} | {e['train_seconds'][0]:.1f} |")
        notes = sorted({f"{s}: {e['note']}" for s, e in by_scheme.items() if e.get("note")})
        if notes:
            lines.append("\nn/a: " + "; ".join(notes))
        lines.append("")
        scaled = [(s, e) for s, e in by_scheme.items() if e.get("scaled")]
        if scaled:
            idx, label = (1, "acc %") if metric == "accuracy" else (0, "loss")
            longer = [k for k in keys if k != "1x"]
            lines.append(f"Context extension applied at evaluation time ({label}; 'as trained' = no scaling):\n")
            lines.append("| trained as | scaling | " + " | ".join(f"{label} @{k}" for k in longer) + " |")
            lines.append("|---|---|" + "---:|" * len(longer))
            for s, e in scaled:
                unscaled = [e[metric][k] for k in longer]
                scale = 100 if metric == "accuracy" else 1
                digits = 1 if metric == "accuracy" else 3
                lines.append(f"| {s} | as trained | " + " | ".join(_fmt(v, digits, scale) for v in unscaled) + " |")
                for name, values in e["scaled"].items():
                    cells = [_fmt(values[k][idx], digits, scale) for k in longer]
                    lines.append(f"| {s} | {name} | " + " | ".join(cells) + " |")
            lines.append("")
    lines.append("Schemes: " + "; ".join(f"`{s}` {DESCRIPTIONS[s]}" for s in schemes) + ".")
    return "\n".join(lines)


def plots(results: list[dict], agg: dict, out: Path, task_metrics: dict[str, str], schemes: list[str]) -> list[Path]:
    """``curves.png`` (validation loss against step) and ``lengths.png`` (metric against evaluation length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(agg)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for scheme in [s for s in schemes if s in agg[task]]:
            runs = [r for r in results if r["task"] == task and r["scheme"] == scheme]
            steps = [p[0] for p in runs[0]["curve"]]
            mean = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(len(steps))]
            ax.plot(steps, mean, label=scheme)
        ax.set_title(f"{task}: validation loss at the training length", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=6)
    save(fig, "curves.png")

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = task_metrics.get(task, "loss")
        for scheme in [s for s in schemes if s in agg[task]]:
            e = agg[task][scheme][metric]
            xs = [float(k[:-1]) for k, v in e.items() if v is not None]
            ys = [v[0] for v in e.values() if v is not None]
            err = [v[1] for v in e.values() if v is not None]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=scheme)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation size / training size (length; side for 2-D)")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {metric} against length", fontsize=9)
        ax.legend(fontsize=6)
    save(fig, "lengths.png")
    return written
