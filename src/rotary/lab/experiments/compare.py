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
- checkpoints record their run and settings (see :mod:`rotary.lab.experiments.train`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from rotary.lab.experiments import extend, extend_report, vision
from rotary.lab.experiments.data import TextTask, make_task
from rotary.lab.experiments.grid import TASKS_2D, GridTask, make_grid_task
from rotary.lab.experiments.report import aggregate, load_results, markdown, plots
from rotary.lab.experiments.schemes import SCHEMES, SCHEMES_2D
from rotary.lab.experiments.train import CompareError, TrainConfig, atomic_json, rank_and_world, run_name, train_run

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["DEFAULT_TASKS", "QUICK", "QUICK_2D", "QUICK_EXTEND", "CompareError", "folder_lock", "plan",
           "run_comparison"]

QUICK = TrainConfig(steps=30, batch=8, length=32, eval_batches=1, eval_every=10, checkpoint_every=10, dims=32,
                    heads=2, layers=1, warmup=5)
QUICK_2D = vision.QUICK_2D
QUICK_EXTEND = extend.QUICK_EXTEND
GROWABLE = extend.GROWABLE
# The default: the 2-D tasks (6 schemes x 5 seeds each) and one 1-D task, all 1-D schemes x 3 seeds, to stay under
# 15 minutes on 2 CPU cores; `--tasks text lookback copy` is the full 1-D comparison (about 13 minutes alone).
DEFAULT_TASKS = ("text", "grid", "digits")


def _differences(previous: dict, settings: dict) -> list[str]:
    """``"steps: 4 there, 3 now"`` for each setting that differs; the training budget's fields by their own name,
    the extend task's as ``extend.<field>``, but those it may grow by (more seeds, other variants)."""
    def flat(d):
        extend = d.get("extend")
        return {**{k: v for k, v in d.items() if k not in ("train", "extend")}, **d.get("train", {}),
                **({f"extend.{k}": v for k, v in extend.items() if k not in GROWABLE} if isinstance(extend, dict)
                   else {})}

    a, b = flat(previous), flat(settings)
    if previous.get("tasks") == settings.get("tasks") == ["extend"]:  # --seeds then counts the extend task's alone
        a.pop("seeds", None)
        b.pop("seeds", None)
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


@contextlib.contextmanager
def folder_lock(out: Path):
    """Hold ``out/.lock`` for the duration; CompareError if another process (or another open) holds it."""
    try:
        f = open(out / ".lock", "a+")  # noqa: SIM115 (closed by the with below, once the error path is past)
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
    work = [p.name for p in (*(out / "runs").glob("*.json"), *(out / "checkpoints").glob("*.pt"),
                             *(out / "pretrained").glob("*.pt"))]
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
                   resume=False, device="cpu", progress=None, interrupt_after=None, schemes_2d: list[str] | None = None,
                   seeds_2d: int = 5, cfg_2d: vision.GridConfig | None = None,
                   cfg_extend: extend.ExtendConfig | None = None) -> dict | None:
    """Train everything not yet done and write the report; returns ``{"aggregate", "markdown", "files"}`` on
    rank 0 (None on other ranks, or when ``interrupt_after`` stopped it). Raises CompareError for a folder that
    belongs to another comparison or process, or cannot be written (see the module docstring).

    The 2-D tasks (``grid``, ``digits``: :mod:`rotary.lab.experiments.grid`) train the classifier of
    :mod:`rotary.lab.experiments.vision` with ``schemes_2d`` (default: all of SCHEMES_2D), ``seeds_2d`` seeds and the
    budget ``cfg_2d`` (default :class:`rotary.lab.experiments.vision.GridConfig`), on rank 0 alone; ``schemes``,
    ``seeds`` and ``cfg`` are the 1-D tasks'. The ``extend`` task (:mod:`rotary.lab.experiments.extend`: pretrain
    on the text corpus, then fine-tune variants at a longer length) runs with ``cfg_extend`` (default
    :class:`rotary.lab.experiments.extend.ExtendConfig`, its seeds included), on rank 0 alone."""
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise CompareError(f"unknown scheme(s) {', '.join(unknown)}; choose from {', '.join(SCHEMES)}")
    schemes_2d = list(SCHEMES_2D) if schemes_2d is None else schemes_2d
    unknown = [s for s in schemes_2d if s not in SCHEMES_2D]
    if unknown:
        raise CompareError(f"unknown 2-D scheme(s) {', '.join(unknown)}; choose from {', '.join(SCHEMES_2D)}")
    cfg_2d = vision.GridConfig() if cfg_2d is None else cfg_2d
    task_objs = [make_grid_task(t) if t in TASKS_2D else make_task(t, data) for t in tasks if t != "extend"]
    settings = {"tasks": tasks, "schemes": schemes, "seeds": seeds, "data": data, "train": asdict(cfg)}
    if any(t in TASKS_2D for t in tasks):  # only then: folders of 1-D comparisons keep their settings
        settings.update(schemes_2d=schemes_2d, seeds_2d=seeds_2d, train_2d=asdict(cfg_2d))
    text_task = None
    if "extend" in tasks:  # likewise
        cfg_extend = extend.ExtendConfig() if cfg_extend is None else cfg_extend
        text_task = next((t for t in task_objs if isinstance(t, TextTask)), None) or make_task("text", data)
        extend.check(cfg_extend, text_task, data)
        settings.update(extend=asdict(cfg_extend))
    settings = json.loads(json.dumps(settings))
    out = Path(out)
    _make_folder(out)
    # rank 0 alone holds the lock: the other ranks of one torchrun job are the same comparison
    lock = folder_lock(out) if rank_and_world()[0] == 0 else contextlib.nullcontext()
    with lock:
        plan(out, settings, resume)
        return _run(task_objs, tasks, schemes, seeds, cfg, out, settings, device, progress, interrupt_after,
                    schemes_2d, seeds_2d, cfg_2d, text_task, cfg_extend, data)


def _run(task_objs, tasks, schemes, seeds, cfg, out, settings, device, progress, interrupt_after,
         schemes_2d, seeds_2d, cfg_2d, text_task, cfg_extend, data) -> dict | None:
    def runs_of(t):
        return ((s, seed) for s in schemes_2d for seed in range(seeds_2d)) if isinstance(t, GridTask) else (
            (s, seed) for s in schemes for seed in range(seeds))

    todo = [(t, s, seed) for t in task_objs for s, seed in runs_of(t)
            if not (out / "runs" / f"{run_name(t.name, s, seed)}.json").exists()]
    steps = sum(cfg_2d.steps * t.step_factor if isinstance(t, GridTask) else cfg.steps for t, _, _ in todo)
    if text_task is not None and rank_and_world()[0] == 0:
        steps += extend.pending_steps(out, cfg_extend, data)
    bar = progress(steps) if progress else None
    for task, scheme, seed in todo:
        if bar is not None:
            bar.set_description(run_name(task.name, scheme, seed))
        if isinstance(task, GridTask):  # seconds per run: rank 0 trains it alone, no mid-run checkpoints
            if rank_and_world()[0] == 0:
                vision.train_run(task, scheme, seed, cfg_2d, out, device=device,
                                 on_step=(lambda: bar.update(1)) if bar is not None else None)
            continue
        result = train_run(task, scheme, seed, cfg, out, device=device, settings=settings,
                           on_step=(lambda: bar.update(1)) if bar is not None else None,
                           interrupt_after=interrupt_after)
        if result is None and rank_and_world()[0] == 0 and interrupt_after is not None:
            return None
    if text_task is not None and rank_and_world()[0] == 0 and not extend.run_extend(  # rank 0 alone
            text_task, cfg_extend, out, data=data, settings=settings, device=device, bar=bar,
            interrupt_after=interrupt_after):
        return None
    if bar is not None:
        bar.close()
    if rank_and_world()[0] != 0:
        return None
    results = [r for r in load_results(out) if r["task"] in tasks and r["task"] != "extend"
               and r["scheme"] in (schemes_2d if r["task"] in TASKS_2D else schemes)]
    agg = aggregate(results)
    metrics = {t.name: t.metric for t in task_objs}
    two_d = [t.name for t in task_objs if isinstance(t, GridTask)]
    one_d = schemes if len(two_d) < len(task_objs) else []
    all_schemes = one_d + [s for s in (schemes_2d if two_d else []) if s not in one_d]
    text = markdown(agg, metrics, all_schemes, intervals=two_d) if task_objs else ""
    agg_extend = {}
    if text_task is not None:
        agg_extend = extend_report.aggregate(extend_report.load_results(out))
        seconds = extend_report.pretrain_seconds(out, cfg_extend, data)
        found = extend_report.pretraining(out, cfg_extend, data)
        text = "\n\n".join(t for t in (text, extend_report.markdown(agg_extend, cfg_extend, seconds, found)) if t)
    files = [out / "report.md", out / "results.json"]
    descriptions = [f"`{t.name}`: {t.description}" for t in task_objs]
    if text_task is not None:
        descriptions.append(f"`extend`: {extend.DESCRIPTION} ({text_task.description})")
    header = "# rotary compare\n\nTasks: " + "; ".join(descriptions) + ".\n\n"
    if len(two_d) < len(task_objs):
        header += (f"Budget per run: {cfg.steps} steps of {cfg.batch} x {cfg.length} tokens; model {cfg.layers} "
                   f"layers, width {cfg.dims}, {cfg.heads} heads; mean ± std over {seeds} seed(s).\n\n")
    if two_d:
        header += (f"2-D tasks ({', '.join(two_d)}): a bidirectional classifier, {cfg_2d.layers} layers, width "
                   f"{cfg_2d.dims}, {cfg_2d.heads} heads, RoPE base {cfg_2d.base:g}; {cfg_2d.steps} steps of "
                   f"{cfg_2d.batch} images (times the task's step factor: digits 2); mean ± half-width of the 95% "
                   f"confidence interval (Student t) over {seeds_2d} seed(s); columns are the evaluation side over "
                   f"the training side.\n\n")
    images = ["![curves](curves.png)", "![lengths](lengths.png)"] if task_objs else []
    images += ["![extend](extend.png)"] if text_task is not None else []
    (out / "report.md").write_text(header + text + "".join(f"\n\n{i}" for i in images) + "\n")
    record = {"settings": settings, "aggregate": agg, "runs": results}
    if text_task is not None:
        record.update(extend={"aggregate": agg_extend, "runs": extend_report.load_results(out)})
    atomic_json(record, out / "results.json")
    try:
        if task_objs:
            files += plots(results, agg, out, metrics, all_schemes)
        if agg_extend:
            files.append(extend_report.plot(agg_extend, out))
    except ImportError:
        pass  # matplotlib missing: the CLI says so
    return {"aggregate": agg, "markdown": text, "files": files}
