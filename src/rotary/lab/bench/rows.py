"""The result row every benchmark suite returns, and the two ways suites make rows from timings.

A row is one number: a contender's median time, a throughput, or a ratio of two medians. Rows with a ``key`` are
the ones a target in :mod:`rotary.lab.bench.targets` judges (``(suite, key)`` names the target); the runner fills
``target`` and ``ok`` from that table, suites never do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rotary.lab.bench.timing import median, spread


@dataclass
class Row:
    suite: str  # the suite that measured it ("kernels", "nd", ...)
    section: str  # the setting the rows of one printed table share (shape, model, pass)
    name: str  # what was measured: a contender, or a ratio "a / b"
    value: float | None  # None when it could not be measured (``error`` says why)
    unit: str  # "ms", "us", "ms/token", "tokens/s", "x" (a ratio)
    spread: float | None = None  # interquartile range / median of the repeats; of a ratio: the larger of its two
    key: str | None = None  # the target table's handle for this row, unique within its suite and section
    device: str = "cpu"
    extra: dict[str, object] = field(default_factory=dict)  # further printed columns, e.g. {"x copy": 2.1}
    info: dict[str, object] = field(default_factory=dict)  # structured setting, JSON only (dims, dtype, pass)
    error: str | None = None
    target: str | None = None  # filled by rotary.lab.bench.targets.judge: "<= 1.2", "1 +- 3%"
    ok: bool | None = None  # filled by judge: met or missed; None for rows no target names


def time_rows(suite: str, section: str, times: dict[str, list[float]], *, device: str, unit: str = "ms",
              per: float = 1.0, **info) -> list[Row]:
    """One row per contender of ``times`` (seconds per repeat): its median in ``unit`` ("ms" or "us"), divided
    by ``per`` (the calls or tokens one repeat holds), and its spread."""
    scale = {"ms": 1e3, "us": 1e6, "ms/token": 1e3, "us/call": 1e6}[unit]
    return [Row(suite, section, name, median(ts) * scale / per, unit, spread(ts), device=device, info=dict(info))
            for name, ts in times.items()]


def ratio_row(suite: str, section: str, name: str, times: dict[str, list[float]], a: str, b: str, *, device: str,
              key: str | None = None, invert: bool = False, **info) -> Row:
    """``median(times[a]) / median(times[b])`` (``invert``: b / a, for throughputs), spread the larger of the
    two contenders' spreads (the noise a "within noise" target allows)."""
    r = median(times[a]) / median(times[b])
    return Row(suite, section, name, 1 / r if invert else r, "x", max(spread(times[a]), spread(times[b])), key=key,
               device=device, info=dict(info))
