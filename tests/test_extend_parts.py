"""The parts of `rotary compare --tasks extend` checked against what they claim, each from an independent
computation: PoSE's positions, the retrieval probe's data, the search's constraints and budget, the YaRN-style
ramp, the stock export of every rotary-only variant (against transformers' own longrope init and a hand-written
rotation), and a folder that grows by seeds and variants."""

import json
import math

import pytest
import torch

from rotary.lab.experiments.compare import CompareError, run_comparison
from rotary.lab.experiments.data import (
    RETRIEVAL_KEY,
    RETRIEVAL_MIN_LENGTH,
    RETRIEVAL_VALUE,
    make_task,
    pose_positions,
    retrieval_batch,
    with_probes,
)
from rotary.lab.experiments.extend import ExtendConfig, pretrain
from rotary.lab.experiments.extend_search import longrope_search
from rotary.lab.experiments.extend_variants import VARIANTS, build_variant, export_rope_parameters
from rotary.lab.experiments.train import TrainConfig

SMALL = ExtendConfig(length=8, seeds=1, dims=16, heads=2, layers=2, pretrain_steps=4, pretrain_batch=4,
                     pretrain_warmup=2, steps=4, batch=4, warmup=1, eval_batches=1, eval_batch=8, retrieval=4,
                     eval_every=4, checkpoint_every=4, variants=("plain", "freq"))


@pytest.fixture(scope="module")
def task():
    return make_task("text")


def test_pose_positions_increase_from_zero_and_reach_the_span():
    length, span = 32, 128
    p = pose_positions(3, 7, 4000, length, span)
    assert p.shape == (4000, length) and p.dtype == torch.long
    assert (p[:, 0] == 0).all() and (p.diff(dim=1) > 0).all() and int(p.max()) == span - 1
    gaps = p.diff(dim=1) - 1  # one chunk boundary per row at most, where the skip lands
    assert ((gaps > 0).sum(1) <= 1).all() and (gaps.sum(1) == p[:, -1] - (length - 1)).all()
    assert (p[:, -1] >= length - 1).all() and (p[:, -1] > length - 1).float().mean() > 0.9
    assert torch.equal(p, pose_positions(3, 7, 4000, length, span))  # a function of (seed, step)
    assert not torch.equal(p, pose_positions(3, 8, 4000, length, span))
    assert torch.equal(pose_positions(0, 0, 5, length, length), torch.arange(length).expand(5, length))
    with pytest.raises(ValueError, match="span"):
        pose_positions(0, 0, 1, 64, 32)


@pytest.mark.parametrize("length", [RETRIEVAL_MIN_LENGTH, 64, 256])
def test_retrieval_batch_puts_the_key_early_and_asks_for_its_value_at_the_end(task, length):
    tokens, targets, mask, where = retrieval_batch(task, 1, 2, 16, length)
    n = RETRIEVAL_KEY + RETRIEVAL_VALUE
    window = torch.cat([tokens, targets[:, -1:]], dim=1)  # (B, length + 1)
    assert torch.equal(window[:, 1:], targets) and (where >= 0).all() and (where <= length // 8).all()
    for b in range(16):
        w = int(where[b])
        early, late = window[b, w : w + n], window[b, length + 1 - n :]
        assert torch.equal(early, late) and ((early >= ord("A")) & (early <= ord("Z"))).all()
        assert w + n < length + 1 - n  # the early copy ends before the final key begins
        # the masked targets are exactly the value's letters, the key's own letters are given, not asked
        assert mask[b].nonzero().flatten().tolist() == list(range(length - RETRIEVAL_VALUE, length))
        assert torch.equal(targets[b, mask[b]], early[RETRIEVAL_KEY:])
    # the rest is the validation text the same call draws without the probe
    plain, plain_targets, _ = task.batch("val", 1, 1_000_002, 16, length)
    text = torch.cat([plain, plain_targets[:, -1:]], dim=1)
    kept = torch.ones_like(window, dtype=torch.bool)
    for b in range(16):
        kept[b, int(where[b]) : int(where[b]) + n] = False
        kept[b, length + 1 - n :] = False
    assert torch.equal(window[kept], text[kept])
    with pytest.raises(ValueError, match="at least"):
        retrieval_batch(task, 0, 0, 2, RETRIEVAL_MIN_LENGTH - 1)


def test_training_probes_repeat_a_key_and_value_and_leave_the_rest(task):
    tokens, targets, _ = task.batch("train", 0, 3, 400, 48)
    before = (tokens.clone(), targets.clone())
    x, y = with_probes(tokens, targets, 0, 3, 0.5)
    assert torch.equal(tokens, before[0]) and torch.equal(targets, before[1])  # inputs untouched
    assert torch.equal(x[:, 1:], y[:, :-1])  # still one window: targets are the next tokens
    n = RETRIEVAL_KEY + RETRIEVAL_VALUE
    text = torch.cat([tokens, targets[:, -1:]], dim=1)
    window = torch.cat([x, y[:, -1:]], dim=1)  # (B, 49)
    changed = (window != text).any(1)
    assert 0.4 < changed.float().mean() < 0.6
    for b in changed.nonzero().flatten().tolist():
        w = window[b]
        capital = (w >= ord("A")) & (w <= ord("Z"))
        # some span of n capitals occurs again at least n further on, and every changed byte lies in the two copies
        pairs = [(i, j) for i in range(49 - 2 * n + 1) for j in range(i + n, 49 - n + 1)
                 if capital[i : i + n].all() and torch.equal(w[i : i + n], w[j : j + n])]
        inside = [set(range(i, i + n)) | set(range(j, j + n)) for i, j in pairs]
        diff = set((w != text[b]).nonzero().flatten().tolist())
        assert any(diff <= spans for spans in inside)
    again = with_probes(tokens, targets, 0, 3, 0.5)
    assert torch.equal(again[0], x) and not torch.equal(with_probes(tokens, targets, 0, 4, 0.5)[0], x)
    short = tokens[:, :8], targets[:, :8]  # too short for two copies: left alone
    assert all(torch.equal(a, b) for a, b in zip(with_probes(*short, 0, 3, 0.5), short))


def test_search_respects_longrope_constraints_and_its_budget():
    target = torch.tensor([0.0, 0.1, 0.4, 0.9, 1.3, 1.3])  # log factors: non-decreasing, in [0, 2]
    calls = []

    def loss_of(candidate, generation):
        assert candidate.shape == target.shape and (candidate >= 0).all() and (candidate <= 2).all()
        assert (candidate.diff() >= 0).all()  # lambda non-decreasing with the pair index
        calls.append(generation)
        return float(((candidate - target) ** 2).sum())

    ticks = []
    starts = [torch.zeros(6), torch.full((6,), 0.7)]
    best, loss = longrope_search(loss_of, starts, evaluations=305, population=10, highest=2.0,
                                 generator=torch.Generator().manual_seed(0), on_evaluation=lambda: ticks.append(1))
    assert len(calls) == len(ticks) == 300 and calls == sorted(calls) and calls[-1] == 29  # whole generations
    assert loss == pytest.approx(float(((best - target) ** 2).sum())) and loss < 0.05
    assert loss < min(float(((s - target) ** 2).sum()) for s in starts) / 10
    again, _ = longrope_search(loss_of, starts, evaluations=305, population=10, highest=2.0,
                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(best, again)


@pytest.fixture(scope="module")
def pretrained(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    (out / "checkpoints").mkdir()
    return pretrain(task, 0, SMALL, out, data=None, settings={})


def _base(D: int) -> torch.Tensor:
    return 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)


def test_ramp_starts_at_yarn_s_ends_and_is_monotone(pretrained):
    model = build_variant(pretrained, "freq-ramp", factor=4, length=SMALL.length, lora_rank=1,
                          generator=torch.Generator())[0]
    D = SMALL.dims // SMALL.heads
    ratio = model.rotary.frequencies().detach() / _base(D)  # per-pair scale
    r = SMALL.length * _base(D) / (2 * math.pi)  # L / wavelength
    assert torch.allclose(ratio[r >= 32], torch.ones(1, dtype=torch.float64))
    assert torch.allclose(ratio[r <= 1], torch.full((1,), 0.25, dtype=torch.float64))
    assert (ratio.diff() <= 1e-12).all()  # slower the lower the frequency


def _hf_longrope(params: dict, D: int, original: int, seq_len: int):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=SMALL.dims, num_attention_heads=SMALL.heads, head_dim=D,
                                      max_position_embeddings=original, rope_parameters=params)
    return ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("variant", [v for v, s in VARIANTS.items() if s.group in ("rotary only", "search")])
def test_export_of_rotary_only_variants_gives_the_model_s_rotation(pretrained, variant):
    """Every exportable rotary-only variant, its numbers moved away from the start, written as stock longrope
    factors (short == long): transformers' own init gives frequencies that rotate q as the model does, short and
    long; the others are refused, naming why."""
    model = build_variant(pretrained, variant, factor=4, length=SMALL.length, lora_rank=1,
                          generator=torch.Generator())[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    if not VARIANTS[variant].exportable:
        with pytest.raises(ValueError, match="per layer|P"):
            export_rope_parameters(model, SMALL.length)
        return
    params = export_rope_parameters(model, SMALL.length)
    assert params["rope_type"] == "longrope" and params["short_factor"] == params["long_factor"]
    D = SMALL.dims // SMALL.heads
    x = torch.randn(2, 40, SMALL.heads, D, dtype=torch.float64)
    pos = torch.arange(40, dtype=torch.float64)
    rotated = model.rotary.rope(x, layout="BTHD")
    for seq_len in (SMALL.length, 40):  # transformers' short and long regimes
        inv_freq, attention = _hf_longrope(params, D, SMALL.length, seq_len)
        assert attention == pytest.approx(1.0)
        angle = pos[:, None] * inv_freq.double()[None]  # (T, D/2); interleaved pairs (2i, 2i + 1)
        cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
        even, odd = x[..., 0::2], x[..., 1::2]
        want = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
        torch.testing.assert_close(rotated, want, rtol=0, atol=2e-5)  # float32 inv_freq in transformers


def _runs(out):
    return {(r["variant"], r["seed"]): r["loss"] for r in json.loads((out / "results.json").read_text())["extend"]
            ["runs"]}


def test_a_folder_grows_by_seeds_and_variants_and_keeps_what_it_has(tmp_path):
    def compare(cfg, resume):
        return run_comparison(tasks=["extend"], schemes=["rope"], seeds=1, cfg=TrainConfig(), out=tmp_path,
                              cfg_extend=cfg, resume=resume)

    compare(SMALL, False)
    first = _runs(tmp_path)
    grown = ExtendConfig(**{**SMALL.__dict__, "seeds": 2, "variants": ("plain", "freq", "lora")})
    compare(grown, True)
    runs = _runs(tmp_path)
    assert set(runs) == {(v, s) for v in grown.variants for s in range(2)}
    assert all(runs[k] == v for k, v in first.items())  # kept, not rerun
    with pytest.raises(CompareError, match="extend.steps"):
        compare(ExtendConfig(**{**grown.__dict__, "steps": 5}), True)


def test_cli_refuses_a_non_positive_rotary_learning_rate(tmp_path):
    from rotary.lab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["compare", "--quick", "--tasks", "extend", "--extend-rotary-lr", "0", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
