"""The context-extension recipe on the path users take (rotary.lab.experiments.hf_extend), at a tiny size:
install with learned frequencies only, train them with transformers' Trainer, fold, save_pretrained, and a stock
from_pretrained in a process that never imports rotary. The references are transformers' own models and losses.
"""

import copy
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import rotary

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

from rotary.lab.experiments import hf_extend  # noqa: E402
from rotary.lab.experiments.data import TextTask, stdlib_corpus  # noqa: E402

CFG = replace(hf_extend.QUICK, eval_factors=(1, 2, 4, 8, 16), lr=0.1, steps=6)

# Run as `python -c`: transformers only, and a check that rotary was never imported.
_STOCK_LOGITS = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    out = {n: model(input_ids=t).logits for n, t in ids.items()}
assert not [m for m in sys.modules if m == "rotary" or m.startswith("rotary.")], "rotary was imported"
torch.save(out, sys.argv[3])
"""


def _logits(model, ids):
    with torch.no_grad():
        return {n: model(input_ids=t).logits for n, t in ids.items()}


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def task():
    return TextTask(*stdlib_corpus(CFG.corpus_bytes))


@pytest.fixture(scope="module")
def ids(task):
    """Validation windows at every evaluated length: {length: (2, length)}."""
    return {k * CFG.length: task.batch("val", 7, k, 2, k * CFG.length)[0] for k in CFG.eval_factors}


@pytest.fixture(scope="module")
def pretrained(task, tmp_path_factory):
    model = hf_extend.pretrain(CFG, task, tmp_path_factory.mktemp("pretrain"))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(pretrained, task, tmp_path_factory):
    model, info = hf_extend.install_and_train(pretrained[0], CFG, task, low_only=False,
                                              folder=tmp_path_factory.mktemp("train"))
    return model, info


def test_the_rotary_parameters_train(pretrained, trained, ids):
    model, info = trained
    log_scale = model.model.rotary.angles.log_freq_scale
    assert info["parameters"] == log_scale.numel() == CFG.head_dim // 2
    assert log_scale.abs().max().item() > 1e-3  # the learned scales moved from 1
    assert info["scales"] == pytest.approx(log_scale.detach().double().exp().tolist())
    # transformers' own loss of the trained model at 4L is not that of the pretrained one
    x = ids[CFG.factor * CFG.length]
    with torch.no_grad():
        before = pretrained[0](input_ids=x, labels=x).loss.item()
        after = model(input_ids=x, labels=x).loss.item()
    assert after != before


def test_frozen_weights_stay_bit_identical(pretrained, trained):
    model, snapshot = trained[0], pretrained[1]
    state = model.state_dict()
    assert set(snapshot) < set(state)  # the rotary's tensors are the only ones added
    assert [k for k in snapshot if not torch.equal(state[k], snapshot[k])] == []
    assert all(torch.equal(v, snapshot[k]) for k, v in pretrained[0].state_dict().items())  # a copy was trained


def test_folded_checkpoint_is_stock_and_gives_the_installed_logits(pretrained, trained, ids, tmp_path):
    model = trained[0]
    expected = _logits(model, ids)
    folded = copy.deepcopy(model)
    written = hf_extend.ship(folded, tmp_path / "model", CFG.factor * CFG.length)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    params = config["rope_parameters"]
    assert written == params and params["rope_type"] == "longrope"
    # the trained length is the context engines will serve; the original length and attention factor keep the angles
    assert config["max_position_embeddings"] == CFG.factor * CFG.length
    assert params["original_max_position_embeddings"] == CFG.length and params["attention_factor"] == 1.0
    assert params["short_factor"] == params["long_factor"]
    assert "rotary_install" not in config and "rotary" not in config
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", _STOCK_LOGITS, str(tmp_path / "model"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    stock = torch.load(tmp_path / "out.pt")
    # the tolerance: what transformers' float32 angles cost against rotary's float64 ones on the untrained model
    untrained = rotary.hf.install(copy.deepcopy(pretrained[0]), mixing=None, learned_freq=True).eval()
    rounding = _max_diff(_logits(untrained, ids), _logits(pretrained[0], ids))
    assert _max_diff(stock, expected) <= max(4 * rounding, 1e-5)
    assert _max_diff(_logits(folded, ids), expected) <= max(4 * rounding, 1e-5)  # in memory too


def test_low_only_keeps_the_short_wavelength_pairs(pretrained, task, tmp_path):
    model, info = hf_extend.install_and_train(pretrained[0], CFG, task, low_only=True, folder=tmp_path)
    log_scale = model.model.rotary.angles.log_freq_scale.detach()
    # w_i = theta^(-2i/r); wavelength 2 pi / w_i shorter than L: fixed
    r = CFG.head_dim
    wavelength = 2 * torch.pi * CFG.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    short = wavelength < CFG.length
    assert short.any() and (~short).any()
    assert torch.equal(log_scale[short], torch.zeros(int(short.sum())))
    assert (log_scale[~short] != 0).all()
    assert info["parameters"] == int((~short).sum())


def test_yarn_row_is_transformers_yarn(pretrained, ids, tmp_path):
    pretrained[0].save_pretrained(tmp_path)
    model = hf_extend.yarn_model(tmp_path, CFG)
    params = {"rope_type": "yarn", "factor": float(CFG.factor), "original_max_position_embeddings": CFG.length,
              "rope_theta": CFG.rope_theta}
    config = copy.deepcopy(pretrained[0].config)
    config.rope_parameters, config.max_position_embeddings = params, CFG.factor * CFG.length
    reference = transformers.LlamaForCausalLM(config)
    reference.load_state_dict(pretrained[1])
    assert _max_diff(_logits(model, ids), _logits(reference.eval(), ids)) == 0
    assert _max_diff(_logits(model, ids), _logits(pretrained[0], ids)) > 0


def test_main_writes_the_results_and_the_table(tmp_path, capsys):
    from rotary.lab.cli import main

    assert main(["hf-extend", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["rows"]) == list(hf_extend.ROWS)
    lengths = {str(k * hf_extend.QUICK.length) for k in hf_extend.QUICK.eval_factors}
    assert all(set(row["loss"]) == lengths for row in results["rows"].values())
    for name in ("freq", "freq-low"):
        row = results["rows"][name]
        assert row["rope_type"] == "longrope" and max(row["max_logit_diff"].values()) <= 1e-5
        assert row["loss"] == pytest.approx(row["loss_installed"], abs=1e-5)
        assert (tmp_path / "models" / name / "config.json").exists()
    table = (tmp_path / "table.md").read_text().strip()
    assert len(table.splitlines()) == 2 + len(hf_extend.ROWS) and table in capsys.readouterr().out
