"""``rotary support`` on a representative subset of transformers' causal LMs: the rows have the promised shape, Llama
works end to end with and without learned frequencies, and no architecture the sweep installs into has a P that
leaves the logits unchanged (a silent no-op)."""

import dataclasses
import json

import pytest
import torch

from rotary.lab import support

pytest.importorskip("transformers")
pytest.importorskip("peft")

SUBSET = ["llama", "qwen3", "phi3", "cohere", "gemma3_text", "gpt_neox", "gpt2"]


@pytest.fixture(scope="module")
def report():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster than two
    try:
        yield support.sweep(SUBSET, time_limit=120)
    finally:
        torch.set_num_threads(threads)


def test_rows_have_one_verdict_per_mode_and_every_check_a_number(report):
    assert [r.model_type for r in report.rows] == SUBSET
    for row in report.rows:
        assert row.model_class and row.seconds >= 0
        if row.state != "rope":
            assert row.state in ("no_rope", "no_build", "timeout", "crash") and row.reason
            continue
        assert row.attention and row.projections and row.attn_implementation in ("sdpa", "eager")
        assert set(row.verdicts) == set(support.MODES)
        for verdict in row.verdicts.values():
            assert verdict.status in ("works", "refused", "fails", "timeout", "skipped")
            assert verdict.text()
            if verdict.status == "refused":
                assert verdict.reason
            for check in verdict.checks:
                assert check.ok is not None or check.detail  # not applicable says why
                if check.ok is not None and not check.detail.startswith("crash"):
                    assert check.value is not None, check  # every check reports what it measured
        assert row.fold is not None


def test_llama_works_end_to_end(report):
    row = report.rows[SUBSET.index("llama")]
    assert row.state == "rope"
    for mode in ("default", "learned_freq", "lora"):
        assert row.verdicts[mode].status == "works", row.verdicts[mode].text()
    assert [c.name for c in row.verdicts["default"].checks] == [
        "identity", "P acts", "gradient", "cache", "fold", "reload", "uninstall"]
    assert row.verdicts["learned_freq"].check("freq acts").ok
    assert row.fold.status == "works"


def test_no_installed_architecture_has_an_inert_p(report):
    """The point of the sweep: wherever install succeeds, a random P must change the logits."""
    installed = 0
    for row in report.rows:
        for verdict in row.verdicts.values():
            acts = verdict.check("P acts")
            if acts is None:
                continue
            installed += 1
            assert acts.ok, f"{row.model_type} {verdict.mode}: {acts.text()}"
            freq = verdict.check("freq acts")
            assert freq is None or freq.ok, f"{row.model_type} {verdict.mode}: {freq.text()}"
    assert installed >= 3


def test_an_architecture_without_rope_is_reported_and_refused_cleanly(report):
    row = report.rows[SUBSET.index("gpt2")]
    assert row.state == "no_rope" and "absolute positions" in row.reason
    verdict = row.verdicts["default"]
    assert verdict.status == "refused", verdict.text()
    assert verdict.check("refusal keeps model").ok


def test_render_and_json(report):
    text = support.render(report)
    assert text.startswith("# ") and "## Summary" in text and "## No RoPE" in text
    for row in report.rows:
        assert f"`{row.model_type}`" in text
    doc = support.to_json(report)
    assert doc["summary"]["rope"] == sum(r.state == "rope" for r in report.rows)
    assert doc["rows"][0] == dataclasses.asdict(report.rows[0])


def test_tiny_config_keeps_per_layer_lists_consistent_and_one_of_each_layer_type():
    config = support.tiny_config("qwen3_next")  # linear attention beside full attention, 3 of 4 layers linear
    assert config.num_hidden_layers == 2 and len(config.layer_types) == 2
    assert set(config.layer_types) == {"linear_attention", "full_attention"}
    gemma = support.tiny_config("gemma3_text")
    assert set(gemma.layer_types) == {"sliding_attention", "full_attention"}
    assert gemma.hidden_size == 64 and gemma.num_attention_heads == 4 and gemma.head_dim == 16


def test_an_unknown_model_type_is_a_row_not_an_exception():
    row = support.check_architecture("no_such_model_type", time_limit=30)
    assert row.state == "no_build" and row.reason


def test_the_command_writes_the_page_and_the_json(tmp_path, capsys):
    from rotary.lab import cli

    threads = torch.get_num_threads()
    try:
        out, doc = tmp_path / "support.md", tmp_path / "support.json"
        assert cli.main(["support", "--only", "llama,gpt2", "--out", str(out), "--json", str(doc)]) == 0
        assert cli.main(["support", "--only", "no_such_model_type", "--out", str(out)]) == 2
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "`rotary support --only llama,gpt2" in text and "| `llama` |" in text
    rows = json.loads(doc.read_text())["rows"]
    assert [r["model_type"] for r in rows] == ["llama", "gpt2"]
    assert "works end to end: default 1" in capsys.readouterr().out


@pytest.fixture(scope="module")
def multimodal():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield support.sweep(["qwen2_vl", "whisper"], time_limit=120)
    finally:
        torch.set_num_threads(threads)


def test_vision_language_models_and_whisper_with_and_without_peft(multimodal):
    """A multimodal row per name (whisper is a causal row too: WhisperForCausalLM, no RoPE), a verdict per way of
    installing and input, every check a number, no inert P; M-RoPE's learned frequencies refused, model unchanged."""
    assert [r.model_type for r in multimodal.rows] == ["whisper"]
    assert [(r.model_type, r.model_class, r.kind, r.state) for r in multimodal.multimodal] == [
        ("qwen2_vl", "Qwen2VLForConditionalGeneration", "multimodal", "rope"),
        ("whisper", "WhisperForConditionalGeneration", "multimodal", "rope")]
    qwen, whisper = multimodal.multimodal
    assert qwen.inputs == ["text", "image"] and whisper.inputs == ["audio"]
    installed = 0
    for row in multimodal.multimodal:
        assert row.attention and row.projections and row.seconds > 0
        assert set(row.verdicts) == {f"{mode}/{name}" for mode in support.MODES for name in row.inputs}
        for key, verdict in row.verdicts.items():
            assert verdict.mode == key and verdict.status in ("works", "refused", "fails", "timeout", "skipped")
            for check in verdict.checks:
                assert check.ok is not None or check.detail
                if check.ok is not None and not check.detail.startswith("crash"):
                    assert check.value is not None, check
            acts = verdict.check("P acts")
            if acts is not None:
                installed += 1
                assert acts.ok, f"{row.model_type} {key}: {acts.text()}"
    assert installed == 7  # qwen2_vl: default and LoRA, text and image; whisper: all three
    for name in qwen.inputs:
        refused = qwen.verdicts[f"learned_freq/{name}"]
        assert refused.status == "refused" and "M-RoPE" in refused.reason, refused.text()
        assert refused.check("refusal keeps model").ok
        assert qwen.verdicts[f"default/{name}"].status == "works", qwen.verdicts[f"default/{name}"].text()
    assert [c.name for c in whisper.verdicts["default/audio"].checks] == [
        "identity", "P acts", "gradient", "cache", "fold", "reload", "uninstall"]
    assert whisper.verdicts["learned_freq/audio"].check("freq acts").ok
    assert [c.name for c in whisper.verdicts["lora/audio"].checks] == ["identity", "P acts", "merge", "fold", "reload"]
    m = multimodal.summary()["multimodal"]
    assert m["swept"] == 2 and m["refused"]["learned_freq"] == ["qwen2_vl"] and m["p_inert"] == []
    text = support.render(multimodal)
    assert "## Vision-language models and Whisper" in text
    assert "| `qwen2_vl` | Qwen2VLForConditionalGeneration |" in text
    assert "vision-language models and Whisper: work end to end, default install" in text
    assert support.to_json(multimodal)["multimodal"][1]["model_type"] == "whisper"
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "whisper"} <= set(support.architectures())  # --only
