"""The one printer of benchmark rows: a Markdown table per (suite, section), readable in a terminal and pasteable
into docs/speed.md as it is; :func:`rendered` prints a saved ``--json`` run the same way (``rotary bench --from``),
which is how docs/speed.md's generated blocks are written and checked. Returns text; the CLI prints it."""

from __future__ import annotations

from rotary.lab.bench.rows import Row


def number(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "x":
        return f"{value:.3f}"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if a >= 100 else f"{value:.2f}" if a >= 1 else f"{value:.3f}"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return number(value, "x" if abs(value) < 100 else "")
    return str(value)


def table(rows: list[Row]) -> str:
    """Markdown: for each (suite, section) in order of appearance, a heading line and a table of its rows (the
    unit heads the value column when the rows share one); errors are listed under their table."""
    out = []
    for suite, section in dict.fromkeys((r.suite, r.section) for r in rows):
        group = [r for r in rows if (r.suite, r.section) == (suite, section)]
        extras = list(dict.fromkeys(k for r in group for k in r.extra))
        units = {r.unit for r in group}
        shared = units.pop() if len(units) == 1 else None  # then it heads the value column
        judged = any(r.target for r in group)
        header = ["measured", shared or "value", *([] if shared else ["unit"]), "IQR", *extras,
                  *(["target", "verdict"] if judged else [])]
        lines = [header]
        for r in group:
            cells = [r.name, "n/a" if r.error else number(r.value, r.unit), *([] if shared else [r.unit]),
                     "-" if r.spread is None else f"{r.spread:.0%}", *(_cell(r.extra.get(k)) for k in extras)]
            if judged:
                cells += [r.target or "", "" if r.ok is None else "met" if r.ok else "**missed**"]
            lines.append(cells)
        columns = list(zip(*lines))
        widths = [max(3, *(len(c) for c in col)) for col in columns]
        right = [i > 0 and header[i] not in ("unit", "target", "verdict")
                 and all(_numeric(c) or c in ("-", "n/a", "") for c in col[1:]) for i, col in enumerate(columns)]
        out.append(f"**{suite}: {section}**\n")
        for k, line in enumerate(lines):
            out.append("| " + " | ".join(c.rjust(w) if right[i] else c.ljust(w)
                                         for i, (c, w) in enumerate(zip(line, widths))) + " |")
            if k == 0:
                out.append("|" + "|".join("-" * (w + 1) + (":" if right[i] else "-") for i, w in enumerate(widths))
                           + "|")
        out += [f"- {r.name}{_where(r)}: {r.error}" for r in group if r.error]
        out.append("")
    return "\n".join(out)


def _where(r: Row) -> str:
    return f" ({r.extra['dtype']})" if "dtype" in r.extra else ""


def _numeric(cell: str) -> bool:
    return cell[:1].isdigit() or (cell[:1] in "-." and cell[1:2].isdigit())


def verdicts(rows: list[Row]) -> str:
    """One line per judged row: the summary the CLI ends with."""
    judged = [r for r in rows if r.ok is not None]
    if not judged:
        return ""
    met = sum(r.ok for r in judged)
    lines = [f"targets: {met} of {len(judged)} met"]
    lines += [f"  missed: {r.suite}: {r.section}: {r.name} {number(r.value, r.unit)} (target {r.target})"
              for r in judged if not r.ok]
    return "\n".join(lines)


def rows_of(doc: dict) -> list[Row]:
    """The rows of a ``rotary bench --json`` document."""
    return [Row(**r) for r in doc["rows"]]


def rendered(doc: dict, suites: list[str] | None = None) -> str:
    """A saved run as ``rotary bench`` printed it: the environment line, the tables of ``suites`` (all: None) and
    the verdicts. docs/speed.md holds these verbatim between ``<!-- rotary bench --from PATH ... -->`` and
    ``<!-- end -->`` (tests/test_docs.py checks them against the JSON)."""
    rows = [r for r in rows_of(doc) if suites is None or r.suite in suites]
    env = ", ".join(f"{k} {v}" for k, v in doc["environment"].items() if v is not None and k != "suite_seconds")
    parts = [f"`{doc['command']}`: {env}", "", table(rows).rstrip()]
    summary = verdicts(rows)
    return "\n".join(parts + (["", summary] if summary else []))

