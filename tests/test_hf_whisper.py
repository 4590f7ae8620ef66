"""rotary.hf.whisper against the real transformers package: a tiny random Whisper, synthetic log-mel, no downloads."""

import copy
import pickle

import pytest
import torch

import rotary
import rotary.integrations.hf.whisper as hw

transformers = pytest.importorskip("transformers")
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperModel  # noqa: E402

PLACEMENTS = ["attention", "embedding"]
MEL, FRAMES, TABLE = 8, 32, 24  # mel bins; 2 * max_source_positions input frames; max_target_positions


def _config(**overrides) -> WhisperConfig:
    # init_std 0.5: logits far from uniform, so greedy and beam search pick varied tokens
    options = dict(
        vocab_size=96, num_mel_bins=MEL, encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=FRAMES // 2,
        max_target_positions=TABLE, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
        suppress_tokens=None, begin_suppress_tokens=None, init_std=0.5,
    )
    return WhisperConfig(**{**options, **overrides})


def _stock(cls=WhisperForConditionalGeneration, **overrides):
    torch.manual_seed(0)
    return cls(_config(**overrides)).eval()


def _installed(placement="attention", stock=None, **options):
    model = rotary.hf.install(copy.deepcopy(stock if stock is not None else _stock()), placement=placement, **options)
    with torch.no_grad():
        model.model.decoder.rotary.mixer.angles.normal_()  # away from the identity, so that P matters
    return model


@pytest.fixture(scope="module")
def feats() -> torch.Tensor:
    return torch.randn(2, MEL, FRAMES, generator=torch.Generator().manual_seed(1))  # synthetic log-mel (B, mel, T)


def _logits(model, feats, ids, **kwargs):
    with torch.no_grad():
        return model(feats, decoder_input_ids=ids, **kwargs).logits


def _decode_with_cache(model, feats, ids, prompt, **kwargs):
    """Logits of ids fed ``prompt`` tokens first, then one at a time through HF's EncoderDecoderCache."""
    with torch.no_grad():
        out = model(feats, decoder_input_ids=ids[:, :prompt], use_cache=True, **kwargs)
        steps, cache, encoded = [out.logits], out.cache, (out.encoder_last_hidden_state,)
        for t in range(prompt, ids.shape[1]):
            out = model(encoder_outputs=encoded, decoder_input_ids=ids[:, t : t + 1], cache=cache, use_cache=True,
                        **kwargs)
            steps.append(out.logits)
            cache = out.cache
    return torch.cat(steps, dim=1), cache


def _tol(logits: torch.Tensor, ulps: int = 64) -> float:
    return ulps * torch.finfo(torch.float32).eps * logits.abs().max().item()


@pytest.fixture(scope="module")
def drift(feats) -> float:
    """Stock Whisper's own gap between cached decoding and a full forward (the attention kernels sum in another
    order): the installed model may differ from its full forward by a few times this, never more."""
    stock = _stock()
    ids = torch.randint(4, 96, (2, TABLE), generator=torch.Generator().manual_seed(6))
    full = _logits(stock, feats, ids)
    steps, _ = _decode_with_cache(stock, feats, ids, prompt=3)
    return max(4 * (steps - full).abs().max().item(), _tol(full))


def _module_state(model):
    """What install may change: module tree, state_dict keys, instance attributes, hooks, config record."""
    dec = model.model.decoder
    return (
        [name for name, _ in model.named_modules()], list(model.state_dict()),
        sorted(k for m in model.modules() for k in m.__dict__ if k in ("forward", "generate")),
        len(dec._forward_pre_hooks), getattr(model.config, "rotary", None), model.max_target_positions,
    )


# ------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_identity_install_equals_stock_at_position_0(feats, attn):
    """P = I and one decoder token at position 0 (R = I): the replaced attention forward must give stock's logits.
    Fails the day transformers changes the WhisperAttention.forward body that rotary.hf.whisper copies."""
    stock = _stock(attn_implementation=attn)
    model = rotary.hf.install(copy.deepcopy(stock), placement="attention", learned_positions=True)
    ids = torch.tensor([[2], [5]])
    assert (_logits(model, feats, ids) - _logits(stock, feats, ids)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("length", [1, 7, 33])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_copied_attention_body_equals_stock_with_the_rotation_off(feats, attn, length):
    """The replaced self-attention forward with rotate_qk made the identity computes stock's attention on every
    path, at several lengths: left padding with a decoder attention mask, returned attention weights, and the
    cache (the prompt at once, then one token a step)."""
    stock = _stock(attn_implementation=attn, max_target_positions=48)
    model = rotary.hf.install(copy.deepcopy(stock), placement="attention", learned_positions=True)
    model.model.decoder.rotary.rotate_qk = lambda q, k, **kwargs: (q, k)  # an instance attribute, this test only
    ids = torch.randint(4, 96, (2, length + 4), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, : min(2, length - 1)] = 0  # row 0 left-padded (by up to 2)
    with torch.no_grad():
        for kwargs in ({}, {"decoder_attention_mask": mask}):
            a = stock(feats, decoder_input_ids=ids, output_attentions=True, **kwargs)
            b = model(feats, decoder_input_ids=ids, output_attentions=True, **kwargs)
            assert (a.logits - b.logits).abs().max().item() <= 1e-6
            for x, y in zip(a.decoder_attentions, b.decoder_attentions):
                assert x is not None and (x - y).abs().max().item() <= 1e-6
    stock_steps, _ = _decode_with_cache(stock, feats, ids, prompt=length)
    model_steps, _ = _decode_with_cache(model, feats, ids, prompt=length)
    assert (stock_steps - model_steps).abs().max().item() <= 1e-6


def test_only_decoder_self_attention_is_changed():
    model = _installed("attention")
    dec = model.model.decoder
    assert all(isinstance(layer.self_attn.__dict__["forward"], hw._SelfAttentionForward) for layer in dec.layers)
    assert all("forward" not in layer.encoder_attn.__dict__ for layer in dec.layers)
    assert all("forward" not in m.__dict__ for m in model.model.encoder.modules())
    assert sorted(k for k in model.state_dict() if k not in _stock().state_dict()) == [
        "model.decoder.rotary.mixer.angles", "model.decoder.rotary.mixer.planes",
        "model.decoder.rotary_install._extra_state",
    ]
    assert type(dec.rotary) is rotary.Rotary and rotary.hf.installed(model) is dec.rotary_install


# ------------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("learned", [True, False])
def test_incremental_equals_full(feats, drift, placement, learned):
    model = _installed(placement, learned_positions=learned)
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    full = _logits(model, feats, ids)
    steps, cache = _decode_with_cache(model, feats, ids, prompt=5)
    assert (steps - full).abs().max().item() <= drift
    assert cache.self_attention_cache.get_seq_length(0) == 12


DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 6}


@pytest.mark.parametrize("scaling", [None, DYNAMIC])
def test_cache_holds_rotated_keys(feats, drift, scaling):
    """Each step rotates only the new query and key: the cache holds k_proj outputs already rotated at their
    positions. Under length-dependent scaling it holds them unrotated, and each step rotates all of them at the
    current length."""
    model = _installed("attention", scaling=scaling)
    rot = model.model.decoder.rotary
    ids = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    rows = []

    def counting(q, k, **kwargs):  # records how many keys each call rotates
        rows.append(k.shape[1] if kwargs.get("layout") == "BTHD" else k.shape[2])
        return type(rot).rotate_qk(rot, q, k, **kwargs)

    rot.rotate_qk = counting
    steps, cache = _decode_with_cache(model, feats, ids, prompt=3)
    del rot.rotate_qk
    # Dynamic NTK moves every angle once the length passes 6: then no full forward equals cached decoding (the
    # deeper layers' cached keys and values came from shallower ones at shorter lengths; transformers' own dynamic
    # RoPE behaves alike). Up to that length both paths must agree.
    agree = 9 if scaling is None else DYNAMIC["original_max_position_embeddings"]
    full = _logits(model, feats, ids[:, :agree])
    assert (steps[:, :agree] - full).abs().max().item() <= drift
    per_call = [3] + [1] * 6 if scaling is None else list(range(3, 10))
    assert rows == [n for n in per_call for _ in model.model.decoder.layers]
    layer = model.model.decoder.layers[0]
    with torch.no_grad():
        h = layer.self_attn_layer_norm(model.model.decoder.embed_tokens(ids))  # layer 0's self-attention input
        k = layer.self_attn.k_proj(h).unflatten(-1, (4, 16))  # (B, T, H, D)
        rotated = model.model.decoder.rotary(k, layout="BTHD").transpose(1, 2)  # (B, H, T, D) at positions 0..8
    expected = rotated if scaling is None else k.transpose(1, 2)
    assert (cache.self_attention_cache.layers[0].keys - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_runs_past_the_learned_table_when_bypassed(feats, drift, placement):
    model = _installed(placement, learned_positions=False)
    ids = torch.randint(4, 96, (2, TABLE + 9), generator=torch.Generator().manual_seed(4))
    full = _logits(model, feats, ids)
    steps, _ = _decode_with_cache(model, feats, ids, prompt=TABLE - 2)
    assert (steps - full).abs().max().item() <= drift
    model(feats, labels=ids).loss.backward()  # the labels length check is lifted too
    out = model.generate(feats, max_new_tokens=TABLE + 6, min_new_tokens=TABLE + 6, return_dict_in_generate=True)
    assert out.sequences.shape[1] == TABLE + 7  # start + new tokens: generate's max_target_positions cap is lifted


def test_kept_table_refuses_longer_inputs(feats):
    model = _installed("attention", learned_positions=True)
    ids = torch.randint(4, 96, (2, TABLE + 1))
    with pytest.raises(ValueError, match=rf"reaches {TABLE + 1} positions.*max_target_positions = {TABLE}"):
        model(feats, decoder_input_ids=ids)
    _, cache = _decode_with_cache(model, feats, ids[:, :TABLE], prompt=TABLE)
    with pytest.raises(ValueError, match=rf"\({TABLE} cached \+ 1 new\)"):
        model(feats, decoder_input_ids=ids[:, TABLE:], cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="max_target_positions"):  # stock's own checks stay in force
        model.generate(feats, max_new_tokens=TABLE + 1)


# ------------------------------------------------------------------------------------------------- generate
EOS = 3  # min_new_tokens makes generate score it -inf; the no-cache loops below do the same


def _without_eos(logits: torch.Tensor) -> torch.Tensor:
    return logits.index_fill(-1, torch.tensor([EOS]), float("-inf"))


def _next_token(logits: torch.Tensor) -> torch.Tensor:
    return _without_eos(logits).argmax(-1, keepdim=True)


def _assert_scores_match(scores: torch.Tensor, logits: torch.Tensor, tol: float) -> None:
    """generate's scores (EOS at -inf) against logits recomputed without a cache."""
    finite = torch.isfinite(scores)
    assert torch.equal(finite, torch.isfinite(_without_eos(logits)))
    assert (scores[finite] - logits[finite]).abs().max().item() <= tol


def _greedy_without_cache(model, feats, ids, steps, **kwargs):
    for _ in range(steps):
        logits = model(feats, decoder_input_ids=ids, use_cache=False, **kwargs).logits[:, -1]
        ids = torch.cat([ids, _next_token(logits)], dim=1)
    return ids


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_greedy_generate_equals_no_cache_greedy(feats, drift, placement):
    model = _installed(placement)
    out = model.generate(feats, max_new_tokens=10, min_new_tokens=10, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        manual = _greedy_without_cache(model, feats, out.sequences[:, :1], 10)
        recomputed = model(feats, decoder_input_ids=out.sequences[:, :-1], use_cache=False).logits
    assert torch.equal(out.sequences, manual)
    _assert_scores_match(torch.stack(out.scores, dim=1), recomputed, drift)  # (B, steps, vocab)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_generate_left_padded_prompts_of_different_lengths(feats, drift, placement):
    """Decoder prompts of lengths 3 and 5, left-padded, with decoder_attention_mask (generate then passes
    per-row decoder_position_ids): tokens equal a no-cache greedy loop given the same mask and positions."""
    model = _installed(placement)
    prompt = torch.tensor([[1, 1, 2, 5, 6], [2, 7, 8, 9, 10]])
    mask = (prompt != 1).long()
    out = model.generate(feats, decoder_input_ids=prompt, decoder_attention_mask=mask, max_new_tokens=6,
                         min_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            m = torch.cat([mask, torch.ones(2, ids.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
            pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
            logits = model(feats, decoder_input_ids=ids, decoder_attention_mask=m, decoder_position_ids=pos).logits
            ids = torch.cat([ids, _next_token(logits[:, -1])], dim=1)
    assert torch.equal(out.sequences, ids)
    _assert_scores_match(torch.stack(out.scores, 1), logits[:, prompt.shape[1] - 1 :], drift)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_beam_search_scores_equal_no_cache_forward(feats, drift, placement):
    """Beam search reorders the cache of rotated keys: each chosen token's log-probability equals that of a
    no-cache forward over the final sequence."""
    model = _installed(placement)
    out = model.generate(feats, max_new_tokens=8, min_new_tokens=8, num_beams=3, length_penalty=0.0,
                         return_dict_in_generate=True, output_scores=True)
    # Whisper's generate returns, per step, the log-probabilities of the beam each final sequence came from
    chosen = torch.stack(out.scores, 1).gather(-1, out.sequences[:, 1:, None]).squeeze(-1)  # (B, steps)
    with torch.no_grad():
        logits = model(feats, decoder_input_ids=out.sequences[:, :-1], use_cache=False).logits
    expected = logits.log_softmax(-1).gather(-1, out.sequences[:, 1:, None]).squeeze(-1)
    assert (chosen - expected).abs().max().item() <= drift
    assert (out.sequences_scores - expected.sum(-1)).abs().max().item() <= 8 * drift  # length_penalty 0: a sum
    assert (out.beam_indices > 0).any()  # the cache was reordered across beams


# ------------------------------------------------------------------------------------------------- training
def _batch(batch=2, length=7):
    g = torch.Generator().manual_seed(5)
    return torch.randn(batch, MEL, FRAMES, generator=g), torch.randint(4, 96, (batch, length), generator=g)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_training_step_updates_rotary(placement):
    model = _installed(placement, learned_freq=True).train()
    rot = model.model.decoder.rotary
    before = {n: p.detach().clone() for n, p in rot.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    feats, labels = _batch()
    model(feats, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rot.parameters())
    learned = model.model.decoder.embed_positions.weight.grad
    assert (learned is None) == (placement == "attention")  # bypassed by default for attention, kept for embedding
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in rot.named_parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    feats, labels = _batch()
    grads = []
    for checkpointing in (False, True):
        model = _installed("attention", stock=_stock()).train()
        if checkpointing:
            # the name in newer transformers 5 releases, the older one otherwise
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
            assert all(layer.gradient_checkpointing for layer in model.model.decoder.layers)
        model(feats, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_seq2seq_trainer_updates_rotary_and_resumes(tmp_path):
    """Two Seq2SeqTrainer steps update the rotary; resuming from the first step's checkpoint gives the same
    parameters; resuming into a rotary installed with other options is refused."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    feats, labels = _batch(batch=4)
    data = [{"input_features": f, "labels": y} for f, y in zip(feats, labels)]
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, use_cpu=True,
        report_to=[], save_strategy="steps", save_steps=1, logging_strategy="no", disable_tqdm=True,
    )
    model = _installed("attention")
    before = model.model.decoder.rotary.mixer.angles.detach().clone()
    Seq2SeqTrainer(model=model, args=args, train_dataset=data).train()
    assert not torch.equal(before, model.model.decoder.rotary.mixer.angles.detach())
    checkpoint = str(tmp_path / "checkpoint-1")
    resumed = _installed("attention")
    Seq2SeqTrainer(model=resumed, args=args, train_dataset=data).train(resume_from_checkpoint=checkpoint)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    other = _installed("attention", learned_positions=True)
    with pytest.raises(ValueError, match="installed with .*'learned_positions': False.* but this model's with"):
        Seq2SeqTrainer(model=other, args=args, train_dataset=data).train(resume_from_checkpoint=checkpoint)


# ------------------------------------------------------------------------------------------------- fold
def test_fold_attention_placement(feats):
    model = _installed("attention")
    ids = torch.randint(4, 96, (2, 9))
    expected = _logits(model, feats, ids)
    q_before = model.model.decoder.layers[0].self_attn.q_proj.weight.clone()
    rotary.fold(model)
    rot = model.model.decoder.rotary
    assert rot.mixer is None and hw.installed(model).options.placement == "attention"  # the RoPE itself stays
    assert model.config.rotary_install["rotary"]["mixing"] is None  # a reload must not bring P back
    assert not torch.equal(q_before, model.model.decoder.layers[0].self_attn.q_proj.weight)
    cross = model.model.decoder.layers[0].encoder_attn.q_proj.weight
    assert cross.equal(_stock().model.decoder.layers[0].encoder_attn.q_proj.weight)  # cross-attention untouched
    folded = _logits(model, feats, ids)
    assert (folded - expected).abs().max().item() <= _tol(expected, 256)
    steps, _ = _decode_with_cache(model, feats, ids, prompt=4)
    assert (steps - folded).abs().max().item() <= _tol(folded)


def test_fold_embedding_placement_is_an_error_and_changes_nothing():
    model = _installed("embedding")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="expected placement='attention', found 'embedding'"):
        rotary.fold(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.model.decoder.rotary.mixer is not None


# ------------------------------------------------------------------------------------------------- save / reload
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_save_pretrained_and_reload_bit_identical(tmp_path, feats, placement):
    model = _installed(placement, learned_freq=True)
    with torch.no_grad():
        model.model.decoder.rotary.angles.log_freq_scale.normal_(std=0.1)
    model.save_pretrained(tmp_path)
    loaded = rotary.hf.from_pretrained(WhisperForConditionalGeneration, tmp_path).eval()
    assert hw.installed(loaded).options == hw.installed(model).options
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    ids = torch.randint(4, 96, (2, 8))
    assert torch.equal(_logits(model, feats, ids), _logits(loaded, feats, ids))
    record = model.config.rotary_install
    expected = {**record, "learned_positions": not record["learned_positions"]}
    with pytest.raises(ValueError, match="rotary configuration mismatch: expected .* found"):
        rotary.hf.from_pretrained(WhisperForConditionalGeneration, tmp_path, rotary=expected)


def test_folded_model_reloads_without_mixing(tmp_path, feats):
    model = rotary.fold(_installed("attention"))
    model.save_pretrained(tmp_path)
    loaded = rotary.hf.from_pretrained(WhisperForConditionalGeneration, tmp_path).eval()
    assert loaded.model.decoder.rotary.mixer is None
    ids = torch.randint(4, 96, (2, 8))
    assert torch.equal(_logits(model, feats, ids), _logits(loaded, feats, ids))


@pytest.mark.parametrize("other", [dict(placement="embedding"), dict(mixing="orthogonal"), dict(learned_positions=True),
                                   dict(base=500.0)])
def test_loading_into_a_different_rotary_configuration_is_an_error(other):
    saved = _installed("attention").state_dict()
    target = rotary.hf.install(_stock(), **{"placement": "attention", **other})
    with pytest.raises((ValueError, RuntimeError), match="installed with .* but this model's with"):
        target.load_state_dict(saved, strict=False)


# ------------------------------------------------------------------------------------------------- uninstall
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("learned", [True, False])
def test_uninstall_restores_stock(feats, placement, learned):
    stock = _stock()
    model = _installed(placement, stock=stock, learned_positions=learned)
    rotary.hf.uninstall(model)
    assert _module_state(model) == _module_state(stock)
    assert list(model.state_dict()) == list(stock.state_dict())
    ids = torch.randint(4, 96, (2, 6))
    assert torch.equal(_logits(model, feats, ids), _logits(stock, feats, ids))
    with pytest.raises(ValueError, match="no rotary is installed"):
        rotary.hf.uninstall(model)


def test_whisper_model_and_copies(feats):
    stock = _stock(WhisperModel)
    model = rotary.hf.install(copy.deepcopy(stock))
    ids = torch.randint(4, 96, (2, 7))
    with torch.no_grad():
        model.decoder.rotary.mixer.angles.normal_()
        full = model(feats, decoder_input_ids=ids).last_hidden_state
        clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
        assert torch.equal(clone(feats, decoder_input_ids=ids).last_hidden_state, full)
        assert not torch.equal(stock(feats, decoder_input_ids=ids).last_hidden_state, full)
    rotary.hf.uninstall(model)
    assert list(model.state_dict()) == list(stock.state_dict())
    conditional = _installed("attention")  # its generate wrapper and fold record point back at the model
    for clone in (copy.deepcopy(conditional), pickle.loads(pickle.dumps(conditional))):
        assert clone.generate.model is clone and rotary.hf.installed(clone).config is clone.config


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_a_clear_error_and_installs_nothing():
    stock = _stock()
    model = copy.deepcopy(stock)
    state = _module_state(model)
    with pytest.raises(ValueError, match=r"placement must be one of \('attention', 'embedding'\).*got 'cross'"):
        rotary.hf.install(model, placement="cross")
    with pytest.raises(ValueError, match="rotary_dim"):  # a Rotary option: checked before anything changes
        rotary.hf.install(model, rotary_dim=3)
    with pytest.raises(TypeError, match="WhisperForConditionalGeneration or WhisperModel, got WhisperEncoder"):
        hw.install(model.model.encoder)
    assert _module_state(model) == state
    rotary.hf.install(model, placement="embedding")
    state = _module_state(model)
    with pytest.raises(RuntimeError, match=r"already installed in this model \(placement='embedding'\)"):
        rotary.hf.install(model, placement="attention")
    assert _module_state(model) == state


@pytest.mark.parametrize("bad, named", [
    (dict(placement="cross"), "'cross'"), (dict(learned_positions="yes"), "'yes'"), (dict(learned_freq=1), "1"),
    (dict(mixing="nonsense"), "'nonsense'"), (dict(interleaved=None), "None"),
])
def test_lax_options_are_refused_and_leave_the_model_unchanged(feats, bad, named):
    model = _stock()
    state, ids = _module_state(model), torch.randint(4, 96, (2, 5))
    before = _logits(model, feats, ids)
    with pytest.raises(ValueError, match=rf"got {named}"):
        rotary.hf.install(model, **bad)
    assert _module_state(model) == state and rotary.hf.installed(model) is None
    assert torch.equal(_logits(model, feats, ids), before)


def test_a_checkpoint_of_the_previous_version_still_loads(tmp_path, feats):
    """Written before the install record: config.rotary held install's keyword arguments, and the options were an
    extra-state entry of the rotary itself (model.decoder.rotary._extra_state)."""
    import json

    from safetensors.torch import load_file, save_file

    model = _installed("attention", learned_freq=True)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rotary"] = {"base": 10000.0, "interleaved": True, "learned_freq": True, "learned_positions": False,
                        "mixing": "givens", "placement": "attention", "rotary_dim": 16, "scaling": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(tmp_path / "model.safetensors")
    state["model.decoder.rotary._extra_state"] = state.pop("model.decoder.rotary_install._extra_state")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = rotary.hf.from_pretrained(WhisperForConditionalGeneration, tmp_path).eval()
    assert hw.installed(loaded).options == hw.installed(model).options
    ids = torch.randint(4, 96, (2, 8))
    assert torch.equal(_logits(model, feats, ids), _logits(loaded, feats, ids))
