"""`rotary compare --tasks extend`: a tiny run end to end, resume after interruptions equal to a straight run,
each variant training exactly what it says (counted from the config, checked against what changed), the
zero-shot scalings equal to transformers' rope init functions, one-line errors for bad input, and a real process
killed mid-run resuming to the same numbers."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from rotary.lab.cli import main
from rotary.lab.experiments.compare import DEFAULT_TASKS, CompareError, run_comparison
from rotary.lab.experiments.data import make_task
from rotary.lab.experiments.extend import ExtendConfig, finetune_run, pretrain
from rotary.lab.experiments.extend_variants import VARIANTS, build_variant
from rotary.lab.experiments.train import TrainConfig

TINY_1D = TrainConfig(steps=2, batch=2, length=8, dims=16, heads=2, layers=1)  # unused: extend only
# every variant, so that each runs end to end; L = 8 leaves the retrieval probe (17 tokens and more) to 4x L on
TINY = ExtendConfig(length=8, seeds=2, dims=16, heads=2, layers=1, pretrain_steps=6, pretrain_batch=4,
                    pretrain_warmup=2, steps=8, batch=4, warmup=2, eval_batches=1, eval_batch=8, retrieval=4,
                    eval_every=4, checkpoint_every=3, variants=tuple(VARIANTS))
LENGTHS = {"1x", "2x", "4x", "8x", "16x"}  # 1x .. 4 factor x L


def _compare(out, cfg=TINY, **kwargs):
    return run_comparison(tasks=["extend"], schemes=["rope"], seeds=1, cfg=TINY_1D, out=out, cfg_extend=cfg,
                          **kwargs)


def _runs(out):
    """Extend results without wall-clock fields."""
    runs = json.loads((out / "results.json").read_text())["extend"]["runs"]
    for r in runs:
        del r["train_seconds"]
    return runs


def test_tiny_run_writes_report_results_and_plot(tmp_path):
    result = _compare(tmp_path)
    assert {f.name for f in result["files"]} == {"report.md", "results.json", "extend.png"}
    runs = _runs(tmp_path)
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted((v, s) for v in VARIANTS for s in range(2))
    for r in runs:
        assert set(r["loss"]) == set(r["retrieval"]) == LENGTHS and all(math.isfinite(x) for x in r["loss"].values())
        assert [k for k, v in r["retrieval"].items() if v is None] == ["1x", "2x"]  # 8 and 16 tokens: too short
        assert all(0 <= v <= 1 for v in r["retrieval"].values() if v is not None)
        assert list(r["buckets"]) == ["0x-1x", "1x-2x", "2x-4x", "4x-8x", "8x-16x"]
        assert r["steps"] == (TINY.steps if VARIANTS[r["variant"]].trains else 0)
        assert (r["rope_parameters"] is not None) == VARIANTS[r["variant"]].exportable
    report = (tmp_path / "report.md").read_text()
    assert "### extend" in report and "![extend](extend.png)" in report
    assert all(f"| {v} |" in report for v in VARIANTS) and "Per trained number" in report
    assert "Retrieval probe" in report and "Loss by position" in report and "The goal" in report
    assert len(list((tmp_path / "pretrained").glob("*.pt"))) == 2  # cached, one per seed
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    with pytest.raises(CompareError, match="--resume"):
        _compare(tmp_path)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    cfg = ExtendConfig(**{**TINY.__dict__, "seeds": 1})
    _compare(tmp_path / "straight", cfg)
    out = tmp_path / "killed"
    assert _compare(out, cfg, interrupt_after=3) is None  # in the pretraining
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["extend-pretrain-seed0.pt"]
    calls = 0
    # 7 steps a call: the pretraining's last 3, then every trained variant stops one step short of its 8
    while _compare(out, cfg, resume=True, interrupt_after=7) is None:
        calls += 1
        assert len(list((out / "checkpoints").glob("*.pt"))) == 1
    # the search takes no optimizer steps and is not interrupted: it reruns from the start if killed
    assert calls == sum(bool(v.trains) and not v.search for v in VARIANTS.values())
    assert _runs(out) == _runs(tmp_path / "straight")
    with pytest.raises(CompareError, match="other settings.*extend"):
        _compare(out, ExtendConfig(**{**cfg.__dict__, "steps": 9}), resume=True)


def test_unreadable_pretrained_model_is_pretrained_again_with_a_warning(tmp_path, caplog):
    cfg = ExtendConfig(**{**TINY.__dict__, "seeds": 1})
    _compare(tmp_path, cfg)
    straight = _runs(tmp_path)
    (path,) = (tmp_path / "pretrained").glob("*.pt")
    path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a full disk
    (tmp_path / "runs" / "extend-lora-seed0.json").unlink()
    with caplog.at_level(logging.WARNING, logger="rotary.lab.experiments.extend"):
        _compare(tmp_path, cfg, resume=True)
    (record,) = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert str(path) in record.getMessage() and "pretrained again" in record.getMessage()
    assert _runs(tmp_path) == straight


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    (out / "checkpoints").mkdir()
    task = make_task("text")
    return task, out, pretrain(task, 0, TINY, out, data=None, settings={})


def _long_pairs() -> list[bool]:
    """Per pair, whether its wavelength 2 pi / base^(-2i/D) is at least L (those freq-low trains)."""
    D = TINY.dims // TINY.heads
    return [2 * math.pi * 10000 ** (2 * i / D) >= TINY.length for i in range(D // 2)]


def _expected_count(name: str, model) -> int:
    """Trained numbers of each variant, from the model's sizes (not from what build_variant returns)."""
    C, L, D, r = TINY.dims, TINY.layers, TINY.dims // TINY.heads, TINY.lora_rank
    # a log scale per pair; only the long-wavelength ones; YaRN's ramp (factor, start, width); a scale per pair
    # and layer; a Givens angle per plane (D / 2 planes)
    rotary = {"freq": D // 2, "freq-low": sum(_long_pairs()), "freq-ramp": 3, "freq-layer": L * D // 2,
              "mixer": D // 2}
    per_part = {**rotary, "ln-gains": (2 * L + 1) * C, "qk-bias": L * 2 * C, "lora": L * 2 * r * (C + C),
                "wqk": L * (2 * C * C + C), "all": sum(p.numel() for p in model.parameters())}
    return sum(per_part[p] for p in VARIANTS[name].trains)


def _expected_names(name: str, model) -> set[str]:
    """Names (in the fine-tuned model) of what each part trains, from the pretrained model's modules."""
    names = set()
    attns = [f"blocks.{i}.attn" for i in range(len(model.blocks))]
    for part in VARIANTS[name].trains:
        ramp = "rotary.angles.parametrizations.log_freq_scale.0."
        names |= {"freq": {"rotary.angles.log_freq_scale"}, "freq-low": {"rotary.angles.log_freq_scale"},
                  "freq-ramp": {ramp + n for n in ("log_factor", "start", "log_width")},
                  "freq-layer": {f"{a}.layer_rotary.angles.log_freq_scale" for a in attns},
                  "mixer": {"rotary.mixer.angles"},
                  "ln-gains": {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)},
                  "qk-bias": {n for a in attns for n in (f"{a}.query.bias", f"{a}.key.new_bias")},
                  "lora": {f"{a}.{lin}.lora_{ab}" for a in attns for lin in ("query", "key") for ab in "ab"},
                  "wqk": {f"{a}.{n}" for a in attns for n in ("query.weight", "query.bias", "key.weight")},
                  "all": {n for n, _ in model.named_parameters()} | {"rotary.mixer.angles"}}[part]
    return names


@pytest.mark.parametrize("variant", [v for v, spec in VARIANTS.items() if spec.trains])
def test_each_variant_trains_exactly_what_it_says(pretrained, tmp_path, variant):
    task, _, model = pretrained
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for d in ("runs", "checkpoints"):
        (tmp_path / d).mkdir()
    seen = {}
    result = finetune_run(task, variant, 0, TINY, tmp_path, model, settings={},
                          on_trained=lambda m: seen.update(m=m))
    assert result["params"] == _expected_count(variant, model)
    expected = _expected_names(variant, model)
    changed = set()
    for n, p in seen["m"].named_parameters():
        # an adapted layer keeps the original under .base; a parametrized one under .parametrizations.<n>.original
        old = before.get(n.replace(".base.", ".").replace("parametrizations.log_freq_scale.original",
                                                          "log_freq_scale"))
        if old is None or not torch.equal(p, old):
            changed.add(n)
    assert changed <= expected
    if VARIANTS[variant].search:  # the search may keep a start (plain RoPE) that changes nothing
        assert result["params"] == _expected_count(variant, model)
    elif variant.startswith("freq-low"):  # the short-wavelength pairs stay exactly as pretrained, the others move
        moved = seen["m"].rotary.angles.log_freq_scale != 0
        assert moved.tolist() == _long_pairs() and result["params"] == int(moved.sum())
    else:
        assert sum(p.numel() for n, p in seen["m"].named_parameters() if n in changed) == result["params"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the pretrained model untouched


def _hf_inv_freq(rope_type, params, max_positions, seq_len=None):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    D = TINY.dims // TINY.heads
    config = transformers.LlamaConfig(hidden_size=TINY.dims, num_attention_heads=TINY.heads, head_dim=D,
                                      max_position_embeddings=max_positions,
                                      rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **params})
    if seq_len is None:
        return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


def test_zero_shot_scalings_equal_transformers(pretrained):
    _, _, model = pretrained
    L, f = TINY.length, TINY.factor

    def rotary_of(name):
        rot = build_variant(model, name, factor=f, length=L, lora_rank=1, generator=torch.Generator())[0].rotary
        return rot.frequencies(), rot.angles.attention_factor

    # YaRN: the pretraining length is the original context, factor x L the new one
    inv_freq, attention = _hf_inv_freq("yarn", {"factor": float(f), "original_max_position_embeddings": L}, f * L)
    freqs, factor = rotary_of("yarn")
    torch.testing.assert_close(freqs.float(), inv_freq, rtol=2e-6, atol=0)
    assert factor == pytest.approx(attention, rel=1e-12) and factor != 1.0
    # static NTK-aware at factor f is transformers' dynamic NTK frozen where its factor is f: at (2f - 1) / f x L
    inv_freq, attention = _hf_inv_freq("dynamic", {"factor": float(f)}, L, seq_len=(2 * f - 1) * L / f)
    freqs, factor = rotary_of("ntk")
    torch.testing.assert_close(freqs.float(), inv_freq, rtol=2e-6, atol=0)
    assert factor == attention == 1.0
    plain, _ = rotary_of("plain")
    assert not torch.allclose(plain, freqs)


def test_bad_input_is_a_one_line_error_naming_the_numbers(tmp_path, capsys):
    def error(*args):
        assert main(["compare", "--quick", "--tasks", "extend", "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rotary compare: extend: ") and "\n" not in err
        return err

    err = error("--extend-length", "1024")
    assert "L = 1024 at factor 4" in err and "16 x L = 16,384 tokens" in err and "4,096" in err
    assert "144 x L = 9,216" in error("--extend-length", "64", "--extend-factor", "36")
    assert "unknown variant(s) nope" in error("--extend-variants", "plain,nope")
    assert "factor 1 extends nothing" in error("--extend-factor", "1")
    text = tmp_path / "short.txt"
    text.write_bytes(b"abcdefghij" * 2_000)  # 20,000 bytes: the validation split holds the last 2,000
    err = error("--data", str(text), "--extend-length", "128")
    assert "validation split" in err and "2,000 bytes" in err and "windows of 2,049" in err and "L = 128" in err
    assert not (tmp_path / "x").exists()  # refused before anything is written
    assert "extend" not in DEFAULT_TASKS


def _cli(out, *extra):
    """A real ``rotary compare --quick --tasks extend`` process, single-threaded."""
    cmd = [sys.executable, "-m", "rotary", "compare", "--quick", "--tasks", "extend", "--extend-steps", "20",
           "--extend-variants", "plain,search", "--extend-variants", "freq-mix-pose", "--device", "cpu",
           "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_process_resumes_to_the_uninterrupted_results(tmp_path):
    """SIGKILL a real run in its first fine-tuning (its pretrained model cached): resuming reuses that model
    and gives the uninterrupted run's results to the last digit."""
    straight, killed = _cli(tmp_path / "straight"), _cli(tmp_path / "killed")
    deadline = time.monotonic() + 120
    while not [p for p in (tmp_path / "killed" / "checkpoints").glob("*.pt") if "pretrain" not in p.name]:
        assert killed.poll() is None, killed.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert len(list((tmp_path / "killed" / "pretrained").glob("*.pt"))) == 1
    resumed = _cli(tmp_path / "killed", "--resume")
    for proc in (resumed, straight):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert _runs(tmp_path / "killed") == _runs(tmp_path / "straight")
