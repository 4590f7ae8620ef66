"""Every import the README and docs/ show a reader runs: a documented import that fails is a bug."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# `from rotary... import a, b` and `import rotary...` (the changelog's old names say what they were, not what is)
_IMPORT = re.compile(r"^\s*(?:from (rotary[\w.]*) import ([\w, ]+?)|import (rotary[\w.]*))\s*(?:#.*)?$")


def _imports(page: pathlib.Path) -> list[str]:
    found = []
    for block in re.findall(r"`([^`\n]+)`|```python\n(.*?)```", page.read_text(), flags=re.S):
        for line in "\n".join(block).splitlines():
            m = _IMPORT.match(line)
            if m and m.group(1):
                names = [n.strip() for n in m.group(2).split(",") if n.strip()]
                found.append(f"from {m.group(1)} import {', '.join(names)}")
            elif m:
                found.append(f"import {m.group(3)}")
    return found


IMPORTS = sorted({(page.name, line) for page in PAGES if page.name != "CHANGELOG.md" for line in _imports(page)})


def test_the_pages_show_imports():
    assert any("rotary.hf" in line for _, line in IMPORTS) and len(IMPORTS) >= 3


@pytest.mark.parametrize("page, line", IMPORTS, ids=[f"{p}: {line}" for p, line in IMPORTS])
def test_documented_import_runs(page, line):
    try:
        exec(line, {})
    except ImportError as error:
        pytest.fail(f"{page}: `{line}` fails: {error!r}")
