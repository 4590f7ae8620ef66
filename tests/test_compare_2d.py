"""`rotary compare`'s 2-D tasks: the data say what they claim, the classifier and a tiny run end to end (report
with confidence intervals, plots, resume by run), the CLI's defaults and errors."""

import json

import pytest
import torch

from rotary.lab.cli import build_parser
from rotary.lab.experiments.compare import DEFAULT_TASKS, CompareError, run_comparison
from rotary.lab.experiments.grid import DiagonalTask, make_grid_task
from rotary.lab.experiments.report import interval95
from rotary.lab.experiments.schemes import SCHEMES_2D
from rotary.lab.experiments.vision import GridClassifier, GridConfig

TINY = GridConfig(steps=4, batch=4, dims=16, heads=2, layers=1, eval_batches=1, eval_every=2, warmup=1)


def test_grid_labels_are_the_diagonals_through_the_marker():
    task = DiagonalTask()
    for side in (8, 12):
        tokens, labels, mask = task.batch("train", 3, 5, 16, side)
        assert tokens.shape == labels.shape == mask.shape == (16, side * side)
        for b in range(16):
            (a,) = (tokens[b] == task.noise).nonzero().flatten().tolist()  # exactly one marker
            ar, ac = divmod(a, side)
            for cell in range(side * side):
                r, c = divmod(cell, side)
                on = abs(r - ar) == abs(c - ac) and r != ar
                near = abs(abs(r - ar) - abs(c - ac)) == 1
                assert labels[b, cell] == on and mask[b, cell] == (on or near)
    again = task.batch("train", 3, 5, 16, 8)
    assert all(torch.equal(x, y) for x, y in zip(again, task.batch("train", 3, 5, 16, 8)))  # a function of (seed, step)


def test_digits_split_resolutions_and_positions():
    pytest.importorskip("sklearn")
    task = make_grid_task("digits")
    assert len(task.labels["train"]) + len(task.labels["val"]) == 1797 and len(task.labels["val"]) == 360
    batches = list(task.val_batches(16, 1, 64, 0))
    assert sum(len(b[1]) for b in batches) == 360  # every held-out image once
    tokens, _, mask = batches[0]
    assert tokens.shape == (64, 256) and mask is None and int(tokens.max()) <= 16
    assert task.positions(8).dtype == torch.long
    pos16 = task.positions(16)
    assert pos16.is_floating_point() and float(pos16.min()) == -0.25 and float(pos16.max()) == 7.25  # pixel centres


@pytest.mark.parametrize("scheme", list(SCHEMES_2D))
def test_classifier_shapes_and_other_sides(scheme):
    model = GridClassifier(vocab=7, classes=2, scheme=scheme, cfg=TINY, side=8, per_token=True)
    task = DiagonalTask()
    for side in (8, 12, 16):
        tokens, _, _ = task.batch("val", 0, 0, 3, side)
        assert model(tokens, task.positions(side)).shape == (3, side * side, 2)
    pooled = GridClassifier(vocab=17, classes=10, scheme=scheme, cfg=TINY, side=8)
    assert pooled(torch.randint(0, 17, (2, 144)), torch.rand(144, 2) * 8).shape == (2, 10)


def test_two_dimensional_comparison_end_to_end(tmp_path):
    kwargs = dict(tasks=["grid"], schemes=[], seeds=1, cfg=None, schemes_2d=["none", "axial", "mixed"], seeds_2d=2,
                  cfg_2d=TINY)
    from rotary.lab.experiments.train import TrainConfig

    kwargs["cfg"] = TrainConfig()
    result = run_comparison(out=tmp_path, **kwargs)
    names = {f.name for f in result["files"]}
    assert {"report.md", "results.json", "curves.png", "lengths.png"} <= names
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 3 * 2 and all(set(r["accuracy"]) == {"1x", "1.5x", "2x"} for r in runs)
    report = (tmp_path / "report.md").read_text()
    assert "95% confidence interval" in report and "| mixed |" in report and "`givens`" not in report
    first = sorted((tmp_path / "runs").glob("*.json"))[0]
    first.unlink()  # a lost run is trained again on --resume, the others are kept
    kept = {p.name: p.read_text() for p in (tmp_path / "runs").glob("*.json")}
    run_comparison(out=tmp_path, resume=True, **kwargs)
    assert first.exists() and all((tmp_path / "runs" / n).read_text() == t for n, t in kept.items())
    with pytest.raises(CompareError, match="unknown 2-D scheme"):
        run_comparison(out=tmp_path / "other", **{**kwargs, "schemes_2d": ["rope"]})
    with pytest.raises(CompareError, match="other settings"):
        run_comparison(out=tmp_path, resume=True, **{**kwargs, "seeds_2d": 3})


def test_confidence_interval():
    assert interval95((0.5, 0.1), 5) == pytest.approx((0.5, 2.776 * 0.1 / 5 ** 0.5))
    assert interval95((0.5, 0.0), 1) == (0.5, 0.0)


def test_cli_defaults_and_choices():
    args = build_parser().parse_args(["compare"])
    assert args.tasks == list(DEFAULT_TASKS) == ["text", "grid", "digits"]
    assert args.schemes_2d == list(SCHEMES_2D)
    args = build_parser().parse_args(["compare", "--tasks", "digits", "--schemes-2d", "axial", "oblique"])
    assert args.tasks == ["digits"] and args.schemes_2d == ["axial", "oblique"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--tasks", "video"])
    assert build_parser().parse_args(["compare", "--steps-2d", "400"]).steps_2d == 400
