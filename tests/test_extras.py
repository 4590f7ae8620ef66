"""pyproject.toml's extras install together: no pin of one breaks another (peft refuses LoRA beside a torchao older
than 0.16), dev holds peft, torch is declared so that an installed build is kept; the bench's torchtune contender
loads torchtune's rope file without torchtune's package (which imports torchao)."""

import sys
from itertools import combinations
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version  # packaging: a dependency of pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[Requirement]] = {
    name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()
}
BASE = [Requirement(r) for r in PROJECT["dependencies"]]


def _specifiers(reqs: list[Requirement], name: str) -> SpecifierSet:
    spec = SpecifierSet()
    for r in reqs:
        if r.name.lower() == name:
            spec &= r.specifier
    return spec


@pytest.mark.parametrize("extras", [(e,) for e in EXTRAS] + list(combinations(EXTRAS, 2)), ids="+".join)
def test_pins_of_extras_installed_together_agree(extras):
    """A package pinned (==) in one extra is pinned to the same release everywhere, and that release meets every
    other specifier the extras (and the dependencies) give it."""
    reqs = BASE + [r for e in extras for r in EXTRAS[e]]
    for package in {r.name.lower() for r in reqs}:
        spec = _specifiers(reqs, package)
        pins = {s.version for s in spec if s.operator == "=="}
        assert len(pins) <= 1, f"{extras}: {package} pinned to {pins}"
        if pins:
            assert spec.contains(pins.pop(), prereleases=True), f"{extras}: {package} {spec}"


def test_no_extra_pulls_torchao():
    """peft refuses LoRA beside a torchao older than 0.16, and torchtune 0.6.1's package imports torchao releases
    whose NF4 tensor newer ones lack: so the bench loads torchtune's rope file alone, and nothing may pull torchao,
    by name or through torchtune's package on an import path."""
    for name, reqs in {"dependencies": BASE, **EXTRAS}.items():
        assert not [r for r in reqs if r.name.lower() == "torchao"], f"{name} names torchao"


def test_an_installed_torchao_is_one_peft_accepts():
    """Whatever brought it, a torchao in this environment must be one peft's LoRA accepts (>= 0.16)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = Version(version("torchao"))
    except PackageNotFoundError:
        pytest.skip("torchao is not installed")
    assert installed in SpecifierSet(">=0.16"), f"torchao {installed}: peft refuses LoRA beside it"


def test_dev_and_peft_extras_hold_peft_at_the_version_rotary_needs():
    """rotary.hf's PEFT install calls set_additional_trainable_modules(..., activate_adapter=): peft >= 0.18."""
    for name in ("dev", "peft"):
        peft = [r for r in EXTRAS[name] if r.name.lower() == "peft"]
        assert peft, f"{name} lacks peft"
        assert not peft[0].specifier.contains("0.17.1") and peft[0].specifier.contains("0.18.0"), peft[0]
    assert {"transformers", "accelerate"} <= {r.name.lower() for r in EXTRAS["peft"]}


def test_torch_is_a_lower_bound_in_the_dependencies_only():
    """An installed torch (the CPU wheel, or the CUDA build one chose) satisfies the project, so pip never swaps
    it: torch is named once, in the dependencies, with lower bounds only; no extra names torch or its siblings
    (a PyPI torch on Linux is the CUDA build)."""
    torch = [r for r in BASE if r.name.lower() == "torch"]
    assert len(torch) == 1 and torch[0].specifier, BASE
    assert {s.operator for s in torch[0].specifier} <= {">="}, torch[0]
    import torch as installed

    assert torch[0].specifier.contains(Version(installed.__version__).base_version), torch[0]
    for name, reqs in EXTRAS.items():
        named = {r.name.lower() for r in reqs} & {"torch", "torchvision", "torchaudio"}
        assert not named, f"extra {name} names {named}"


def test_torchtune_contender_loads_the_rope_file_without_the_package(tmp_path, monkeypatch):
    """A torchtune whose __init__ fails (as torchtune 0.6.1's does without torchao): the contender still gets its
    RotaryPositionalEmbeddings, and the package is never imported."""
    from rotary.lab.bench import contenders

    package = tmp_path / "torchtune"
    (package / "modules").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('torchao not installed', name='torchao')\n")
    (package / "modules" / "__init__.py").write_text("raise ImportError('not this either')\n")
    (package / "modules" / "position_embeddings.py").write_text("class RotaryPositionalEmbeddings:\n    marker = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "torchtune" or m.startswith(("torchtune.", "_rotary_bench_"))]:
        monkeypatch.delitem(sys.modules, name)
    cls = contenders._torchtune_rope()
    assert cls.marker == 1
    assert "torchtune" not in sys.modules and "torchao" not in sys.modules
    for name in [m for m in sys.modules if m.startswith("_rotary_bench_")]:
        monkeypatch.delitem(sys.modules, name)  # the next test loads the real one


def test_torchtune_missing_is_an_import_error_naming_it(monkeypatch):
    import importlib.util

    from rotary.lab.bench import contenders

    for name in [m for m in sys.modules if m.startswith("_rotary_bench_")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError) as e:
        contenders._torchtune_rope()
    assert e.value.name == "torchtune"
