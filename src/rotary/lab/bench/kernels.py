"""Suite ``kernels``: the contenders side by side, against the copy floor, with real peak memory.

Each (shape, dtype, pass) group times all contenders round-robin in one process, so that machine drift hits all
alike; warm-up runs outside the timed region; devices are synchronised; medians and the interquartile spread
are reported, and every median also as a multiple of a same-size tensor copy ("x copy", the memory floor). The
contenders are :data:`rotary.lab.bench.contenders.CONTENDERS`; peak memory is measured for forward+backward by
:func:`rotary.lab.bench.memory.peak_bytes`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from rotary.lab.bench.contenders import CONTENDERS, Case, Shape
from rotary.lab.bench.memory import peak_bytes
from rotary.lab.bench.rows import Row
from rotary.lab.bench.timing import median, spread, sync, time_interleaved

SUITE = "kernels"
FLOOR = "copy (floor)"
PASSES = ("forward", "forward+backward")


def shapes(quick: bool) -> list[Shape]:
    if quick:
        return [Shape("decode b1", 1, 1, 12, 64, 4096), Shape("train", 2, 64, 4, 32)]
    return [
        Shape("decode b1", 1, 1, 12, 64, 4096),
        Shape("decode b16", 16, 1, 12, 64, 4096),
        Shape("train", 8, 2048, 12, 64),
    ]


def section(shape: Shape, pass_: str) -> str:
    dims = (shape.batch, shape.seq, shape.heads, shape.head_dim)
    return f"{shape.name}: (B, T, H, D) = {dims}, offset {shape.offset}, {pass_}"


def _runner(case: Case, pass_: str, generator: torch.Generator):
    if pass_ == "forward":
        def run():
            with torch.no_grad():
                case.forward()
        return run
    grads = {}

    def run_fb():
        y = case.forward()
        if "g" not in grads:
            grads["g"] = torch.randn(y.shape, dtype=y.dtype, device=y.device, generator=generator)
        torch.autograd.grad(y, case.inputs, grads["g"], allow_unused=True)

    return run_fb


def suite(
    *,
    quick: bool = False,
    device: torch.device | str | None = None,
    seed: int = 0,
    repeats: int | None = None,
    log: Callable[[str], None] | None = None,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    contenders: list[str] | None = None,
    compile: bool = False,
    shape_list: list[Shape] | None = None,
    progress=None,
) -> list[Row]:
    """One row per (contender, shape, dtype, pass): median ms, spread, and as extra columns the dtype, the
    multiple of the copy floor and (forward+backward) the peak MiB; a contender that cannot run a case is a row
    with ``error``. Each contender's inputs come from a ``torch.Generator`` seeded with ``seed``; ``log``
    receives one line per contender skipped because its package is missing; ``progress(total)``, if given,
    returns a bar with ``update(n)`` and ``close()``."""
    log = log or (lambda line: None)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = contenders or list(CONTENDERS)
    if FLOOR not in names:
        names = [FLOOR, *names]
    repeats = repeats or (2 if quick else 15)
    groups = [(s, d, p) for s in (shape_list or shapes(quick)) for d in dtypes for p in PASSES]
    rows: list[Row] = []
    skipped: set[str] = set()
    floor_times: dict = {}  # (shape, dtype) -> copy times from every group: one floor for both passes
    bar = progress(total=len(groups) * len(names)) if progress else None
    for shape, dtype_name, pass_ in groups:
        dtype = getattr(torch, dtype_name)
        cases, errors = {}, {}
        for name in names:
            if name in skipped:
                continue
            generator = torch.Generator(dev).manual_seed(seed)  # every contender sees the same inputs
            try:
                case = CONTENDERS[name](shape, dtype, dev, generator)
                if compile and name != FLOOR:
                    case = Case(torch.compile(case.forward), case.inputs)
                fn = _runner(case, "forward" if name == FLOOR else pass_, generator)  # the floor: one plain copy
                fn()  # fails here rather than inside the timed loop
                cases[name] = fn
            except ImportError as e:
                skipped.add(name)
                log(f"kernels: skipped {name}: not installed ({e.name or e}); pip install 'rotary[bench]'")
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        # a contender far slower than the rest (the original module) gets fewer repeats, timed separately
        slow = {n for n, fn in cases.items() if _once(fn, dev) > 0.5}
        times = time_interleaved({n: f for n, f in cases.items() if n not in slow}, device=dev, repeats=repeats)
        if slow:
            times.update(time_interleaved({n: cases[n] for n in slow}, device=dev, repeats=3, warmup=1))
        if FLOOR in times:
            floor_times.setdefault((shape.name, dtype_name), []).extend(times[FLOOR])
        for name in names:
            if name in skipped:
                continue
            info = {"shape": shape.name, "dims": [shape.batch, shape.seq, shape.heads, shape.head_dim],
                    "offset": shape.offset, "dtype": dtype_name, "pass": pass_, "repeats": len(times.get(name, []))}
            row = Row(SUITE, section(shape, pass_), name, None, "ms", device=str(dev), info=info,
                      extra={"dtype": dtype_name, "x copy": None, "peak MiB": None})
            if name in errors or name not in times:
                row.error = errors.get(name, "not run")
            else:
                row.value, row.spread = median(times[name]) * 1e3, spread(times[name])
                if pass_ == "forward+backward" and name != FLOOR:
                    peak = peak_bytes(cases[name], dev)
                    row.info["peak_bytes"] = peak
                    row.extra["peak MiB"] = None if peak is None else round(peak / 2**20, 1 if peak > 2**20 else 3)
            rows.append(row)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    for r in rows:
        pooled = floor_times.get((r.info["shape"], r.info["dtype"]))
        if r.value is not None and pooled:
            r.extra["x copy"] = r.info["ratio_to_copy"] = r.value / 1e3 / median(pooled)
    return rows


def _once(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def plot(rows: list[Row], path: str) -> None:
    """One panel per (shape, pass) of the kernels rows: bars of the multiple of the copy floor, per contender and
    dtype (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.suite == SUITE]
    panels = list(dict.fromkeys((r.info["shape"], r.info["pass"]) for r in rows))
    dtypes = list(dict.fromkeys(r.info["dtype"] for r in rows))
    names = list(dict.fromkeys(r.name for r in rows))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for ax, (shape, pass_) in zip(axes[:, 0], panels):
        width = 0.8 / len(dtypes)
        for k, dt in enumerate(dtypes):
            vals = []
            for n in names:
                r = next((r for r in rows if (r.info["shape"], r.info["pass"], r.info["dtype"], r.name)
                          == (shape, pass_, dt, n)), None)
                vals.append(r.extra["x copy"] if r and r.extra["x copy"] else 0.0)
            ax.bar([i + k * width for i in range(len(names))], vals, width, label=dt)
        ax.set_yscale("log")
        ax.set_ylabel("x copy time")
        ax.set_title(f"{shape}, {pass_}", fontsize=9)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
