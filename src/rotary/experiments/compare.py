"""Orchestration of `rotary compare`: every (task, scheme, seed) run, then the report. No printing here: the CLI
passes a progress callback and prints what this returns.

An output folder belongs to one comparison:

- its settings (tasks, schemes, seeds, data and the training budget) are written to ``config.json`` on the first
  start; any later start whose settings differ, with or without ``resume``, is refused with a
  :class:`CompareError` naming the differences (choose another folder, or the same settings and ``resume``);
  a start without ``resume`` into a folder holding results or checkpoints is refused too;
- one process at a time: ``out/.lock`` is held with ``fcntl.flock`` while a comparison runs, so a second process
  on the folder is refused; the operating system drops the lock when its holder exits or is killed, so a killed
  run never leaves the folder locked (no lock where ``fcntl`` is missing, i.e. on Windows);
- checkpoints record their run and settings (see :mod:`rotary.experiments.train`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from rotary.experiments.data import make_task
from rotary.experiments.report import aggregate, load_results, markdown, plots
from rotary.experiments.schemes import SCHEMES
from rotary.experiments.train import CompareError, TrainConfig, atomic_json, rank_and_world, run_name, train_run

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["QUICK", "CompareError", "folder_lock", "plan", "run_comparison"]

QUICK = TrainConfig(steps=30, batch=8, length=32, eval_batches=1, eval_every=10, checkpoint_every=10, dims=32,
                    heads=2, layers=1, warmup=5)


def _differences(previous: dict, settings: dict) -> list[str]:
    """``"steps: 4 there, 3 now"`` for each setting that differs; the training budget's fields by their own name."""
    def flat(d):
        return {**{k: v for k, v in d.items() if k != "train"}, **d.get("train", {})}

    a, b = flat(previous), flat(settings)
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


@contextlib.contextmanager
def folder_lock(out: Path):
    """Hold ``out/.lock`` for the duration; CompareError if another process (or another open) holds it."""
    try:
        f = open(out / ".lock", "a+")
    except OSError as e:
        raise CompareError(f"cannot write to --out {out}: {e.strerror or e}") from None
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise CompareError(f"{out} is in use by another rotary compare (pid {holder}): wait for it to "
                                   f"finish, or choose another --out") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
        yield


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareError(f"cannot create --out {out}: {e.strerror or e}") from None


def plan(out: Path, settings: dict, resume: bool) -> None:
    """Check that ``out`` may hold this comparison (see the module docstring), then prepare it."""
    path = out / "config.json"
    work = [p.name for p in (*(out / "runs").glob("*.json"), *(out / "checkpoints").glob("*.pt"))]
    if (out / "results.json").exists():
        work.append("results.json")
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CompareError(f"{path} cannot be read ({e}): choose another --out, or delete it") from None
        changed = _differences(previous, settings)
        if changed:
            raise CompareError(f"{out} holds a comparison with other settings ({'; '.join(changed)}): choose "
                               f"another --out, or repeat its settings with --resume")
        if work and not resume:
            raise CompareError(f"{out} already holds results or checkpoints of this comparison: pass --resume to "
                               f"continue them, or choose another --out")
    elif work:
        raise CompareError(f"{out} holds {work[0]} but no config.json recording its settings: choose another "
                           f"--out, or delete what it holds")
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        if rank_and_world()[0] == 0:
            atomic_json(settings, path)
    except OSError as e:
        raise CompareError(f"cannot write to --out {out}: {e.strerror or e}") from None


def run_comparison(*, tasks: list[str], schemes: list[str], seeds: int, cfg: TrainConfig, out: Path, data=None,
                   resume=False, device="cpu", progress=None, interrupt_after=None) -> dict | None:
    """Train everything not yet done and write the report; returns ``{"aggregate", "markdown", "files"}`` on
    rank 0 (None on other ranks, or when ``interrupt_after`` stopped it). Raises CompareError for a folder that
    belongs to another comparison or process, or cannot be written (see the module docstring)."""
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise CompareError(f"unknown scheme(s) {', '.join(unknown)}; choose from {', '.join(SCHEMES)}")
    task_objs = [make_task(t, data) for t in tasks]
    settings = json.loads(json.dumps({"tasks": tasks, "schemes": schemes, "seeds": seeds, "data": data,
                                      "train": asdict(cfg)}))
    out = Path(out)
    _make_folder(out)
    # rank 0 alone holds the lock: the other ranks of one torchrun job are the same comparison
    lock = folder_lock(out) if rank_and_world()[0] == 0 else contextlib.nullcontext()
    with lock:
        plan(out, settings, resume)
        return _run(task_objs, tasks, schemes, seeds, cfg, out, settings, device, progress, interrupt_after)


def _run(task_objs, tasks, schemes, seeds, cfg, out, settings, device, progress, interrupt_after) -> dict | None:
    todo = [(t, s, seed) for t in task_objs for s in schemes for seed in range(seeds)
            if not (out / "runs" / f"{run_name(t.name, s, seed)}.json").exists()]
    bar = progress(len(todo) * cfg.steps) if progress else None
    for task, scheme, seed in todo:
        if bar is not None:
            bar.set_description(run_name(task.name, scheme, seed))
        result = train_run(task, scheme, seed, cfg, out, device=device, settings=settings,
                           on_step=(lambda: bar.update(1)) if bar is not None else None,
                           interrupt_after=interrupt_after)
        if result is None and rank_and_world()[0] == 0 and interrupt_after is not None:
            return None
    if bar is not None:
        bar.close()
    if rank_and_world()[0] != 0:
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
    atomic_json({"settings": settings, "aggregate": agg, "runs": results}, out / "results.json")
    try:
        files += plots(results, agg, out, metrics, schemes)
    except ImportError:
        pass  # matplotlib missing: the CLI says so
    return {"aggregate": agg, "markdown": text, "files": files}
