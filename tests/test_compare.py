"""`rotary compare`: end to end on a tiny budget, resume after an interruption (a test hook, and a real process
killed with SIGKILL), a folder bound to one comparison and one process, unreadable checkpoints, errors,
data-parallel ranks, evaluation counted by hand."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rotary.lab.cli import main
from rotary.lab.experiments.compare import CompareError, folder_lock, run_comparison
from rotary.lab.experiments.data import DataError, Task, make_task
from rotary.lab.experiments.train import TrainConfig, evaluate, train_run

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
    assert all(r["accuracy"]["8x"] is not None and r["loss"]["8x"] is not None for r in rope)
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
    with pytest.raises(CompareError, match="other settings"):
        run_comparison(out=tmp_path / "killed", resume=True, **{**kwargs, "seeds": 2})


def _interrupted(out, **kwargs):
    assert run_comparison(out=out, interrupt_after=3, **kwargs) is None
    checkpoints = list((out / "checkpoints").glob("*.pt"))
    assert checkpoints and not list((out / "runs").glob("*.json"))
    return checkpoints[0]


def test_folder_is_bound_to_its_settings(tmp_path):
    """Checkpoints alone bind a folder: other settings are refused with or without --resume, naming what differs
    and both ways forward; the same settings need --resume."""
    kwargs = dict(tasks=["lookback"], schemes=["rope"], seeds=1, cfg=TINY)
    _interrupted(tmp_path, **kwargs)
    other = {**kwargs, "cfg": TrainConfig(**{**TINY.__dict__, "steps": 7, "lr": 1e-3})}
    for resume in (False, True):
        with pytest.raises(CompareError) as e:
            run_comparison(out=tmp_path, resume=resume, **other)
        msg = str(e.value)
        assert "steps: 6 there, 7 now" in msg and "lr: 0.003 there, 0.001 now" in msg and "\n" not in msg
        assert "another --out" in msg and "--resume" in msg
    with pytest.raises(CompareError, match="pass --resume to continue"):
        run_comparison(out=tmp_path, **kwargs)
    (tmp_path / "config.json").unlink()  # checkpoints whose settings nothing records
    with pytest.raises(CompareError, match="no config.json"):
        run_comparison(out=tmp_path, resume=True, **kwargs)


def test_checkpoint_records_its_run_and_settings(tmp_path):
    kwargs = dict(tasks=["lookback"], schemes=["rope", "givens"], seeds=1, cfg=TINY)
    ckpt = _interrupted(tmp_path, **kwargs)
    state = torch.load(ckpt, weights_only=True)
    assert state["run"] == "lookback-rope-seed0" and state["settings"]["train"]["steps"] == TINY.steps
    shutil.copy(ckpt, tmp_path / "checkpoints" / "lookback-givens-seed0.pt")  # one run's state under another's name
    ckpt.unlink()
    with pytest.raises(CompareError, match="lookback-givens-seed0.pt belongs to run lookback-rope-seed0"):
        run_comparison(out=tmp_path, resume=True, **kwargs)


def test_unreadable_checkpoint_restarts_its_run_with_a_warning(tmp_path, caplog):
    kwargs = dict(tasks=["copy"], schemes=["givens"], seeds=1, cfg=TINY)
    run_comparison(out=tmp_path / "straight", **kwargs)
    ckpt = _interrupted(tmp_path / "cut", **kwargs)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING, logger="rotary.experiments.train"):
        run_comparison(out=tmp_path / "cut", resume=True, **kwargs)
    (record,) = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert str(ckpt) in record.getMessage() and "restarts from step 0" in record.getMessage()
    assert _runs(tmp_path / "cut") == _runs(tmp_path / "straight")


def test_one_process_per_folder(tmp_path, capsys):
    kwargs = dict(tasks=["lookback"], schemes=["rope"], seeds=1, cfg=TINY)
    with folder_lock(tmp_path), pytest.raises(  # what a running comparison holds
            CompareError, match=f"in use by another rotary compare \\(pid {os.getpid()}\\)"):
        run_comparison(out=tmp_path, **kwargs)
    run_comparison(out=tmp_path, **kwargs)  # released with its holder


def test_unwritable_out_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = ["compare", "--quick", "--tasks", "lookback", "--schemes", "rope", "--steps", "2"]
    assert main([*args, "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rotary compare: cannot create --out {blocker / 'out'}") and "\n" not in err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        assert main([*args, "--out", str(locked / "out")]) == 2
        assert "cannot create --out" in capsys.readouterr().err


def test_global_rng_is_neither_seeded_nor_consulted(tmp_path):
    """Initial weights come from the run's seed through a generator: the global seed stays the caller's, and
    results do not depend on the global RNG's state."""
    task = make_task("lookback")
    results = []
    for global_seed, out in ((5, tmp_path / "a"), (6, tmp_path / "b")):
        for d in ("runs", "checkpoints"):
            (out / d).mkdir(parents=True)
        torch.manual_seed(global_seed)
        r = train_run(task, "givens-freq", 0, TINY, out, device="cpu")
        assert torch.initial_seed() == global_seed
        results.append({k: v for k, v in r.__dict__.items() if k not in ("train_seconds", "tokens_per_second")})
    assert results[0] == results[1]


class _Fixed(nn.Module):
    """A "model" whose logits are given, whatever the tokens."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, tokens):
        return self.logits


class _Given(Task):
    def __init__(self, tokens, targets, mask):
        super().__init__("given", 4, "accuracy", "a hand-built batch")
        self.data = tokens, targets, mask

    def batch(self, split, seed, step, batch, length):
        return self.data


def test_evaluate_counts_masked_hits_like_a_hand_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)
    targets = torch.tensor([[0, 1, 2, 3, 0], [3, 2, 1, 0, 1]])
    logits[0, 1, 1] = logits[1, 3, 0] = logits[1, 4, 1] = 10.0  # hits at (0, 1), (1, 3), (1, 4)
    logits[0, 2, 3] = logits[0, 3, 0] = logits[1, 0, 0] = logits[1, 2, 0] = 10.0  # misses
    logits[0, 4, 0] = 10.0  # a hit at a masked-out position: must not count
    mask = torch.tensor([[False, True, True, True, False], [True, False, True, True, True]])
    loss, acc = evaluate(_Fixed(logits), _Given(targets, targets, mask), 0, 5, 1, 2, "cpu")
    hits = [(0, 1), (1, 3), (1, 4)]
    assert acc == len(hits) / 7
    chosen = [(b, t) for b in range(2) for t in range(5) if mask[b, t]]
    by_hand = sum(float(torch.logsumexp(logits[b, t], 0) - logits[b, t, targets[b, t]]) for b, t in chosen) / 7
    assert loss == pytest.approx(by_hand, rel=1e-6)


def _cli(out, *extra):
    """A real ``rotary compare`` process, tiny and single-threaded."""
    cmd = [sys.executable, "-m", "rotary", "compare", "--quick", "--tasks", "lookback", "--schemes", "rope",
           "givens", "--steps", "120", "--batch", "4", "--length", "16", "--dims", "16", "--device", "cpu",
           "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_process_resumes_to_the_uninterrupted_results(tmp_path):
    """SIGKILL a real run after its first checkpoint: a second process is refused while the first runs, the
    killed one leaves no stale lock, and resuming gives the uninterrupted run's results to the last digit."""
    straight = _cli(tmp_path / "straight")
    killed = _cli(tmp_path / "killed")
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed" / "checkpoints").glob("*.pt")):
        assert killed.poll() is None, killed.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    killed.send_signal(signal.SIGSTOP)  # frozen mid-run, holding the folder
    second = _cli(tmp_path / "killed", "--resume")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and "in use by another rotary compare" in err, err
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert len(list((tmp_path / "killed" / "runs").glob("*.json"))) < 2  # it died before the end
    resumed = _cli(tmp_path / "killed", "--resume")
    for proc in (resumed, straight):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert _runs(tmp_path / "killed") == _runs(tmp_path / "straight")
    assert [r["steps"] for r in _runs(tmp_path / "killed")] == [120, 120]


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
    assert "rotary.mixer.angles" in p0 and "rotary.angles.log_freq_scale" in p0
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    assert not torch.equal(p0["rotary.mixer.angles"], torch.zeros_like(p0["rotary.mixer.angles"]))  # it trained
    # two ranks with half the batch each train like one process with the whole batch
    single = {}
    for d in ("runs", "checkpoints"):
        (tmp_path / "single" / d).mkdir(parents=True)
    train_run(make_task("lookback"), "givens-freq", 0, TINY, tmp_path / "single", device="cpu",
              on_trained=lambda m: single.update({n: p.detach().clone() for n, p in m.named_parameters()}))
    for name in p0:
        torch.testing.assert_close(p0[name], single[name], atol=1e-5, rtol=1e-4)
