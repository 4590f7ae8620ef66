"""`rotary compare`: end to end on a tiny budget, resume after an interruption, errors, data-parallel ranks."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rotary.cli import main
from rotary.experiments.compare import CompareError, run_comparison
from rotary.experiments.data import DataError, make_task
from rotary.experiments.train import TrainConfig, train_run

TINY = TrainConfig(steps=6, batch=4, length=16, eval_batches=1, eval_every=3, checkpoint_every=2, dims=16, heads=2,
                   layers=1, warmup=2)


def _runs(out):
    """Results without wall-clock fields."""
    data = json.loads((out / "results.json").read_text())["runs"]
    for r in data:
        del r["train_seconds"], r["tokens_per_second"]
    return data


def test_end_to_end_report_and_plots(tmp_path):
    result = run_comparison(tasks=["lookback", "copy"], schemes=["learned", "rope", "givens"], seeds=2, cfg=TINY,
                            out=tmp_path)
    names = {f.name for f in result["files"]}
    assert {"report.md", "results.json", "curves.png", "lengths.png"} <= names
    runs = _runs(tmp_path)
    assert len(runs) == 2 * 3 * 2 and all(r["steps"] == TINY.steps for r in runs)
    learned = [r for r in runs if r["scheme"] == "learned"]
    assert all(r["accuracy"]["2x"] is None and "table ends" in r["note"] for r in learned)  # says so, no crash
    rope = [r for r in runs if r["scheme"] == "rope"]
    assert all(0.0 <= r["accuracy"]["8x"] <= 1.0 for r in rope)
    assert "| givens |" in result["markdown"] and "±" in result["markdown"]
    with pytest.raises(CompareError, match="--resume"):  # never silently overwrite results
        run_comparison(tasks=["lookback"], schemes=["rope"], seeds=1, cfg=TINY, out=tmp_path)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    kwargs = dict(tasks=["text"], schemes=["givens-freq", "embedding-givens"], seeds=1, cfg=TINY)
    run_comparison(out=tmp_path / "straight", **kwargs)
    assert run_comparison(out=tmp_path / "killed", interrupt_after=3, **kwargs) is None
    assert list((tmp_path / "killed" / "checkpoints").glob("*.pt"))  # an atomic checkpoint was left behind
    run_comparison(out=tmp_path / "killed", resume=True, **kwargs)
    assert _runs(tmp_path / "killed") == _runs(tmp_path / "straight")
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.pt"))
    with pytest.raises(CompareError, match="different settings"):
        run_comparison(out=tmp_path / "killed", resume=True, **{**kwargs, "seeds": 2})


def test_errors(tmp_path, capsys):
    with pytest.raises(CompareError, match="unknown scheme"):
        run_comparison(tasks=["lookback"], schemes=["rope", "alibi"], seeds=1, cfg=TINY, out=tmp_path)
    with pytest.raises(DataError, match="cannot read --data"):
        make_task("text", str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(DataError, match="at least"):
        make_task("text", str(short))
    assert main(["compare", "--quick", "--schemes", "alibi", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rotary compare: unknown scheme") and "\n" not in err


def _rank(rank, world, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        task = make_task("lookback")

        def keep(model):
            torch.save({n: p.detach() for n, p in model.named_parameters()}, result_dir / f"rank{rank}.pt")

        train_run(task, "givens-freq", 0, TINY, out, device="cpu", on_trained=keep)
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_stay_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for d in ("runs", "checkpoints"):
        (tmp_path / "out" / d).mkdir(parents=True)
    mp.spawn(_rank, args=(2, port, tmp_path / "out", tmp_path), nprocs=2, join=True)
    p0, p1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert "mixing.angles" in p0 and "rotary.log_freq_scale" in p0
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    assert not torch.equal(p0["mixing.angles"], torch.zeros_like(p0["mixing.angles"]))  # it trained
    # two ranks with half the batch each train like one process with the whole batch
    single = {}
    for d in ("runs", "checkpoints"):
        (tmp_path / "single" / d).mkdir(parents=True)
    train_run(make_task("lookback"), "givens-freq", 0, TINY, tmp_path / "single", device="cpu",
              on_trained=lambda m: single.update({n: p.detach().clone() for n, p in m.named_parameters()}))
    for name in p0:
        torch.testing.assert_close(p0[name], single[name], atol=1e-5, rtol=1e-4)
