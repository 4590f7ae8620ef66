"""`rotary bench` machinery: records, skipping missing anchors, JSON; the seed baseline's documented defects; the lab
modules leave printing, argv and seeding to the CLI."""

import ast
import json
from pathlib import Path

import pytest
import torch

from rotary.lab.bench import contenders as C
from rotary.lab.bench import run as bench
from rotary.lab.bench.seed import SeedRotary
from rotary.lab.cli import main

TINY = [C.Shape("tiny", 2, 8, 2, 8, 3)]


def test_records_and_json(tmp_path, monkeypatch):
    def missing(shape, dtype, device, generator):
        raise ImportError("no module", name="not_a_real_package")

    monkeypatch.setitem(C.CONTENDERS, "missing anchor", missing)
    logs = []
    records = bench.run(contenders=["Rotary givens", "original module (seed)", "missing anchor"], repeats=3,
                        dtypes=("float32", "bfloat16"), shape_list=TINY, log=logs.append)
    assert any("skipped missing anchor" in line for line in logs)
    names = {r.contender for r in records}
    assert names == {"copy (floor)", "Rotary givens", "original module (seed)"}
    ok = [r for r in records if r.contender == "Rotary givens"]
    assert len(ok) == 4 and all(r.median_s > 0 and r.ratio_to_copy > 0 for r in ok)
    assert all(r.peak_bytes > 0 for r in ok if r.pass_ == "forward+backward")
    # the seed's matrices are float32 whatever the input: bf16 is reported as n/a, not a crash
    seed_bf16 = [r for r in records if r.contender.startswith("original module") and r.dtype == "bfloat16"]
    assert all(r.error for r in seed_bf16)
    path = tmp_path / "bench.json"
    bench.to_json(records, str(path), bench.environment())
    data = json.loads(path.read_text())
    assert {"contender", "shape", "dtype", "pass", "median_s", "spread", "ratio_to_copy", "peak_bytes"} <= set(
        data["records"][0]
    )
    assert "Rotary givens" in bench.table(records)


def test_cli_rejects_unknown_contender(capsys):
    assert main(["bench", "--contenders", "nope"]) == 2
    assert "unknown contender" in capsys.readouterr().err


def test_seed_defects_are_real():
    """What the original module gets wrong, so that the baseline stays faithful."""
    torch.manual_seed(0)
    m = SeedRotary(dims=64, heads=4)
    x = torch.randn(2, 5, 64, requires_grad=True)
    m(x).sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        m(x).sum().backward()


def test_decoder_level_rows():
    rows = bench.decoder_level(quick=True, repeats=1)
    assert [r["mode"] for r in rows] == list(bench.DECODER_MODES)
    for r in rows:
        assert r["train_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        rotary = r["mode"] not in ("none", "learned", "sinusoidal")
        assert (0 < r["rotary_share_of_train_step"] < 1) if rotary else r["rotary_share_of_train_step"] == 0
    assert "rotary share" in bench.decoder_table(rows)


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func)


LAB = sorted((Path(__file__).parents[1] / "src" / "rotary").glob("[be]*/*.py"))  # bench/, experiments/


@pytest.mark.parametrize("path", LAB, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lab_modules_do_not_print_parse_argv_or_seed(path):
    """The CLI owns printing, argv and global seeds (issue 9): library code returns values or logs, and draws
    random numbers from generators it is given."""
    tree = ast.parse(path.read_text())
    imports = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imports |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "argparse" not in imports
    assert "sys.argv" not in path.read_text()
    calls = set(_calls(tree))
    assert "print" not in calls
    seeding = {"torch.manual_seed", "torch.random.manual_seed", "torch.seed", "torch.cuda.manual_seed",
               "torch.cuda.manual_seed_all", "random.seed", "np.random.seed", "torch.random.fork_rng"}
    assert not calls & seeding, calls & seeding


def test_inputs_come_from_the_seed_given():
    """Same seed, same records' inputs; the global RNG is not seeded by the runner."""
    torch.manual_seed(99)
    a = C.CONTENDERS["Rotary givens"](TINY[0], torch.float32, torch.device("cpu"), torch.Generator().manual_seed(5))
    b = C.CONTENDERS["Rotary givens"](TINY[0], torch.float32, torch.device("cpu"), torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))
    bench.run(contenders=["Rotary givens"], repeats=1, dtypes=("float32",), shape_list=TINY, seed=3)
    assert torch.initial_seed() == 99


@pytest.mark.parametrize("placement", [None, "attention", "embedding"])
def test_decoder_speed_builds_each_model_it_times(placement):
    """Every model `rotary decoder-speed` times builds and runs (a spelling no config accepts fails here)."""
    from rotary.lab.bench import decoder_speed as ds

    model = ds._model(64, "cpu", placement, "givens", torch.Generator().manual_seed(0))
    assert (model.rotary is None) == (placement is None)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 64)
