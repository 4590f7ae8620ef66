"""Where a Hugging Face config keeps the install record: ``config.rotary_install``.

``config.rotary`` (where earlier versions kept it) is a field of some hosts' own (Falcon: a boolean saying whether
the model uses RoPE): the record must not collide with it. Records at ``config.rotary`` (a dict) still load; a
host's own ``config.rotary`` is never read, changed or deleted, through install, uninstall, fold and reloads.
"""

import json

import pytest
import torch
from test_hf import logits, randomize, tiny, tokens, train_steps

import rotary
from rotary.integrations.hf._common import CONFIG_KEY, forget, recorded

transformers = pytest.importorskip("transformers")


def saved_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_record_is_saved_under_rotary_install(tmp_path):
    model = randomize(rotary.hf.install(tiny(), per_layer=True))
    assert CONFIG_KEY == "rotary_install"
    record = rotary.hf.installed(model).options.to_dict()
    assert model.config.rotary_install == record and not hasattr(model.config, "rotary")
    model.save_pretrained(tmp_path)
    config = saved_config(tmp_path)
    assert config["rotary_install"] == json.loads(json.dumps(record)) and "rotary" not in config
    reloaded = rotary.hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path, attn_implementation="eager")
    assert same_state(reloaded, model)
    rotary.hf.uninstall(reloaded)
    assert "rotary_install" not in reloaded.config.to_dict() and "rotary" not in reloaded.config.to_dict()


def test_a_record_at_config_rotary_written_by_an_earlier_version_reloads_bit_identical(tmp_path):
    model = train_steps(randomize(rotary.hf.install(tiny("qwen2"), learned_freq=True)))
    model.save_pretrained(tmp_path)
    config = saved_config(tmp_path)
    config["rotary"] = config.pop("rotary_install")  # the config.json an earlier version wrote
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    assert recorded(transformers.AutoConfig.from_pretrained(tmp_path)) == dict(sorted(config["rotary"].items()))
    reloaded = rotary.hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path, attn_implementation="eager",
                                         rotary=rotary.hf.installed(model).options)
    assert same_state(reloaded, model)
    ids = tokens()
    assert torch.equal(logits(reloaded.eval(), ids), logits(model, ids))
    # the reload records the install at the new key, and the old one is gone
    assert reloaded.config.rotary_install == model.config.rotary_install
    assert "rotary" not in reloaded.config.to_dict()
    # uninstalling a plain from_pretrained of it (P dropped) forgets the old record too
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    with pytest.raises(RuntimeError, match="config records a rotary install"):
        rotary.hf.install(plain)
    rotary.hf.uninstall(plain)
    assert "rotary" not in plain.config.to_dict() and recorded(plain.config) is None


@pytest.mark.parametrize("learned_freq", [False, True], ids=["p", "p-and-frequencies"])
def test_a_hosts_own_config_rotary_stays_through_install_reload_uninstall_and_fold(learned_freq, tmp_path):
    stock = tiny()
    stock.config.rotary = True  # a field of the host's own (Falcon's name for "uses RoPE"), not a record
    assert recorded(stock.config) is None
    model = randomize(rotary.hf.install(stock, learned_freq=learned_freq))
    assert model.config.rotary is True and model.config.rotary_install == rotary.hf.installed(model).options.to_dict()
    model.save_pretrained(tmp_path / "installed")
    config = saved_config(tmp_path / "installed")
    assert config["rotary"] is True and "rotary_install" in config
    reloaded = rotary.hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "installed",
                                         attn_implementation="eager")
    assert same_state(reloaded, model) and reloaded.config.rotary is True
    rotary.hf.uninstall(reloaded)
    assert reloaded.config.rotary is True and not hasattr(reloaded.config, "rotary_install")
    rotary.fold(model)
    assert rotary.hf.installed(model) is None
    assert model.config.rotary is True and not hasattr(model.config, "rotary_install")
    model.save_pretrained(tmp_path / "folded")
    config = saved_config(tmp_path / "folded")
    assert config["rotary"] is True and "rotary_install" not in config


def test_forget_deletes_only_the_record():
    config = transformers.LlamaConfig()
    config.rotary, config.rotary_install = True, {"format": "x"}
    forget(config)
    assert config.rotary is True and not hasattr(config, "rotary_install")
    config.rotary = {"mixing": "givens"}  # an earlier version's record
    assert recorded(config) == {"mixing": "givens"}
    forget(config)
    assert not hasattr(config, "rotary") and recorded(config) is None


def test_falcon_config_rotary_is_not_a_record():
    # transformers 5.25: a read-only property, True unless alibi (setting config.rotary raises AttributeError)
    config = transformers.FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=97)
    assert config.rotary is True and recorded(config) is None
    forget(config)
    assert config.rotary is True
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    before = model.config.to_json_string()
    try:  # whether or not rotary installs into Falcon, its own field stays
        rotary.hf.install(model)
    except TypeError:
        assert model.config.to_json_string() == before
        with pytest.raises(ValueError, match="no rotary is installed"):
            rotary.hf.uninstall(model)
    else:
        assert model.config.rotary is True and recorded(model.config) is not None
        rotary.hf.uninstall(model)
    assert model.config.rotary is True and model.config.to_json_string() == before
