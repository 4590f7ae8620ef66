"""The host contract, stated once: what every transformers decoder that ``rotary.hf.install`` takes must satisfy.

Each host is a fixture (a tiny model built from its config: no download), one per attention layout and pairing
that :mod:`rotary.hf.layouts` knows. Every check compares against the stock model of the real transformers
package:

- identity at install: the installed model computes the stock logits;
- P acts: with P (and learned frequencies) away from the identity the logits change, and every learned number
  (each Givens angle, each frequency scale) gets a nonzero gradient: none commutes with the host's RoPE;
- cached decoding (prefill, then one token at a time) equals the full forward;
- fold keeps the logits and leaves a stock model: no rotary key in its state_dict or config, and a stock
  ``from_pretrained`` of what it saves computes the same logits with no missing or unexpected key;
- uninstall restores the stock logits and state_dict; a refused install changes nothing; copies are independent.
"""

import copy

import pytest
import torch

import rotary
import rotary.hf

transformers = pytest.importorskip("transformers")

VOCAB = 101
_COMMON = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
               max_position_embeddings=256, pad_token_id=None, bos_token_id=1, eos_token_id=2)
# model_type -> config overrides: one host per layout (rotary.hf.layouts) and per way of pairing RoPE channels
HOSTS = {
    "llama": dict(num_key_value_heads=2, head_dim=16),  # separate q/k, rotate_half pairs
    "cohere": dict(num_key_value_heads=2),  # interleaved pairs (2i, 2i + 1), cos/sin repeat_interleave'd
    "glm": dict(num_key_value_heads=2, head_dim=16),  # interleaved pairs, half the head, cat(f, f) cos/sin
    "stablelm": dict(num_key_value_heads=4, partial_rotary_factor=0.25),  # a quarter rotated, outside the function
    "phi3": dict(num_key_value_heads=2, partial_rotary_factor=0.5),  # fused qkv_proj
    "gpt_neox": dict(rotary_pct=0.25),  # fused query_key_value, [q k v] per head
    "deepseek_v3": dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1),  # latent
    "qwen3_next": dict(num_key_value_heads=2, head_dim=16, layer_types=["linear_attention", "full_attention"],
                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16),  # hybrid, gated q
    "smollm3": dict(num_key_value_heads=2, no_rope_layers=[1, 0]),  # a NoPE layer
    "qwen3": dict(num_key_value_heads=2, head_dim=16),  # q/k norms before RoPE
    "gemma3_text": dict(num_key_value_heads=2, head_dim=16, layer_types=["sliding_attention", "full_attention"],
                        sliding_window=8),  # per-layer-type angles
}


def build(model_type: str) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(model_type, **{**_COMMON, **HOSTS[model_type]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # logits of order one, so that a change of P shows
        for p in model.parameters():
            p.normal_(std=0.1) if p.dim() > 1 else None
    return model


def tokens(batch=2, length=12, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def learned(model) -> list[tuple[str, torch.Tensor]]:
    record = rotary.hf.installed(model)
    return [(f"{p.name}.{n}", t) for p in record.rotaries for n, t in p.rotary.named_parameters()]


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in learned(model):
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model


OPTIONS = [{}, {"learned_freq": True}]
_IDS = ["P", "P+freq"]


@pytest.fixture(scope="module", params=list(HOSTS))
def host(request):
    return request.param, build(request.param)


@pytest.mark.parametrize("options", OPTIONS, ids=_IDS)
def test_identity_then_every_learned_number_acts(host, options):
    name, stock = host
    ids = tokens()
    model = rotary.hf.install(copy.deepcopy(stock), **options)
    torch.testing.assert_close(logits(model, ids), logits(stock, ids), atol=1e-5, rtol=0)
    perturb(model)
    out = model(ids).logits
    assert (out.detach() - logits(stock, ids)).abs().max() > 1e-4, f"{name}: P cannot change the logits"
    out.square().mean().backward()
    for param_name, t in learned(model):
        dead = (t.grad is None) or int((t.grad == 0).sum())
        assert not dead, f"{name}: {param_name} has {dead} entries without gradient: they cannot act"


@pytest.mark.parametrize("options", OPTIONS, ids=_IDS)
def test_cached_decoding_equals_full(host, options):
    _, stock = host
    model = perturb(rotary.hf.install(copy.deepcopy(stock), **options))
    ids = tokens()
    full = logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :8], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(8, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", OPTIONS, ids=_IDS)
def test_fold_writes_a_stock_checkpoint(host, options, tmp_path):
    name, stock = host
    model = perturb(rotary.hf.install(copy.deepcopy(stock), **options))
    ids = tokens()
    before = logits(model, ids)
    rotary.fold(model)
    assert rotary.hf.installed(model) is None
    assert not [k for k in model.state_dict() if "rotary" in k.split(".")]
    assert "rotary" not in model.config.to_dict() and "rotary_install" not in model.config.to_dict()
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], f"{name}: {info}"
    torch.testing.assert_close(logits(reloaded.eval(), ids), before, atol=1e-5, rtol=0)


def test_uninstall_restores_and_refusals_change_nothing(host):
    _, stock = host
    ids = tokens()
    model = copy.deepcopy(stock)
    keys = list(model.state_dict())
    rotary.hf.install(model)
    with pytest.raises(RuntimeError, match="already installed"):
        rotary.hf.install(model, learned_freq=True)
    with pytest.raises(ValueError, match="mix_on"):
        rotary.hf.install(copy.deepcopy(stock), mix_on="bias")
    copied = perturb(copy.deepcopy(model))  # a copy's P is its own
    torch.testing.assert_close(logits(model, ids), logits(stock, ids), atol=1e-5, rtol=0)
    assert (logits(copied, ids) - logits(stock, ids)).abs().max() > 1e-4
    perturb(model)
    rotary.hf.uninstall(model)
    assert list(model.state_dict()) == keys
    assert torch.equal(logits(model, ids), logits(stock, ids))


def test_the_pairing_read_off_each_host_is_what_its_modeling_file_does():
    """rotary_dim and pair layout read off each host's own function, against its modeling file read by hand (that
    the planes then avoid the pairs and the pass-through channels: test_mixing.py, and every angle's gradient
    above)."""
    expected = {"llama": (16, False), "cohere": (16, True), "glm": (8, True), "stablelm": (4, False),
                "phi3": (8, False), "gpt_neox": (4, False), "deepseek_v3": (8, True)}
    for name, (rotary_dim, interleaved) in expected.items():
        options = rotary.hf.causal.install_options(build(name)).rotary
        assert (options.rotary_dim, options.interleaved) == (rotary_dim, interleaved), name


# --------------------------------------------------------------------------------------------- the other hosts
def _openai_whisper(learned_freq):
    whisper = pytest.importorskip("whisper")
    import rotary.whisper

    dims = whisper.model.ModelDimensions(n_mels=80, n_audio_ctx=8, n_audio_state=32, n_audio_head=2,
                                         n_audio_layer=1, n_vocab=VOCAB, n_text_ctx=32, n_text_state=32,
                                         n_text_head=2, n_text_layer=2)
    model = whisper.model.Whisper(dims).eval()
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)  # whisper leaves it torch.empty
    rotary.whisper.install(model, placement="attention", learned_freq=learned_freq)
    audio = torch.randn(1, 8, 32)
    return model, lambda ids: model.decoder(ids[:1], audio), lambda: model.decoder.rotary


def _hf_whisper(learned_freq):
    config = transformers.WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=2,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=4,
                                        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        decoder_start_token_id=1)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    rotary.hf.install(model, placement="attention", learned_freq=learned_freq)
    features = torch.randn(1, 8, 8)
    return model, lambda ids: model(input_features=features, decoder_input_ids=ids[:1]).logits, \
        lambda: model.model.decoder.rotary


def _reference_decoder(learned_freq, **geometry):
    from rotary.decoder import Decoder, DecoderConfig

    model = Decoder(DecoderConfig(vocab=VOCAB, ctx=32, dims=48, heads=2, layers=2, positional="rotary",
                                  placement="attention", learned_freq=learned_freq, **geometry)).eval()
    return model, lambda ids: model(ids), lambda: next(m for m in model.modules() if isinstance(m, rotary.Rotary))


OTHER_HOSTS = {
    "openai-whisper": _openai_whisper,
    "hf-whisper": _hf_whisper,
    "decoder": _reference_decoder,
    "decoder, half pairs, a quarter rotated": lambda lf: _reference_decoder(lf, interleaved=False, rotary_dim=6),
    "decoder, interleaved, a third rotated": lambda lf: _reference_decoder(lf, interleaved=True, rotary_dim=8),
}


@pytest.mark.parametrize("learned_freq", [False, True], ids=["P", "P+freq"])
@pytest.mark.parametrize("name", list(OTHER_HOSTS))
def test_every_learned_number_acts_in_the_other_hosts(name, learned_freq):
    """The hosts whose Rotary applies RoPE itself: no plane of P is a RoPE pair or lies in pass-through channels."""
    torch.manual_seed(0)
    _model, forward, rot = OTHER_HOSTS[name](learned_freq)
    ids = tokens(batch=1, length=10)
    with torch.no_grad():
        before = forward(ids)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in rot().parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    out = forward(ids)
    assert (out.detach() - before).abs().max() > 1e-5, f"{name}: P cannot change the logits"
    out.square().mean().backward()
    for param_name, t in rot().named_parameters():
        dead = (t.grad is None) or int((t.grad == 0).sum())
        assert not dead, f"{name}: {param_name} has {dead} entries without gradient: they cannot act"
