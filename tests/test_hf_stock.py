"""rotary.fold writes changed angles (learned frequencies, install-time scaling) as a stock transformers config.

After fold, save_pretrained and a plain transformers from_pretrained (no rotary install; once in a subprocess
that never imports rotary), the loaded model must give the trained model's logits and greedy tokens. What no
stock config expresses must be refused, naming why, with the model unchanged. Gemma 3: one set of angles per
layer type. The references are stock transformers models only.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
from test_hf import VOCAB, logits, max_diff, randomize, tiny, tokens, train_steps

import rotary

transformers = pytest.importorskip("transformers")

GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "rope_theta": 500000.0}
LINEAR = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
# an original length of 16 and prompts of 20 tokens: the long factors (longrope) and a grown factor (dynamic) act
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": 16, "factor": 4.0,
            "rope_theta": 10000.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 16}


def trained(model, length=20):
    """Random P (and learned scale), a few training steps; the model and its logits and greedy tokens."""
    model = train_steps(randomize(model))
    ids = tokens(length=length)
    return model, ids, logits(model, ids), model.generate(ids, **GREEDY)


def ship(model, folder):
    """fold, then the checks that the model in memory is stock; save_pretrained and a stock from_pretrained."""
    rotary.fold(model)
    assert rotary.hf.installed(model) is None
    assert not any("rotary" in name.split(".") for name, _ in model.named_modules())
    assert "forward" not in vars(model.model.rotary_emb)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "rotary_install" not in config and "rotary" not in config
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert rotary.hf.installed(loaded) is None
    return loaded.eval()


def assert_same(loaded, ids, expected_logits, expected_tokens):
    # transformers forms the angles in float32, the trained model in float64
    assert max_diff(logits(loaded, ids), expected_logits) <= 1e-5
    assert torch.equal(loaded.generate(ids, **GREEDY), expected_tokens)


# --------------------------------------------------------------------------------------------- learned frequencies
_STOCK_LOAD = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(ids).logits
greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
assert not [m for m in sys.modules if m == "rotary" or m.startswith("rotary.")], "rotary was imported"
torch.save({"logits": out, "greedy": greedy}, sys.argv[3])
"""


def test_learned_frequencies_load_in_a_process_without_rotary(tmp_path):
    model, ids, expected, greedy = trained(rotary.hf.install(tiny(), learned_freq=True))
    ship(model, tmp_path / "model")
    params = model.config.rope_parameters
    assert params["rope_type"] == "longrope" and params["short_factor"] == params["long_factor"]
    assert params["attention_factor"] == 1.0 and params["original_max_position_embeddings"] == 256
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", _STOCK_LOAD, str(tmp_path / "model"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    out = torch.load(tmp_path / "out.pt")
    assert max_diff(out["logits"], expected) <= 1e-5
    assert torch.equal(out["greedy"], greedy)


@pytest.mark.parametrize("kind, per_layer", [("llama", True), ("qwen2", False), ("stablelm", False)])
def test_learned_frequencies_fold_to_stock(kind, per_layer, tmp_path):
    model, ids, expected, greedy = trained(rotary.hf.install(tiny(kind), learned_freq=True, per_layer=per_layer))
    loaded = ship(model, tmp_path)
    assert_same(loaded, ids, expected, greedy)
    assert_same(model, ids, expected, greedy)  # the folded model in memory is that stock model
    if kind == "stablelm":  # partial rotary: 4 factors for the 8 rotated channels of each head
        assert len(model.config.rope_parameters["short_factor"]) == 4


def test_fold_of_a_copy_leaves_the_original_installed(tmp_path):
    model, ids, expected, greedy = trained(rotary.hf.install(tiny(), learned_freq=True))
    copied = copy.deepcopy(model)
    assert_same(ship(copied, tmp_path), ids, expected, greedy)
    assert rotary.hf.installed(model) is not None and model.config.rope_parameters["rope_type"] == "default"
    assert torch.equal(logits(model, ids), expected)


# --------------------------------------------------------------------------------------------- install-time scaling
@pytest.mark.parametrize("scaling", [YARN, LLAMA3, LINEAR, LONGROPE, DYNAMIC],
                         ids=lambda s: s["rope_type"])
def test_scaling_without_learned_frequencies_is_written_as_itself(scaling, tmp_path):
    max_positions = 16 if scaling is DYNAMIC else 256  # transformers' dynamic NTK scales from this one
    model, ids, expected, greedy = trained(
        rotary.hf.install(tiny(max_position_embeddings=max_positions), scaling=dict(scaling))
    )
    loaded = ship(model, tmp_path)
    written = {"rope_theta": 10000.0, **{k: v for k, v in scaling.items() if k != "max_position_embeddings"}}
    assert {k: model.config.rope_parameters.get(k) for k in written} == written
    assert_same(loaded, ids, expected, greedy)


@pytest.mark.parametrize("scaling", [YARN, LLAMA3, LINEAR, {"rope_type": "default", "rope_theta": 2000.0}],
                         ids=lambda s: s["rope_type"])
def test_static_scaling_with_learned_frequencies_becomes_longrope(scaling, tmp_path):
    model, ids, expected, greedy = trained(rotary.hf.install(tiny(), scaling=dict(scaling), learned_freq=True))
    loaded = ship(model, tmp_path)
    params = model.config.rope_parameters
    assert params["rope_type"] == "longrope" and params["short_factor"] == params["long_factor"]
    # the scheme's attention factor, written explicitly: what transformers computes for that scheme
    config = transformers.LlamaConfig(head_dim=16, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                                      rope_parameters=dict(scaling))
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS.get(scaling["rope_type"])
    assert params["attention_factor"] == pytest.approx(1.0 if init is None else init(config)[1], rel=1e-12)
    assert_same(loaded, ids, expected, greedy)


def test_longrope_with_learned_frequencies_divides_both_factor_lists(tmp_path):
    model, ids, expected, greedy = trained(rotary.hf.install(tiny(), scaling=dict(LONGROPE), learned_freq=True))
    scale = torch.exp(model.model.rotary.angles.log_freq_scale.detach().double())
    short = ids[:, :10]  # the short factors, until generation passes 16 tokens
    short_logits, short_greedy = logits(model, short), model.generate(short, **GREEDY)
    loaded = ship(model, tmp_path)
    params = model.config.rope_parameters
    assert params["original_max_position_embeddings"] == 16 and params["attention_factor"] > 1
    for key in ("short_factor", "long_factor"):
        assert params[key] == pytest.approx((torch.tensor(LONGROPE[key], dtype=torch.float64) / scale).tolist())
    assert_same(loaded, ids, expected, greedy)  # 20 tokens: the long factors act
    assert_same(loaded, short, short_logits, short_greedy)


@pytest.mark.parametrize(
    "scaling, learned, reason",
    [
        (DYNAMIC, True, "learned frequencies on dynamic NTK"),
        ({"rope_type": "p", "p": 0.5}, False, r"frequency \[0.0"),
        ({"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 64}, False, "original length of 64"),
    ],
    ids=["dynamic-learned", "p-rope", "dynamic-other-length"],
)
def test_angles_no_stock_config_expresses_are_refused_and_nothing_changes(scaling, learned, reason):
    model = train_steps(randomize(rotary.hf.install(tiny(), scaling=dict(scaling), learned_freq=learned)))
    ids = tokens(length=20)
    before, config = logits(model, ids), model.config.to_json_string()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"cannot write the angles.*{reason}.*Nothing was changed"):
        rotary.fold(model)
    assert torch.equal(logits(model, ids), before)
    assert model.config.to_json_string() == config and rotary.hf.installed(model) is not None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.generate(ids, **GREEDY)  # still runs


# --------------------------------------------------------------------------------------------- Gemma 3
def gemma3(**overrides):
    """A 3-layer Gemma 3 text model: two sliding-window layers (theta 1e4), one full one (theta 1e6, linear)."""
    options = dict(
        num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1,
        sliding_window=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
        attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    options.update(overrides)
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**options)).eval()


def test_gemma3_identity_install_equals_stock():
    stock = gemma3()
    ids = tokens(length=20)
    plain = rotary.hf.install(copy.deepcopy(stock))
    assert max_diff(logits(plain, ids), logits(stock, ids)) <= 1e-6
    learned = rotary.hf.install(copy.deepcopy(stock), learned_freq=True)
    assert sorted(learned.model.rotary_emb.rotary) == ["full_attention", "sliding_attention"]
    # each type's Rotary starts at its own angles; float64 angles against transformers' float32 ones
    assert max_diff(logits(learned, ids), logits(stock, ids)) <= 1e-5
    assert torch.equal(learned.generate(ids, **GREEDY), stock.generate(ids, **GREEDY))


@pytest.mark.parametrize("options", [{}, {"per_layer": True}, {"mixing": None}], ids=str)
def test_gemma3_learned_frequencies_train_and_fold_to_stock(options, tmp_path):
    stock = gemma3()
    model, ids, expected, greedy = trained(rotary.hf.install(copy.deepcopy(stock), learned_freq=True, **options))
    assert max_diff(expected, logits(stock, ids)) > 1e-3  # trained P and frequencies matter
    types = model.model.rotary_emb.rotary
    assert not torch.equal(types["sliding_attention"].frequencies(), types["full_attention"].frequencies())
    loaded = ship(model, tmp_path)
    for layer_type, theta in (("sliding_attention", 1e4), ("full_attention", 1e6)):
        params = model.config.rope_parameters[layer_type]
        assert params["rope_type"] == "longrope" and params["rope_theta"] == theta
    assert_same(loaded, ids, expected, greedy)
    assert_same(model, ids, expected, greedy)


def test_gemma3_unfolded_reload_and_refused_scaling(tmp_path):
    model, ids, expected, _ = trained(rotary.hf.install(gemma3(), learned_freq=True))
    model.save_pretrained(tmp_path)
    reloaded = rotary.hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path, attn_implementation="eager")
    assert torch.equal(logits(reloaded.eval(), ids), expected)
    rotary.hf.uninstall(reloaded)  # the ModuleDict of per-type Rotaries goes with the rest
    stock = gemma3()
    assert [type(m) for m in reloaded.modules()] == [type(m) for m in stock.modules()]
    assert list(reloaded.state_dict()) == list(stock.state_dict())
    assert not hasattr(reloaded.model.rotary_emb, "rotary") and "forward" not in vars(reloaded.model.rotary_emb)
    before = stock.config.to_json_string()
    with pytest.raises(ValueError, match="one rope_parameters per layer type.*ambiguous"):
        rotary.hf.install(stock, scaling=dict(LINEAR))
    assert stock.config.to_json_string() == before and rotary.hf.installed(stock) is None


@pytest.mark.parametrize(
    "overrides, used",
    [({"num_hidden_layers": 2, "layer_types": None}, "sliding_attention"),  # Gemma 3's pattern: 5 sliding, 1 full
     ({"num_hidden_layers": 2, "layer_types": ["full_attention"] * 2}, "full_attention")],
    ids=["only-sliding", "only-full"],
)
def test_gemma3_learns_only_the_layer_types_it_has_and_folds_the_others_unchanged(overrides, used, tmp_path):
    """transformers computes angles only for the layer types some layer has (asking its rotary_emb for another is a
    KeyError): those are learned, and fold writes the unused type's rope_parameters as they were."""
    stock = gemma3(**overrides)
    assert set(stock.config.layer_types) == {used}
    unused = ({"sliding_attention", "full_attention"} - {used}).pop()
    original = copy.deepcopy(stock.config.rope_parameters)
    ids = tokens(length=20)
    learned = rotary.hf.install(copy.deepcopy(stock), learned_freq=True)
    assert sorted(learned.model.rotary_emb.rotary) == [used]
    assert max_diff(logits(learned, ids), logits(stock, ids)) <= 1e-5
    model, ids, expected, greedy = trained(learned)
    assert max_diff(expected, logits(stock, ids)) > 1e-3
    loaded = ship(model, tmp_path)
    params = model.config.rope_parameters
    assert params[used]["rope_type"] == "longrope" and params[unused] == original[unused]
    assert loaded.config.rope_parameters[unused] == original[unused]
    assert_same(loaded, ids, expected, greedy)
    assert_same(model, ids, expected, greedy)


# --------------------------------------------------------------------------------------------- Granite SWA
def granite_swa(model_type):
    """A 2-layer GraniteSWA / GraniteMoeSWA: a full and a sliding-window layer; their attentions take the angles
    from rotary_embs (one RotaryEmbedding per distinct layer_rope_theta), and rotary_emb goes unused."""
    config = transformers.AutoConfig.for_model(
        model_type, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=128, max_position_embeddings=256, sliding_window=6, initializer_range=0.1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["granite_swa", "granitemoe_swa"])
def test_granite_swa_learned_frequencies_the_model_does_not_use_are_refused_at_install(model_type):
    """GraniteSWA's attentions take their angles from rotary_embs (one per theta), not from rotary_emb: learned
    frequencies of rotary_emb could not act (and written as a longrope config, from_pretrained would build
    rotary_embs from it: another model). Refused at install, naming the modules, with the model unchanged; P alone
    installs and acts."""
    stock = granite_swa(model_type)
    assert [name for name, _ in stock.model.named_children() if "rotary" in name] == ["rotary_emb", "rotary_embs"]
    model = copy.deepcopy(stock)
    ids = tokens(length=20)
    before, config = logits(model, ids), model.config.to_json_string()
    with pytest.raises(ValueError, match=r"rotary_embs\.0.*could not act"):
        rotary.hf.install(model, learned_freq=True)
    assert torch.equal(logits(model, ids), before) and model.config.to_json_string() == config
    assert rotary.hf.installed(model) is None
    randomize(rotary.hf.install(model))
    assert max_diff(logits(model, ids), before) > 1e-4


# --------------------------------------------------------------------------------------------- PEFT
@pytest.mark.parametrize("fold_first", [False, True], ids=["merge-then-fold", "fold-then-merge"])
def test_learned_frequencies_trained_with_lora_fold_to_stock(fold_first, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    model = rotary.hf.install(peft.get_peft_model(tiny(), lora), learned_freq=True)
    model = train_steps(model, lr=0.3)  # the frequencies in use are the adapter's trained copy
    ids = tokens(length=20)
    expected, greedy = logits(model, ids), model.generate(input_ids=ids, **GREEDY)
    if fold_first:
        rotary.fold(model)
        merged = model.merge_and_unload()
    else:
        merged = model.merge_and_unload()
        rotary.fold(merged)
    assert merged.config.rope_parameters["rope_type"] == "longrope"
    merged.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert_same(loaded, ids, expected, greedy)


@pytest.mark.parametrize("model_type", ["llama4_text", "ministral3"])
def test_complex_angles_and_attention_keys_fold_to_stock(model_type, tmp_path):
    """Llama 4's rotary_emb returns freqs_cis (complex); Ministral 3's rope_parameters carry llama_4_scaling_beta,
    which its attention reads (query scaling by position) and fold must keep as it is. Learned frequencies fold to
    a config whose stock reload computes the trained logits."""
    config = transformers.AutoConfig.for_model(
        model_type, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=None)
    if model_type == "ministral3":
        config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 64, "llama_4_scaling_beta": 0.1}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize(rotary.hf.install(model, learned_freq=True))
    ids = tokens(length=20)
    before = logits(model, ids)
    rotary.fold(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert saved["rope_type"] == "longrope"
    if model_type == "ministral3":
        assert saved["llama_4_scaling_beta"] == 0.1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert max_diff(logits(loaded, ids), before) <= 1e-4
