"""Every import the README and docs/ show a reader runs: a documented import that fails is a bug."""

import importlib
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


# --- every Python block runs

# A block that is deliberately not runnable (a fragment of the reader's own model, a loop to fill in) says so on
# the line before its fence: `<!-- not run: why -->`, invisible on GitHub. The blocks of one page run in order in
# one namespace (a later block may use an earlier one's names), in a scratch directory. A block that needs an
# extra (transformers, openai-whisper, ...) is skipped, naming it, where that package is missing.
_BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", flags=re.S)
BLOCKS = {page.name: [(page.read_text()[: m.start()].count("\n") + 1, m.group("why"), m.group("code"))
                      for m in _BLOCK.finditer(page.read_text())]
          for page in PAGES if page.name != "CHANGELOG.md"}


def test_every_page_with_code_is_run():
    runnable = {name for name, blocks in BLOCKS.items() if any(why is None for _, why, _ in blocks)}
    assert {"README.md", "nd.md", "scaling.md", "decoder.md"} <= runnable
    assert all(why.strip() for blocks in BLOCKS.values() for _, why, _ in blocks if why is not None)


@pytest.mark.parametrize("page", [name for name, blocks in BLOCKS.items() if blocks])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page}"}
    for line, why, code in BLOCKS[page]:
        if why is not None:
            continue
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
        except ModuleNotFoundError as error:
            if error.name and error.name.split(".")[0] != "rotary":
                pytest.skip(f"{page}:{line} needs {error.name} (an extra: see pyproject.toml)")
            raise


# --- every dotted name a reader may look up resolves

# `rotary.x.y` in the docs (between backticks; not a state_dict key such as `rotary.mixer.*`, not an attribute
# path such as `model.rotary.mixer`), and :mod:/:func:/... roles and ``rotary.x`` in the package's docstrings.
_DOC_NAME = re.compile(r"(?<![\w.])(rotary(?:\.[A-Za-z_]\w*)+)(?!\w|\.\*|\.\w)")
_SRC_NAME = re.compile(r":(?:mod|func|class|meth|data|attr|obj):`~?(rotary(?:\.\w+)+)`|``(rotary(?:\.\w+)+)")
SRC = sorted((ROOT / "src" / "rotary").glob("**/*.py"))


def _resolves(name: str) -> bool | None:
    """Whether ``name`` is a module or an attribute path below one; None where an extra it needs is missing."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as error:
            if error.name and error.name.split(".")[0] != "rotary":
                return None
            continue
        except ImportError:  # e.g. rotary.hf.whisper: a submodule under the short name, not importable as such
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _names() -> list[tuple[str, str]]:
    found = set()
    for page in PAGES:
        if page.name == "CHANGELOG.md":
            continue
        for span in re.findall(r"`([^`\n]+)`", page.read_text()):
            found |= {(page.name, m.group(1)) for m in _DOC_NAME.finditer(span)
                      if not m.group(1).endswith((".py", ".md", ".json"))}  # file names
    for path in SRC:
        for m in _SRC_NAME.finditer(path.read_text()):
            found.add((path.name, m.group(1) or m.group(2)))
    return sorted(found)


def test_every_named_rotary_object_exists():
    missing = [f"{where}: {name}" for where, name in _names() if _resolves(name) is False]
    assert not missing, "names that do not resolve (moved? renamed?):\n" + "\n".join(missing)


# a block of docs/*.md that is `rotary bench --from PATH [SUITE ...]`'s output, verbatim
_GENERATED = re.compile(r"<!-- rotary bench --from (\S+)((?: [\w-]+)*) -->\n```\n(.*?)\n```\n<!-- end -->", re.S)


def test_generated_bench_blocks_are_their_json():
    """Figures copied from a run drift from it; these blocks are re-rendered from the saved run and compared."""
    import json

    from rotary.lab.bench.report import rendered

    blocks = [(page, m) for page in PAGES for m in _GENERATED.finditer(page.read_text())]
    assert len(blocks) >= 2, "docs/speed.md holds the decode and train tables as generated blocks"
    for page, m in blocks:
        doc = json.loads((page.parent / m.group(1)).read_text())
        suites = m.group(2).split() or None
        assert m.group(3) == rendered(doc, suites), f"{page.name}: rerun `rotary bench --from {m.group(1)}`"
