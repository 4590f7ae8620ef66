"""Orchestration of `rotary compare`: every (task, scheme, seed) run, then the report. No printing here: the CLI
passes a progress callback and prints what this returns."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rotary.experiments.data import make_task
from rotary.experiments.report import aggregate, load_results, markdown, plots
from rotary.experiments.schemes import SCHEMES
from rotary.experiments.train import TrainConfig, _atomic_json, _world, run_name, train_run

QUICK = TrainConfig(steps=30, batch=8, length=32, eval_batches=1, eval_every=10, checkpoint_every=10, dims=32,
                    heads=2, layers=1, warmup=5)


class CompareError(ValueError):
    """A bad combination of arguments or outputs; the message is one line for the CLI."""


def plan(out: Path, settings: dict, resume: bool) -> None:
    """Create ``out`` or check that resuming it continues the same comparison."""
    path = out / "config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if not resume and any((out / "runs").glob("*.json")):
            raise CompareError(f"{out} already holds results: pass --resume to continue them, or another --out")
        if resume and previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise CompareError(f"--resume with different settings than {path} ({', '.join(changed)})")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if _world()[0] == 0:
        _atomic_json(settings, path)


def run_comparison(*, tasks: list[str], schemes: list[str], seeds: int, cfg: TrainConfig, out: Path, data=None,
                   resume=False, device="cpu", progress=None, interrupt_after=None) -> dict | None:
    """Train everything not yet done and write the report; returns ``{"aggregate", "markdown", "files"}`` on
    rank 0 (None on other ranks, or when ``interrupt_after`` stopped it)."""
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise CompareError(f"unknown scheme(s) {', '.join(unknown)}; choose from {', '.join(SCHEMES)}")
    task_objs = [make_task(t, data) for t in tasks]
    settings = {"tasks": tasks, "schemes": schemes, "seeds": seeds, "data": data, "train": asdict(cfg)}
    plan(out, json.loads(json.dumps(settings)), resume)
    todo = [(t, s, seed) for t in task_objs for s in schemes for seed in range(seeds)
            if not (out / "runs" / f"{run_name(t.name, s, seed)}.json").exists()]
    bar = progress(len(todo) * cfg.steps) if progress else None
    for task, scheme, seed in todo:
        if bar is not None:
            bar.set_description(run_name(task.name, scheme, seed))
        result = train_run(task, scheme, seed, cfg, out, device=device,
                           on_step=(lambda: bar.update(1)) if bar is not None else None,
                           interrupt_after=interrupt_after)
        if result is None and _world()[0] == 0 and interrupt_after is not None:
            return None
    if bar is not None:
        bar.close()
    if _world()[0] != 0:
        return None
    results = [r for r in load_results(out) if r["task"] in tasks and r["scheme"] in schemes]
    agg = aggregate(results)
    metrics = {t.name: t.metric for t in task_objs}
    text = markdown(agg, metrics, schemes)
    files = [out / "report.md", out / "results.json"]
    header = (f"# rotary compare\n\nTasks: " + "; ".join(f"`{t.name}`: {t.description}" for t in task_objs)
              + f".\n\nBudget per run: {cfg.steps} steps of {cfg.batch} x {cfg.length} tokens; model {cfg.layers} "
              f"layers, width {cfg.dims}, {cfg.heads} heads; mean ± std over {seeds} seed(s).\n\n")
    (out / "report.md").write_text(header + text + "\n\n![curves](curves.png)\n\n![lengths](lengths.png)\n")
    _atomic_json({"settings": settings, "aggregate": agg, "runs": results}, out / "results.json")
    try:
        files += plots(results, agg, out, metrics, schemes)
    except ImportError:
        pass  # matplotlib missing: the CLI says so
    return {"aggregate": agg, "markdown": text, "files": files}
