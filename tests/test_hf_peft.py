"""rotary with the real peft package (LoRA, DoRA; OFT refused), Qwen3's P before the q/k norm, Phi-3's fused qkv_proj.

References are independent of rotary: stock transformers models whose q/k rows this file multiplies by P per head
in float64 (``P (W + s B A)`` for LoRA, written out here from the adapter's tensors), and stock
``AutoModelForCausalLM.from_pretrained`` of folded checkpoints.
"""

import copy
import json

import pytest
import torch
from test_hf import VOCAB, logits, max_diff, tiny, tokens

import rotary
from rotary.integrations.hf.causal import install_options

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])


def lora(**overrides):
    # init_lora_weights=False: B != 0, so the adapter's delta matters from the start
    return peft.LoraConfig(**{**LORA, "init_lora_weights": False, **overrides})


def train(model, steps=3, lr=0.3):
    """SGD steps over the trainable parameters on random tokens; returns the model in eval mode."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = tokens(seed=200 + step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def peft_with_rotary(order, stock, config=None, **options):
    """A PEFT model of a copy of ``stock`` with a rotary: installed before get_peft_model (then handed to the PEFT
    model) or after it."""
    model = copy.deepcopy(stock)
    if order == "install first":
        rotary.hf.install(model, **options)
        model = peft.get_peft_model(model, config or lora())
        return rotary.hf.install(model)
    return rotary.hf.install(peft.get_peft_model(model, config or lora()), **options)


def p_of(model):
    """The P in use (float64), read from the adapter's copy that PEFT trains: ``...rotary.modules_to_save``."""
    wrapper = model.get_base_model().model.rotary
    return wrapper.modules_to_save["default"].mixing_matrix(torch.float64)


def adapted_by_hand(stock, peft_model):
    """A stock copy whose q/k/v weights are the adapter's ``W + s B A`` and whose q/k rows are then multiplied by P
    per head: what the PEFT model with rotary must compute, written without rotary or peft's merge."""
    reference = copy.deepcopy(stock).double()
    P = p_of(peft_model)
    with torch.no_grad():
        for layer, adapted in zip(reference.model.layers, peft_model.get_base_model().model.layers):
            for name in ("q_proj", "k_proj", "v_proj"):
                wrapped = getattr(adapted.self_attn, name)
                A, B = wrapped.lora_A["default"].weight.double(), wrapped.lora_B["default"].weight.double()
                weight = wrapped.base_layer.weight.double() + wrapped.scaling["default"] * B @ A  # (out, in)
                if name != "v_proj":
                    heads = weight.view(-1, P.shape[0], weight.shape[-1])  # (H, D, C)
                    weight = torch.einsum("ij,hjc->hic", P, heads).reshape(weight.shape)
                getattr(layer.self_attn, name).weight.copy_(weight)
    return reference


def greedy(model, ids):
    return model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)


ORDERS = ["install first", "peft first"]


# --------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("order", ORDERS)
def test_p_trains_with_the_adapter_and_acts_on_the_whole_adapted_projection(order):
    stock = tiny()
    model = peft_with_rotary(order, stock)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("rotary.modules_to_save.default" in n for n in trainable)
    assert all("lora_" in n or "rotary.modules_to_save" in n for n in trainable)
    counted, _ = model.get_nb_trainable_parameters()  # what print_trainable_parameters prints
    assert counted == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    before = p_of(model).clone()
    train(model)
    assert not torch.allclose(p_of(model), before)  # P trained
    ids = tokens()
    reference = logits(adapted_by_hand(stock, model), ids).float()
    assert max_diff(logits(model, ids), reference) <= 1e-5


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients_with_lora(reentrant):
    # P acts on the adapted projections' outputs (an autograd function without a gather): checkpointing recomputes
    # it, reentrant or not, and every gradient (LoRA's and P's) is what the plain run gives
    stock = tiny(attn="sdpa")
    models = [peft_with_rotary("peft first", stock) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "rotary.modules_to_save" in name and p.requires_grad:
                    p.copy_(torch.linspace(-0.7, 0.9, p.numel()).view_as(p))  # P away from the identity
    models[1].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    models[1].enable_input_require_grads()  # what PEFT asks of reentrant checkpointing with frozen embeddings
    assert models[1].get_base_model().model.gradient_checkpointing
    ids = tokens()
    grads = []
    for model in models:
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and any("rotary" in n for n in grads[0])
    assert all(grads[0][n].abs().max() > 0 for n in grads[0] if "angles" in n)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_disabled_adapters_give_the_stock_model_and_the_installed_p():
    stock = tiny()
    model = train(peft_with_rotary("peft first", stock))
    ids = tokens()
    with model.disable_adapter():  # LoRA off, and PEFT's original Rotary (P = I) in use
        assert max_diff(logits(model, ids), logits(stock, ids)) <= 1e-6
    assert max_diff(logits(model, ids), logits(stock, ids)) > 1e-3


def test_an_install_before_peft_not_handed_to_it_is_an_error_then_works():
    stock = tiny()
    model = rotary.hf.install(copy.deepcopy(stock))
    model = peft.get_peft_model(model, lora())
    ids = tokens()
    with pytest.raises(RuntimeError, match=r"q_proj is now .*lora.*not trained with that adapter.*"
                                           r"rotary.hf.install\(peft_model\)"):
        logits(model, ids)
    rotary.hf.install(model)
    assert max_diff(logits(model, ids), logits(adapted_by_hand(stock, model), ids).float()) <= 1e-5


# --------------------------------------------------------------------------------------------- save, load
@pytest.mark.parametrize("order", ORDERS)
def test_adapter_save_and_load_is_bit_identical(order, tmp_path):
    stock = tiny()
    model = train(peft_with_rotary(order, stock))
    ids = tokens()
    trained = logits(model, ids)
    model.save_pretrained(tmp_path)
    base = rotary.hf.install(copy.deepcopy(stock), adapter=tmp_path)  # the one call before PEFT's own load
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(logits(loaded, ids), trained)


@pytest.mark.parametrize("other", [dict(mixing="orthogonal"), dict(learned_freq=True), dict(per_layer=True)],
                         ids=str)
def test_an_adapter_of_another_rotary_configuration_is_refused(other, tmp_path):
    stock = tiny()
    train(peft_with_rotary("peft first", stock, **other)).save_pretrained(tmp_path)
    ids = tokens()
    # a model with another install: refused, naming both installs
    base = rotary.hf.install(copy.deepcopy(stock))
    before = logits(base, ids)
    with pytest.raises(ValueError, match=r"trained with the rotary install .* but this model has .* installed"):
        rotary.hf.install(base, adapter=tmp_path)
    assert torch.equal(logits(base, ids), before)
    # an adapter whose rotary tensors are not those its options install (here: the options file replaced)
    (tmp_path / "rotary.json").write_text(json.dumps(install_options(stock).to_dict()))
    fresh = copy.deepcopy(stock)
    names = [n for n, _ in fresh.named_modules()]
    with pytest.raises(ValueError, match=r"rotary tensors do not match.*expected \['model.rotary.mixer.angles'.*found"):
        rotary.hf.install(fresh, adapter=tmp_path)
    assert [n for n, _ in fresh.named_modules()] == names and rotary.hf.installed(fresh) is None
    assert torch.equal(logits(fresh, ids), logits(stock, ids))
    (tmp_path / "rotary.json").unlink()
    with pytest.raises(ValueError, match="no rotary.json"):
        rotary.hf.install(fresh, adapter=tmp_path)


# --------------------------------------------------------------------------------------------- merge, fold
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("fold_first", [False, True])
def test_merge_and_fold_in_either_order_give_a_stock_model(order, fold_first, tmp_path):
    stock = tiny()
    model = train(peft_with_rotary(order, stock))
    ids = tokens()
    trained = logits(model, ids)
    tokens_before = greedy(model, ids)
    if fold_first:  # P into the base weight and lora_B, then PEFT merges
        merged = rotary.fold(model).merge_and_unload()
    else:  # PEFT merges (P follows onto the merged weights), then the fold
        merged = model.merge_and_unload()
        assert max_diff(logits(merged, ids), trained) <= 1e-5
        rotary.fold(merged)
    assert rotary.hf.installed(merged) is None
    assert list(merged.state_dict()) == list(stock.state_dict())
    assert max_diff(logits(merged, ids), trained) <= 1e-5
    merged.save_pretrained(tmp_path)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert max_diff(logits(loaded.eval(), ids), trained) <= 1e-5
    assert torch.equal(greedy(loaded, ids), tokens_before)


def test_dora_trains_and_merges_exactly_but_an_unmerged_fold_is_refused():
    stock = tiny()
    model = train(peft_with_rotary("peft first", stock, lora(use_dora=True)))
    ids = tokens()
    trained = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"not DoRA: merge the adapter first.*Nothing was changed"):
        rotary.fold(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), trained)  # still runs, same outputs
    merged = rotary.fold(model.merge_and_unload())
    assert list(merged.state_dict()) == list(stock.state_dict())
    assert max_diff(logits(merged, ids), trained) <= 1e-5


def test_other_adapter_types_are_refused_and_the_model_is_unchanged():
    stock = tiny()
    model = peft.get_peft_model(copy.deepcopy(stock), peft.OFTConfig(r=0, oft_block_size=8,
                                                                     target_modules=["q_proj", "k_proj"]))
    ids = tokens()
    before = logits(model, ids)
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(TypeError, match=r"LoRA adapters .*found \{'default': 'OFT'\}"):
        rotary.hf.install(model)
    assert [n for n, _ in model.named_modules()] == names and rotary.hf.installed(model) is None
    assert torch.equal(logits(model, ids), before)


def test_options_for_an_install_handed_to_peft_are_refused():
    model = peft.get_peft_model(rotary.hf.install(tiny()), lora())
    with pytest.raises(TypeError, match="without options"):
        rotary.hf.install(model, learned_freq=True)


# --------------------------------------------------------------------------------------------- Qwen3, Phi-3
def test_qwen3_p_before_the_norm_folds_to_stock_with_trained_norms(tmp_path):
    stock = tiny("qwen3")
    model = rotary.hf.install(copy.deepcopy(stock))  # mix_norm="before": P on q_proj/k_proj, then the norm
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for step in range(3):
        ids = tokens(seed=300 + step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    spread = model.model.layers[0].self_attn.q_norm.weight.detach().view(-1, 16)
    assert (spread.amax(-1) - spread.amin(-1)).max() > 1e-3  # the norm's weight trained away from uniform
    ids = tokens()
    trained = logits(model, ids)
    rotary.fold(model)
    model.save_pretrained(tmp_path)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert max_diff(logits(loaded.eval(), ids), trained) <= 1e-5
    assert torch.equal(greedy(loaded, ids), greedy(model, ids))


def tiny_phi3(**overrides):
    options = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.5,
                   attn_implementation="eager")
    options.update(overrides)
    return transformers.AutoModelForCausalLM.from_config(transformers.Phi3Config(**options)).eval()


def phi3_by_hand(stock, installed):
    """Phi-3 with its qkv_proj query and key rows multiplied by P per head (float64); value rows untouched."""
    model = copy.deepcopy(stock)
    P = installed.model.rotary.mixing_matrix(torch.float64)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.qkv_proj.weight
            qk = w[: (4 + 2) * 16].double().view(-1, 16, w.shape[-1])  # (H + kv H, D, C)
            w[: (4 + 2) * 16] = torch.einsum("ij,hjc->hic", P, qk).reshape(-1, w.shape[-1]).float()
    return model


def test_phi3_fused_qkv_identity_trained_p_and_fold_to_stock(tmp_path):
    stock = tiny_phi3()
    model = rotary.hf.install(copy.deepcopy(stock))
    ids = tokens()
    assert max_diff(logits(model, ids), logits(stock, ids)) <= 1e-6
    with torch.no_grad():
        model.model.rotary.mixer.angles.normal_(std=0.5)
    assert max_diff(logits(model, ids), logits(phi3_by_hand(stock, model), ids)) <= 1e-5
    assert max_diff(logits(model, ids), logits(stock, ids)) > 1e-3
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    ids_train = tokens(seed=7)
    model(ids_train, labels=ids_train).loss.backward()
    optimizer.step()
    model.eval()
    trained = logits(model, ids)
    rotary.fold(model)
    model.save_pretrained(tmp_path)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert max_diff(logits(loaded.eval(), ids), trained) <= 1e-5
    assert torch.equal(greedy(loaded, ids), greedy(model, ids))


def test_phi3_with_lora_on_qkv_proj_folds_through_the_adapter():
    stock = tiny_phi3()
    model = train(peft_with_rotary("peft first", stock, lora(target_modules=["qkv_proj"])))
    ids = tokens()
    trained = logits(model, ids)
    merged = rotary.fold(model).merge_and_unload()
    assert list(merged.state_dict()) == list(stock.state_dict())
    assert max_diff(logits(merged, ids), trained) <= 1e-5


def test_learned_frequencies_train_with_the_adapter_and_act():
    stock = tiny()
    model = train(peft_with_rotary("peft first", stock, learned_freq=True))
    copy_ = model.get_base_model().model.rotary.modules_to_save["default"]
    assert copy_.angles.log_freq_scale.abs().max() > 0  # trained, in the adapter's copy
    ids = tokens()
    trained = logits(model, ids)
    with torch.no_grad():  # the copy's frequencies are the ones in use: zeroing them changes the logits
        copy_.angles.log_freq_scale.zero_()
    assert max_diff(logits(model, ids), trained) > 1e-4


def test_uninstall_from_a_peft_model_leaves_the_lora_model():
    stock = tiny()
    lora_alone = peft.get_peft_model(copy.deepcopy(stock), lora())
    model = rotary.hf.install(copy.deepcopy(lora_alone))
    with torch.no_grad():
        model.get_base_model().model.rotary.modules_to_save["default"].mixer.angles.normal_(std=0.5)
    ids = tokens()
    assert max_diff(logits(model, ids), logits(lora_alone, ids)) > 1e-3
    rotary.hf.uninstall(model)
    assert rotary.hf.installed(model) is None and "save_pretrained" not in vars(model)
    assert not any("rotary" in n.split(".") for n, _ in model.named_modules())
    assert torch.equal(logits(model, ids), logits(lora_alone, ids))
