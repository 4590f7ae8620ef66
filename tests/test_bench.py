"""`rotary bench` machinery: records, skipping missing anchors, JSON; and the seed baseline's documented defects."""

import json

import pytest
import torch

from rotary.bench import contenders as C
from rotary.bench import run as bench
from rotary.bench.seed import SeedRotary
from rotary.cli import main

TINY = [C.Shape("tiny", 2, 8, 2, 8, 3)]


def test_records_and_json(tmp_path, monkeypatch):
    def missing(shape, dtype, device):
        raise ImportError("no module", name="not_a_real_package")

    monkeypatch.setitem(C.CONTENDERS, "missing anchor", missing)
    logs = []
    records = bench.run(contenders=["Rotary givens", "request document (seed)", "missing anchor"], repeats=3,
                        dtypes=("float32", "bfloat16"), shape_list=TINY, log=logs.append)
    assert any("skipped missing anchor" in line for line in logs)
    names = {r.contender for r in records}
    assert names == {"copy (floor)", "Rotary givens", "request document (seed)"}
    ok = [r for r in records if r.contender == "Rotary givens"]
    assert len(ok) == 4 and all(r.median_s > 0 and r.ratio_to_copy > 0 for r in ok)
    assert all(r.peak_bytes > 0 for r in ok if r.pass_ == "forward+backward")
    # the seed's matrices are float32 whatever the input: bf16 is reported as n/a, not a crash
    seed_bf16 = [r for r in records if r.contender.startswith("request") and r.dtype == "bfloat16"]
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
    """What the request document's module gets wrong, so that the baseline stays faithful."""
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
        rotary = r["mode"].startswith("rotary")
        assert (0 < r["rotary_share_of_train_step"] < 1) if rotary else r["rotary_share_of_train_step"] == 0
    assert "rotary share" in bench.decoder_table(rows)
