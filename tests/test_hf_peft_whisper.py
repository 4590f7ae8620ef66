"""rotary in a PEFT Whisper (transformers' WhisperForConditionalGeneration with LoRA, DoRA; OFT refused), either order.

References are independent of rotary's P and of peft's merge: a stock Whisper whose adapted q/k/v weights this file
sets to ``W + s B A`` (from the adapter's tensors) and whose decoder self-attention q/k rows (and q bias) it then
multiplies by P per head, in float64, with rotary's RoPE installed at P = I (``mixing=None``: the RoPE alone).
"""

import copy
import json

import pytest
import torch

import rotary
from rotary.integrations.hf._common import recorded

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import WhisperConfig, WhisperForConditionalGeneration  # noqa: E402

MEL, FRAMES, VOCAB = 8, 32, 96  # mel bins; 2 * max_source_positions input frames; vocabulary
TOL = 1e-5  # logits are of order one (init_std 0.1): a few float32 roundings of the reference's float64 weights
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])
ORDERS = ["install first", "peft first"]


def stock_whisper():
    """A 2-layer, width-64 Whisper (4 heads of 16), eval mode, with random decoder q biases (P must move them)."""
    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MEL, encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=FRAMES // 2,
        max_target_positions=24, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
        suppress_tokens=None, begin_suppress_tokens=None, init_std=0.1,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.self_attn.q_proj.bias.normal_(std=0.1)
    return model


@pytest.fixture(scope="module")
def stock():
    return stock_whisper()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, MEL, FRAMES, generator=g)  # synthetic log-mel (B, mel, T)
    return feats, torch.randint(4, VOCAB, (2, 9), generator=g)  # decoder tokens (B, T)


def logits(model, seed=0):
    feats, ids = inputs(seed)
    with torch.no_grad():
        return model(input_features=feats, decoder_input_ids=ids).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


def lora(**overrides):
    # init_lora_weights=False: B != 0, so the adapter's delta matters from the start
    return peft.LoraConfig(**{**LORA, "init_lora_weights": False, **overrides})


def rotary_copy(model):
    """The Rotary PEFT trains for the adapter: ``...decoder.rotary.modules_to_save["default"]``."""
    return model.get_base_model().model.decoder.rotary.modules_to_save["default"]


def peft_with_rotary(order, stock, config=None, **options):
    """A PEFT model of a copy of ``stock`` with a rotary, installed before get_peft_model (then handed to the PEFT
    model) or after it; P set away from the identity, so that it matters."""
    model = copy.deepcopy(stock)
    if order == "install first":
        rotary.hf.install(model, **options)
        model = rotary.hf.install(peft.get_peft_model(model, config or lora()))
    else:
        model = rotary.hf.install(peft.get_peft_model(model, config or lora()), **options)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in rotary_copy(model).mixer.parameters():
            parameter.normal_(std=0.5, generator=g)
    return model


def train(model, steps=2, lr=0.3):
    """SGD steps over the trainable parameters; returns the model in eval mode."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        feats, ids = inputs(seed=100 + step)
        model(input_features=feats, decoder_input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad.abs().max() > 0 for p in rotary_copy(model).mixer.parameters())  # the gradient reaches P
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def by_hand(stock, peft_model, P=None, on_delta=True):
    """A stock copy with the adapter's ``W + s B A`` in every adapted projection and P (float64, per head) on the rows
    of the decoder self-attention q/k (and q's bias), then rotary's RoPE alone installed (``mixing=None``).

    ``on_delta=False``: P on ``W`` alone, ``P W + s B A`` (what P on the base layer would compute).
    """
    reference = copy.deepcopy(stock)
    P = rotary_copy(peft_model).mixing_matrix(torch.float64) if P is None else P
    rotated = {f"model.decoder.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "k_proj")}

    def per_head(t):  # (H * D, ...) -> P applied to each head's D rows
        return torch.einsum("ij,hj...->hi...", P, t.view(-1, P.shape[0], *t.shape[1:])).reshape(t.shape)

    with torch.no_grad():
        for name, wrapped in peft_model.get_base_model().named_modules():
            if not hasattr(wrapped, "lora_A") or not hasattr(wrapped, "base_layer"):
                continue
            A, B = wrapped.lora_A["default"].weight.double(), wrapped.lora_B["default"].weight.double()
            weight, delta = wrapped.base_layer.weight.double(), wrapped.scaling["default"] * B @ A  # (out, in)
            target = reference.get_submodule(name)
            if name in rotated:
                weight = per_head(weight + delta) if on_delta else per_head(weight) + delta
                if target.bias is not None:
                    target.bias.copy_(per_head(target.bias.double()))
            else:
                weight = weight + delta
            target.weight.copy_(weight)
    return rotary.hf.install(reference, mixing=None)


# --------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("order", ORDERS)
def test_p_trains_with_the_adapter_and_acts_on_the_whole_adapted_projection(stock, order):
    model = peft_with_rotary(order, stock)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.model.decoder.rotary.modules_to_save.default.mixer.angles" in trainable
    assert all("lora_" in n or "rotary.modules_to_save.default" in n for n in trainable)
    counted, _ = model.get_nb_trainable_parameters()  # what print_trainable_parameters prints
    assert counted == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    before = rotary_copy(model).mixing_matrix(torch.float64)
    train(model)
    assert max_diff(rotary_copy(model).mixing_matrix(torch.float64), before) > 1e-4  # P trained
    out = logits(model)
    assert max_diff(out, logits(by_hand(stock, model))) <= TOL
    # the reference tells apart P on the base weight alone, and no P at all
    assert max_diff(out, logits(by_hand(stock, model, on_delta=False))) > 100 * TOL
    assert max_diff(out, logits(by_hand(stock, model, P=torch.eye(16, dtype=torch.float64)))) > 100 * TOL


def test_disabled_adapters_give_the_installed_rotary_at_p_identity(stock):
    model = train(peft_with_rotary("peft first", stock))
    installed = rotary.hf.install(copy.deepcopy(stock))  # stock install: P = I
    with model.disable_adapter():  # LoRA off, and PEFT's original Rotary (P = I) in use
        assert max_diff(logits(model), logits(installed)) <= 1e-6
    assert max_diff(logits(model), logits(installed)) > 1e-3


def test_an_install_before_peft_not_handed_to_it_is_an_error_then_works(stock):
    model = peft.get_peft_model(rotary.hf.install(copy.deepcopy(stock)), lora())
    with pytest.raises(RuntimeError, match=r"q_proj is now .*lora.*not trained with that adapter.*"
                                           r"rotary.hf.install\(peft_model\)"):
        logits(model)
    rotary.hf.install(model)
    assert max_diff(logits(model), logits(by_hand(stock, model))) <= TOL


# --------------------------------------------------------------------------------------------- save, load
@pytest.mark.parametrize("order", ORDERS)
def test_adapter_save_and_load_is_bit_identical(stock, order, tmp_path):
    model = train(peft_with_rotary(order, stock))
    trained = logits(model)
    model.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "rotary.json").read_text())
    assert recorded == rotary.hf.installed(model).options.to_dict()
    base = rotary.hf.install(copy.deepcopy(stock), adapter=tmp_path)  # the one call before PEFT's own load
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(rotary_copy(loaded).mixer.angles, rotary_copy(model).mixer.angles)
    assert torch.equal(logits(loaded), trained)


def test_an_adapter_of_another_rotary_configuration_is_refused_and_changes_nothing(stock, tmp_path):
    train(peft_with_rotary("peft first", stock, mixing="orthogonal")).save_pretrained(tmp_path)
    base = rotary.hf.install(copy.deepcopy(stock))
    before = logits(base)
    with pytest.raises(ValueError, match=r"trained with the rotary install .* but this model has .* installed"):
        rotary.hf.install(base, adapter=tmp_path)
    assert torch.equal(logits(base), before)


# --------------------------------------------------------------------------------------------- merge, fold
@pytest.mark.parametrize("order", ORDERS)
def test_merge_and_fold_in_either_order_give_the_same_whisper_with_the_rope_alone(stock, order, tmp_path):
    model = train(peft_with_rotary(order, stock))
    trained = logits(model)
    reference = by_hand(stock, model)  # P W by hand, RoPE installed at P = I
    P = rotary_copy(model).mixing_matrix(torch.float64)
    merged_first = copy.deepcopy(model).merge_and_unload()  # PEFT merges (P stays on the activations), then fold
    assert max_diff(logits(merged_first), trained) <= TOL
    rotary.fold(merged_first)
    folded = rotary.fold(copy.deepcopy(model))  # P into the base weights and lora_B, then PEFT merges
    q = folded.get_base_model().model.decoder.layers[1].self_attn.q_proj
    original = model.get_base_model().model.decoder.layers[1].self_attn.q_proj
    for after, before in [(q.base_layer.weight, original.base_layer.weight),
                          (q.lora_B["default"].weight, original.lora_B["default"].weight)]:
        expected = torch.einsum("ij,hjc->hic", P, before.double().view(4, 16, -1)).reshape(before.shape)
        assert max_diff(after.double(), expected) <= 1e-6
    assert max_diff(logits(folded), trained) <= TOL
    fold_first = folded.merge_and_unload()
    want = reference.state_dict()
    for merged in (merged_first, fold_first):
        record = rotary.hf.installed(merged)
        assert record.options.rotary.mixing is None and recorded(merged.config)["rotary"]["mixing"] is None
        assert list(merged.state_dict()) == list(want)  # the RoPE alone: no mixer left
        assert all(max_diff(v, want[k]) <= 1e-6 for k, v in merged.state_dict().items() if v.is_floating_point())
        assert max_diff(logits(merged), trained) <= TOL
        assert max_diff(logits(merged), logits(reference)) <= TOL
    merged_first.save_pretrained(tmp_path)
    reloaded = rotary.hf.from_pretrained(WhisperForConditionalGeneration, tmp_path).eval()
    assert torch.equal(logits(reloaded), logits(merged_first))


def test_dora_trains_and_merges_exactly_but_an_unmerged_fold_is_refused(stock):
    model = train(peft_with_rotary("peft first", stock, lora(use_dora=True)))
    trained = logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"not DoRA: merge the adapter first.*Nothing was changed"):
        rotary.fold(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert rotary_copy(model).mixer is not None
    assert torch.equal(logits(model), trained)  # still runs, same outputs
    merged = rotary.fold(model.merge_and_unload())
    assert rotary.hf.installed(merged).options.rotary.mixing is None
    assert max_diff(logits(merged), trained) <= TOL


# --------------------------------------------------------------------------------------------- refusals
def _oft(stock):
    config = peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "k_proj"])
    return peft.get_peft_model(copy.deepcopy(stock), config), {}, TypeError, r"LoRA adapters .*found \{'default': 'OFT'"


def _options_for_a_handed_over_install(stock):
    model = peft_with_rotary("install first", stock)
    return model, dict(learned_freq=True), TypeError, "already has a rotary installed.*without options"


def _handed_over_twice(stock):
    return peft_with_rotary("peft first", stock), {}, RuntimeError, "already trained with its adapters"


def _bad_placement(stock):
    return peft.get_peft_model(copy.deepcopy(stock), lora()), dict(placement="mlp"), ValueError, "placement must be"


def _bad_option(stock):
    return peft.get_peft_model(copy.deepcopy(stock), lora()), dict(per_layer=True), TypeError, r"\['per_layer'\]"


@pytest.mark.parametrize("case", [_oft, _options_for_a_handed_over_install, _handed_over_twice, _bad_placement,
                                  _bad_option], ids=lambda f: f.__name__.strip("_"))
def test_refusals_leave_the_model_as_it_was(stock, case):
    model, options, error, message = case(stock)
    before = logits(model)
    names = [n for n, _ in model.named_modules()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    record = rotary.hf.installed(model)
    with pytest.raises(error, match=message):
        rotary.hf.install(model, **options)
    assert [n for n, _ in model.named_modules()] == names
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert rotary.hf.installed(model) is record
    assert torch.equal(logits(model), before)


def test_uninstall_from_a_peft_whisper_leaves_the_lora_model(stock):
    lora_alone = peft.get_peft_model(copy.deepcopy(stock), lora())
    model = rotary.hf.install(copy.deepcopy(lora_alone))
    assert max_diff(logits(model), logits(lora_alone)) > 1e-3  # the RoPE acts
    rotary.hf.uninstall(model)
    assert rotary.hf.installed(model) is None and "save_pretrained" not in vars(model)
    assert not any("rotary" in n.split(".") for n, _ in model.named_modules())
    assert torch.equal(logits(model), logits(lora_alone))
