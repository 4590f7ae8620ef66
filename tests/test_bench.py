"""`rotary bench`: the suite registry, the one targets table and its verdicts, the printer, --json; the kernels
suite's records (skipped anchors, failing contenders); the original module's documented defects; the lab modules
leave printing, argv and seeding to the CLI. Smoke runs of every suite are marked `bench` (`pytest -m bench`)."""

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch

from rotary.lab.bench import contenders as C
from rotary.lab.bench import kernels, report, suites
from rotary.lab.bench.original import OriginalRotary
from rotary.lab.bench.rows import Row, ratio_row, time_rows
from rotary.lab.bench.targets import TARGETS, Target, find, judge
from rotary.lab.cli import main

TINY = [C.Shape("tiny", 2, 8, 2, 8, 3)]
INTERFACE = {"quick", "device", "seed", "repeats", "log"}


# --- the registry

@pytest.mark.parametrize("name", list(suites.SUITES))
def test_every_suite_loads_with_the_documented_interface(name):
    fn = suites.SUITES[name].load()
    params = inspect.signature(fn).parameters
    assert set(params) >= INTERFACE, f"{name}: {INTERFACE - set(params)} missing"
    assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in INTERFACE)


def test_expand_and_unknown_suites():
    assert suites.expand([]) == suites.expand(["all"]) == list(suites.SUITES)
    assert suites.expand(["nd", "kernels"]) == ["kernels", "nd"]  # registry order
    with pytest.raises(KeyError, match="unknown suite"):
        suites.expand(["nd", "nope"])


def test_a_suite_is_one_entry(monkeypatch):
    """A function registered under a new name runs through run_suite and its keyed rows get verdicts."""
    seen = {}

    def fake(*, quick, device, seed, repeats, log, extra_option=None):
        seen.update(quick=quick, device=device, seed=seed, repeats=repeats, extra_option=extra_option)
        times = {"a": [1.0, 1.1, 1.2], "b": [2.0, 2.0, 2.0]}
        return [*time_rows("fake", "s", times, device=str(device)),
                ratio_row("fake", "s", "a / b", times, "a", "b", key="a/b", device=str(device))]

    monkeypatch.setitem(suites.SUITES, "fake", suites.Suite(fake, "a test suite", devices=("cpu",)))
    monkeypatch.setattr("rotary.lab.bench.targets.TARGETS", [*TARGETS, Target("a / b", "fake", "a/b", 0.5, "<=")])
    rows = suites.run_suite("fake", quick=True, seed=7, repeats=3, extra_option=1)
    assert seen == {"quick": True, "device": torch.device("cpu"), "seed": 7, "repeats": 3, "extra_option": 1}
    ratio = rows[-1]
    assert ratio.value == pytest.approx(1.1 / 2.0) and (ratio.target, ratio.ok) == ("<= 0.5", False)
    assert rows[0].value == pytest.approx(1100.0) and rows[0].unit == "ms" and rows[0].ok is None


def test_missing_package_or_device_skips_the_suite_with_one_line(monkeypatch):
    def needs_package(**kw):
        raise ImportError("no module", name="not_a_real_package")

    monkeypatch.setitem(suites.SUITES, "needs", suites.Suite(needs_package, "x"))
    monkeypatch.setitem(suites.SUITES, "gpu-only", suites.Suite(needs_package, "x", devices=("not-a-device",)))
    logs = []
    assert suites.run_suite("needs", log=logs.append, device="cpu") == []
    assert suites.run_suite("gpu-only", log=logs.append, device="cpu") == []
    assert "not_a_real_package not installed" in logs[0] and "needs not-a-device" in logs[1]


def test_cpu_only_suites_run_on_the_cpu():
    assert suites.pick_device("hf", "cuda") == torch.device("cpu")
    assert suites.pick_device("nd", "cpu") == torch.device("cpu")


# --- the targets table and its verdicts

def test_targets_table_names_known_suites_once():
    keys = [(t.suite, t.ratio) for t in TARGETS]
    assert len(keys) == len(set(keys))
    assert {t.suite for t in TARGETS} <= set(suites.SUITES)
    assert {t.direction for t in TARGETS} <= {"<=", ">=", "+-", "~"}


@pytest.mark.parametrize("direction, goal, tolerance, value, spread, ok, text", [
    ("<=", 1.2, 0, 1.2, None, True, "<= 1.2"),
    ("<=", 1.2, 0, 1.21, None, False, "<= 1.2"),
    (">=", 50, 0, 49.9, None, False, ">= 50"),
    (">=", 50, 0, 50.1, None, True, ">= 50"),
    ("+-", 1.0, 0.03, 1.031, 0.5, False, "1 +- 3%"),  # a fixed band: the row's noise does not widen it
    ("+-", 1.0, 0.03, 0.975, None, True, "1 +- 3%"),
    ("~", 1.0, 0.02, 1.04, 0.05, True, "1 +- 5%"),  # within noise: the larger spread of the two contenders
    ("~", 1.0, 0.02, 1.03, 0.01, False, "1 +- 2%"),  # ... but never less than the tolerance
])
def test_verdicts(direction, goal, tolerance, value, spread, ok, text):
    t = Target("t", "nd", "k", goal, direction, tolerance)
    assert (t.met(value, spread), t.describe(spread)) == (ok, text)


def test_judge_fills_only_rows_a_target_names():
    t = find("nd", "mixed/1-D")
    rows = judge([Row("nd", "s", "mixed / 1-D", t.goal * 1.5, "x", 0.1, key="mixed/1-D"),
                  Row("nd", "s", "1-D", 10.0, "ms", 0.1),
                  Row("decode", "s", "same key, other suite", 9.0, "x", key="mixed/1-D"),
                  Row("nd", "s", "failed", None, "x", key="axial/1-D", error="boom")])
    assert (rows[0].target, rows[0].ok) == (f"<= {t.goal:g}", False)
    assert all(r.target is None and r.ok is None for r in rows[1:])


# --- the printer and --json

def test_table_prints_every_row_its_verdict_and_errors():
    rows = judge([Row("nd", "2-D", "1-D", 12.345, "ms", 0.04), Row("nd", "2-D", "2-D mixed / 1-D", 2.5, "x", 0.1,
                                                                      key="mixed/1-D"),
                  Row("kernels", "train", "Meta", None, "ms", extra={"dtype": "bfloat16"}, error="RuntimeError: x")])
    text = report.table(rows)
    assert "**nd: 2-D**" in text and "**kernels: train**" in text
    assert "12.35" in text and "4%" in text
    assert "2.500" in text and "<= 2" in text and "**missed**" in text
    assert "| n/a" in text and "- Meta (bfloat16): RuntimeError: x" in text
    assert "missed: nd: 2-D: 2-D mixed / 1-D 2.500 (target <= 2)" in report.verdicts(rows)
    for line in text.splitlines():  # each table's lines are Markdown rows of one width
        assert not line or line.startswith(("**", "| ", "|-", "- "))


def test_cli_json_holds_every_row_and_the_environment(tmp_path, monkeypatch, capsys):
    def fake(*, quick, device, seed, repeats, log):
        times = {"a": [1.0, 1.0], "b": [4.0, 4.0]}
        return [*time_rows("fake", "s", times, device=str(device)),
                ratio_row("fake", "s", "a / b", times, "a", "b", key="a/b", device=str(device))]

    monkeypatch.setitem(suites.SUITES, "fake", suites.Suite(fake, "a test suite"))
    monkeypatch.setattr("rotary.lab.bench.targets.TARGETS", [Target("a / b", "fake", "a/b", 0.5, "<=")])
    path = tmp_path / "bench.json"
    assert main(["bench", "fake", "--device", "cpu", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    env = doc["environment"]
    assert {"date", "machine", "torch", "threads", "device", "python"} <= set(env)
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads() and env["device"] == "cpu"
    assert set(env["suite_seconds"]) == {"fake"}
    assert doc["command"] == f"rotary bench fake --device cpu --json {path}"
    assert [r["name"] for r in doc["rows"]] == ["a", "b", "a / b"]
    ratio = doc["rows"][-1]
    assert ratio["value"] == 0.25 and ratio["target"] == "<= 0.5" and ratio["ok"] is True
    assert {"suite", "section", "unit", "spread", "device", "extra", "info", "error"} <= set(ratio)
    out = capsys.readouterr().out
    assert "**fake: s**" in out and "targets: 1 of 1 met" in out
    # --from prints the saved run's tables as the run printed them, without running anything
    monkeypatch.setitem(suites.SUITES, "fake", suites.Suite(lambda **kw: pytest.fail("ran"), "a test suite"))
    assert main(["bench", "--from", str(path)]) == 0
    again = capsys.readouterr().out
    assert again.startswith(f"`rotary bench fake --device cpu --json {path}`: date ")
    tables = out[out.index("**fake: s**"):out.index("targets:")]
    assert tables.strip() in again and "targets: 1 of 1 met" in again
    assert main(["bench", "--from", str(path), "kernels"]) == 0  # only the suites named: none of these rows
    assert "**fake: s**" not in capsys.readouterr().out


def test_cli_rejects_unknown_suite_and_contender(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert main(["bench", "kernels", "--contenders", "nope"]) == 2
    assert "unknown contender" in capsys.readouterr().err


def test_old_subcommands_are_gone():
    for old in ("targets", "decoder-speed"):
        with pytest.raises(SystemExit):
            main([old])


# --- the kernels suite's machinery

def test_kernels_rows(monkeypatch):
    def missing(shape, dtype, device, generator):
        raise ImportError("no module", name="not_a_real_package")

    monkeypatch.setitem(C.CONTENDERS, "missing anchor", missing)
    logs = []
    rows = kernels.suite(contenders=["Rotary givens", "original module", "missing anchor"], repeats=3,
                         dtypes=("float32", "bfloat16"), shape_list=TINY, log=logs.append, device="cpu")
    assert any("skipped missing anchor" in line for line in logs)
    assert {r.name for r in rows} == {"copy (floor)", "Rotary givens", "original module"}
    ok = [r for r in rows if r.name == "Rotary givens"]
    assert len(ok) == 4 and all(r.value > 0 and r.extra["x copy"] > 0 for r in ok)
    assert all(r.extra["peak MiB"] > 0 for r in ok if r.info["pass"] == "forward+backward")
    # the original module's matrices are float32 whatever the input: bf16 is reported as n/a, not a crash
    assert all(r.error and r.value is None for r in rows if r.name == "original module" and r.info["dtype"] ==
               "bfloat16")
    assert "original module" in C.CONTENDERS and not any("seed" in name for name in C.CONTENDERS)


def test_inputs_come_from_the_seed_given():
    """Same seed, same inputs; the global RNG is not seeded by the suite."""
    torch.manual_seed(99)
    a = C.CONTENDERS["Rotary givens"](TINY[0], torch.float32, torch.device("cpu"), torch.Generator().manual_seed(5))
    b = C.CONTENDERS["Rotary givens"](TINY[0], torch.float32, torch.device("cpu"), torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))
    kernels.suite(contenders=["Rotary givens"], repeats=1, dtypes=("float32",), shape_list=TINY, seed=3)
    assert torch.initial_seed() == 99


def test_seed_defects_are_real():
    """What the original module gets wrong, so that the baseline stays faithful."""
    torch.manual_seed(0)
    m = OriginalRotary(dims=64, heads=4)
    x = torch.randn(2, 5, 64, requires_grad=True)
    m(x).sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        m(x).sum().backward()


@pytest.mark.parametrize("placement", [None, "attention", "embedding"])
def test_decoder_suite_builds_each_model_it_times(placement):
    """Every model the decoder suite times builds and runs (a spelling no config accepts fails here)."""
    from rotary.lab.bench import decoder_speed as ds

    model = ds._model(ds.FULL, "cpu", placement, "givens", torch.Generator().manual_seed(0))
    assert (model.rotary is None) == (placement is None)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, ds.FULL.vocab)


def test_lora_suite_times_lora_alone_against_the_same_lora_with_rotary():
    """The lora suite's two PEFT models hold the same LoRA weights; the installed one also trains P (away from the
    identity), and its merged, folded copy is a stock Llama with no rotary left."""
    pytest.importorskip("peft")
    import copy

    import rotary
    from rotary.lab.bench import lora_speed
    from rotary.lab.bench.hf_speed import tiny_llama

    generator = torch.Generator().manual_seed(0)
    stock = tiny_llama(layers=1, hidden=32, heads=2, kv_heads=1, vocab=64, generator=generator)
    alone, installed = lora_speed._lora_models(stock, r=2, mixing="givens", generator=generator)
    lora = {n: p for n, p in alone.named_parameters() if p.requires_grad}
    extra = {n: p for n, p in installed.named_parameters() if p.requires_grad and n not in lora}
    assert lora and all(torch.equal(p, dict(installed.named_parameters())[n]) for n, p in lora.items())
    assert extra and all(".rotary." in n and p.abs().sum() > 0 for n, p in extra.items()), list(extra)
    folded = rotary.fold(copy.deepcopy(installed).merge_and_unload())
    assert type(folded) is type(stock) and rotary.hf.installed(folded) is None
    assert not any(isinstance(m, rotary.Rotary) for m in folded.modules())


def test_train_suite_compares_equal_models():
    """The train suite's LoRA contenders compute the same function: P on the base weight and lora_B (built by hand)
    gives the installed model's loss and P's gradient, with P away from the identity; its full fine-tuning models
    with P on the weights and on the activations hold the same P and give the same loss."""
    pytest.importorskip("peft")
    import copy

    import rotary
    from rotary.lab.bench import lora_speed, train_speed
    from rotary.lab.bench.hf_speed import tiny_llama

    generator = torch.Generator().manual_seed(0)
    stock = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=64, generator=generator)
    tokens = torch.randint(3, 64, (2, 9), generator=generator)
    lora, installed = lora_speed._lora_models(stock, r=2, mixing="givens", generator=generator)
    by_hand = train_speed._lora_p_on_weights(lora, installed)
    logits, grads = [], []
    for model in (installed, by_hand, lora):
        out = model(tokens, labels=tokens)
        logits.append(out.logits)
        rot = [p for n, p in model.named_parameters() if "angles" in n and p.requires_grad]
        grads.append(torch.autograd.grad(out.loss, rot) if rot else None)
    assert (logits[0] - logits[1]).abs().max() <= 1e-5 and (logits[0] - logits[2]).abs().max() > 1e-3
    assert len(grads[0]) == len(grads[1]) == 1 and all(g.abs().sum() > 0 for g in grads[0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0], grads[1]))
    full = [train_speed._turn(rotary.hf.install(copy.deepcopy(stock), mix_on=where), torch.Generator().manual_seed(1))
            for where in ("weights", "activations")]
    full_logits = [m(tokens).logits for m in full]
    assert (full_logits[0] - full_logits[1]).abs().max() <= 1e-5
    assert (full_logits[0] - stock(tokens).logits).abs().max() > 1e-3


def test_paired_ratio_is_the_median_of_per_round_ratios():
    from rotary.lab.bench.train_speed import paired

    r = paired([2.0, 3.0, 10.0, 4.0, 2.2], [1.0, 1.0, 2.0, 2.0, 2.0])  # ratios 2, 3, 5, 2, 1.1
    assert r["median"] == 2.0
    assert r["spread"] > 0 and paired([3.0], [2.0]) == {"median": 1.5, "spread": 0.0}


# --- the lab modules

def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func)


LAB = sorted((Path(__file__).parents[1] / "src" / "rotary" / "lab").glob("*/*.py"))  # bench/, experiments/


def test_lab_modules_are_found():
    assert {p.parent.name for p in LAB} == {"bench", "experiments"} and len(LAB) > 10


@pytest.mark.parametrize("path", LAB, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lab_modules_do_not_print_parse_argv_or_seed(path):
    """The CLI owns printing, argv and global seeds: library code returns values or logs, and draws random
    numbers from generators it is given."""
    tree = ast.parse(path.read_text())
    imports = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imports |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "argparse" not in imports
    assert "sys.argv" not in path.read_text()
    calls = set(_calls(tree))
    assert "print" not in calls
    # Seeding inside ``with torch.random.fork_rng(...)`` leaves the caller's generator as it was (e.g. around
    # transformers' Trainer, which seeds the global one itself); anywhere else it is forbidden.
    forked = {id(n) for w in ast.walk(tree) if isinstance(w, ast.With)
              and any(ast.unparse(i.context_expr.func) == "torch.random.fork_rng" for i in w.items
                      if isinstance(i.context_expr, ast.Call))
              for stmt in w.body for n in ast.walk(stmt)}
    seeding = {"torch.manual_seed", "torch.random.manual_seed", "torch.seed", "torch.cuda.manual_seed",
               "torch.cuda.manual_seed_all", "random.seed", "np.random.seed", "set_seed", "transformers.set_seed"}
    unforked = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call) and id(n) not in forked}
    assert not unforked & seeding, unforked & seeding


# --- smoke runs of every suite (pytest -m bench)

@pytest.mark.bench
@pytest.mark.parametrize("name", list(suites.SUITES))
def test_suite_smoke_run(name):
    """The quick run of each suite: rows of that suite with positive values, and every target the table holds
    for it judges at least one of them (a key spelled differently in the suite and the table fails here)."""
    logs = []
    torch.manual_seed(0)
    rows = suites.run_suite(name, quick=True, device="cpu", log=logs.append)
    if not rows:
        pytest.skip("; ".join(logs))
    assert all(r.suite == name for r in rows)
    assert all(r.value is not None and r.value > 0 for r in rows if r.error is None)
    assert all(r.error is None for r in rows if r.name != "original module"), [r for r in rows if r.error]
    judged = {r.key for r in rows if r.ok is not None}
    wanted = {t.ratio for t in TARGETS if t.suite == name}
    if not logs:  # nothing skipped: every target of the suite is judged
        assert judged == wanted
    assert report.table(rows)


@pytest.mark.bench
def test_cli_quick_run_writes_json_and_plot(tmp_path, capsys):
    path, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", "nd", "kernels", "--quick", "--dtypes", "float32", "--contenders", "Rotary none",
                 "--json", str(path), "--plot", str(png)]) == 0
    doc = json.loads(path.read_text())
    assert {r["suite"] for r in doc["rows"]} == {"kernels", "nd"}
    assert png.stat().st_size > 0
    assert "**nd: 2-D positions" in capsys.readouterr().out
