"""rotary.whisper against the real openai-whisper package: a tiny random Whisper, synthetic audio, no downloads."""

import contextlib
import copy
import io
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rotary
import rotary.integrations.whisper as rw

whisper = pytest.importorskip("whisper")
from whisper.model import ModelDimensions, Whisper, disable_sdpa  # noqa: E402

PLACEMENTS = ["attention", "embedding"]
# n_vocab 51865: the multilingual tokenizer shipped inside the package; n_audio_ctx 1500: what transcribe() feeds.
DIMS = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=1,
                       n_vocab=51865, n_text_ctx=48, n_text_state=64, n_text_head=4, n_text_layer=2)


def _stock() -> Whisper:
    model = Whisper(DIMS)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)  # whisper leaves it torch.empty
    return model.eval()


def _installed(placement, stock=None, **options):
    model = rw.install(copy.deepcopy(stock) if stock is not None else _stock(), placement=placement, **options)
    with torch.no_grad():
        model.decoder.rotary.mixer.angles.normal_()  # away from the identity, so that P matters
    return model


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    t = np.arange(16000 * 2) / 16000
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def mel(audio) -> torch.Tensor:
    return whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)))  # (80, 3000)


@pytest.fixture(scope="module")
def features(mel) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return _stock().embed_audio(torch.stack([mel, 0.5 * mel]))  # (2, 1500, 64)


def _tol(logits: torch.Tensor, ulps: int = 8) -> float:
    """A few float32 ulps of the largest logit (whisper's tied N(0, 1) embedding gives logits of size ~50)."""
    return ulps * torch.finfo(torch.float32).eps * logits.abs().max().item()


def _cached_logits(model, tokens, features, prompt=3):
    """Whisper's own KV-cache hooks: the prompt at once, then one token per call, as PyTorchInference does."""
    cache, hooks = model.install_kv_cache_hooks()
    try:
        out = [model.decoder(tokens[:, :prompt], features, kv_cache=cache)]
        for i in range(prompt, tokens.shape[1]):
            out.append(model.decoder(tokens[:, i : i + 1], features, kv_cache=cache))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("sdpa", [True, False])
def test_kv_cache_hooks_match_full_forward(placement, sdpa, features):
    model = _installed(placement)
    tokens = torch.randint(0, DIMS.n_vocab, (2, 12))
    with torch.no_grad():
        if sdpa:
            full, cached = model.logits(tokens, features), _cached_logits(model, tokens, features)
        else:
            with disable_sdpa():
                full, cached = model.logits(tokens, features), _cached_logits(model, tokens, features)
    assert (full - cached).abs().max() <= _tol(full)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "dynamic", "factor": 2.0,
                                              "original_max_position_embeddings": 6}])
def test_cache_holds_rotated_keys_and_steps_rotate_only_new_tokens(scaling, features):
    """The per-step rotary work does not grow with the cache (keys are cached rotated) and equals a full forward;
    under length-dependent scaling every key is rotated again at the current length each step."""
    model = _installed("attention", scaling=scaling)
    rows = []
    model.decoder.rotary.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    tokens = torch.randint(0, DIMS.n_vocab, (2, 12))
    with torch.no_grad():
        full = model.logits(tokens, features)
        rows.clear()
        cached = _cached_logits(model, tokens, features, prompt=3)
    if scaling is None:  # (with dynamic scaling every angle moves with the length: no fixed full forward to equal)
        assert (full - cached).abs().max() <= _tol(full)
    layers = DIMS.n_text_layer
    steps = rows[2 * layers :]  # after the prompt: one query and one key (or the whole key sequence) per layer
    if scaling is None:
        assert steps == [1] * (2 * layers * 9)
    else:
        assert max(steps) == 12  # the last step rotates all 12 keys again


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_installed_model_computes_a_rotary_decoder(placement, features):
    """Against the reference decoder: the same weights copied into rotary.decoder.Decoder give the same logits."""
    from rotary.integrations.decoder import Decoder, DecoderConfig

    model = _installed(placement)
    cfg = DecoderConfig(vocab=DIMS.n_vocab, ctx=DIMS.n_text_ctx, dims=64, heads=4, layers=2, xa_dims=64,
                        positional="rotary", placement=placement)
    ref = Decoder(cfg).eval()
    state = {k.removeprefix("decoder."): v for k, v in model.state_dict().items() if k.startswith("decoder.")}
    # Same parameter names as whisper's, but no learned table: the attention placement bypasses whisper's,
    # the embedding placement adds it (zeroed here to match).
    del state["positional_embedding"]  # P has the same name in both: decoder.rotary.mixer.*
    del state["rotary_install._extra_state"]  # the install record's options
    ref.load_state_dict(state, strict=True)
    tokens = torch.randint(0, DIMS.n_vocab, (2, 9))
    with torch.no_grad():
        if placement == "embedding":
            model.decoder.positional_embedding.zero_()
        got, want = model.logits(tokens, features), ref(tokens, features)
    assert (got - want).abs().max() <= _tol(want, 32)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_greedy_and_beam_decode_run(placement, mel):
    model = _installed(placement)
    greedy = whisper.decode(model, torch.stack([mel, 0.5 * mel]),
                            whisper.DecodingOptions(language="en", fp16=False, sample_len=10))
    # One audio for beam search: openai-whisper 20250625 itself fails beam search on a batch of several audios
    # (its decoder does not repeat the audio features per beam).
    beam = whisper.decode(model, mel[None], whisper.DecodingOptions(language="en", fp16=False, beam_size=3,
                                                                   sample_len=10))
    assert len(greedy) == 2 and len(beam) == 1
    assert all(isinstance(r.text, str) and len(r.tokens) <= 10 for r in greedy + beam)


@pytest.mark.parametrize("mixing", [None, "givens", "orthogonal"])
def test_identity_install_gives_stock_logits_at_position_0(mixing, features):
    """Attention placement, learned table kept, one token at position 0: R(0) = I and P = I at install, so the
    installed model must compute exactly what whisper does. Fails the day whisper changes the forward we replace."""
    stock = _stock()
    model = rw.install(copy.deepcopy(stock), placement="attention", learned_positions=True, mixing=mixing).eval()
    tokens = torch.randint(0, DIMS.n_vocab, (2, 1))
    with torch.no_grad():
        want = stock.logits(tokens, features)
        got = model.logits(tokens, features)
    assert (got - want).abs().max() <= 1e-6


def test_transcribe_runs(audio):
    result = whisper.transcribe(_installed("attention"), audio, temperature=0.0, language="en", fp16=False)
    assert isinstance(result["text"], str)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_training_steps_update_rotary(placement, features):
    model = rw.install(_stock(), placement=placement, learned_freq=True).train()
    names = {n for n, _ in model.named_parameters() if "rotary" in n}
    assert names == {"decoder.rotary.mixer.angles", "decoder.rotary.angles.log_freq_scale"}
    start = {n: p.detach().clone() for n, p in model.decoder.rotary.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, DIMS.n_vocab, (2, 10))
    for _ in range(3):
        logits = model.decoder(tokens[:, :-1], features)  # the decoder is what changed; spare the encoder
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    for n, p in model.decoder.rotary.named_parameters():
        assert not torch.equal(p, start[n]), n
    table_grad = model.decoder.positional_embedding.grad
    assert (table_grad is None) == (placement == "attention")  # the attention placement bypasses the table


def test_fold_keeps_logits_and_cache(features):
    model = _installed("attention")
    tokens = torch.randint(0, DIMS.n_vocab, (2, 12))
    with torch.no_grad():
        before = model.logits(tokens, features)
        assert rotary.fold(model) is model
        after = model.logits(tokens, features)
        cached = _cached_logits(model, tokens, features)
    assert model.decoder.rotary.mixer is None
    assert not any("mixer" in k for k in model.state_dict())
    assert (after - before).abs().max() <= _tol(before, 16)
    assert (after - cached).abs().max() <= _tol(after)
    # A folded state_dict loads strictly into a model installed with mixing=None.
    fresh = rw.install(_stock(), placement="attention", mixing=None)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.logits(tokens, features), after)


def test_fold_refuses_embedding_placement(features):
    model = _installed("embedding")
    tokens = torch.randint(0, DIMS.n_vocab, (2, 7))
    with torch.no_grad():
        before = model.logits(tokens, features)
        with pytest.raises(ValueError, match="embedding placement cannot be folded"):
            rotary.fold(model)
        assert torch.equal(model.logits(tokens, features), before)
    assert model.decoder.rotary.mixer is not None


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_state_dict_round_trip_bit_identical(placement, features):
    model = _installed(placement)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = rw.install(Whisper(DIMS), placement=placement).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    tokens = torch.randint(0, DIMS.n_vocab, (2, 7))
    with torch.no_grad():
        assert torch.equal(fresh.logits(tokens, features), model.logits(tokens, features))


def test_rotary_registered_once_and_copies_are_independent(features):
    model = _installed("attention")
    keys = [k for k in model.state_dict() if "rotary" in k]
    assert keys == ["decoder.rotary.mixer.angles", "decoder.rotary.mixer.planes", "decoder.rotary_install._extra_state"]
    assert type(model.decoder.rotary) is rotary.Rotary  # a plain Rotary: the bookkeeping is the record's
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, DIMS.n_vocab, (1, 5))
    with torch.no_grad():
        before = model.logits(tokens, features[:1])
        assert torch.equal(twin.logits(tokens, features[:1]), before)
        twin.decoder.rotary.mixer.angles.add_(1.0)  # the copy's layers must use the copy's rotary
        assert not torch.equal(twin.logits(tokens, features[:1]), before)
        assert torch.equal(model.logits(tokens, features[:1]), before)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # whole-model pickling works too
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buffer, weights_only=False).logits(tokens, features[:1]), before)


def _host_state(model):
    """What an install may change: module tree, state_dict keys, instance forwards, hooks of every kind."""
    return (
        [(n, type(m)) for n, m in model.named_modules()], list(model.state_dict()),
        [sorted(k for k in vars(m) if k in ("forward", "generate")) for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._load_state_dict_pre_hooks))
         for m in model.modules()],
    )


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_uninstall_restores_stock_whisper(placement, features):
    stock = _stock()
    model = rw.uninstall(_installed(placement, stock))
    assert rw.installed(model) is None
    assert _host_state(model) == _host_state(stock)  # no leftover hook, forward or attribute
    tokens = torch.randint(0, DIMS.n_vocab, (2, 6))
    with torch.no_grad():
        assert torch.equal(model.logits(tokens, features), stock.logits(tokens, features))
        assert torch.equal(_cached_logits(model, tokens, features), _cached_logits(stock, tokens, features))


@pytest.mark.parametrize("sdpa", [True, False])
@pytest.mark.parametrize("length", [1, 7, 33])
def test_copied_forwards_equal_stock_with_the_rotation_off(length, sdpa, features):
    """The replaced decoder, self-attention and key forwards with the Rotary made the identity (and whisper's table
    kept) compute stock whisper's logits at several lengths, with and without its KV-cache hooks. Fails the day
    whisper changes a forward body that rotary.whisper copies."""
    stock = _stock()
    model = rw.install(copy.deepcopy(stock), placement="attention", learned_positions=True).eval()
    model.decoder.rotary.forward = lambda x, **kwargs: x  # an instance attribute, this test only
    tokens = torch.randint(0, DIMS.n_vocab, (2, length + 4))
    with torch.no_grad(), (contextlib.nullcontext() if sdpa else disable_sdpa()):
        for n in (length, length + 4):
            assert (model.logits(tokens[:, :n], features) - stock.logits(tokens[:, :n], features)).abs().max() <= 1e-6
        got = _cached_logits(model, tokens, features, prompt=length)
        want = _cached_logits(stock, tokens, features, prompt=length)
    assert (got - want).abs().max() <= 1e-6


def test_decode_position_comes_from_each_call_not_from_shared_state(features):
    """Two decodes interleaved step by step on one model, each with its own cache: the position of a step is the
    call's own (from its cache), so each equals the same decode run alone."""
    model = _installed("attention")
    a, b = torch.randint(0, DIMS.n_vocab, (2, 9)), torch.randint(0, DIMS.n_vocab, (2, 9))
    caches, out = [{}, {}], [[], []]

    def step(j, tokens):  # whisper's hooks write every cache they were installed with: one set at a time
        cache, hooks = model.install_kv_cache_hooks(caches[j])
        try:
            out[j].append(model.decoder(tokens, features, kv_cache=cache))
        finally:
            for h in hooks:
                h.remove()
        caches[j] = cache

    with torch.no_grad():
        alone = [_cached_logits(model, t, features) for t in (a, b)]
        step(0, a[:, :3])
        step(1, b[:, :3])
        for i in range(3, 9):
            step(1, b[:, i : i + 1])  # b's step first, then a's
            step(0, a[:, i : i + 1])
        out = [torch.cat(o, dim=1) for o in out]
    for got, want in zip(out, alone):
        assert (got - want).abs().max() <= _tol(want)


def test_install_errors():
    model = _installed("attention")
    assert rw.installed(model).options.placement == "attention"
    with pytest.warns(DeprecationWarning):
        assert rw.installed_placement(model) == "attention"
    with pytest.raises(RuntimeError, match="uninstall"):
        rw.install(model)
    with pytest.raises(TypeError, match="Whisper"):
        rw.install(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="installed"):
        rw.uninstall(_stock())


@pytest.mark.parametrize("bad, named", [
    (dict(placement="value"), "'value'"), (dict(learned_positions="yes"), "'yes'"), (dict(learned_freq=1), "1"),
    (dict(mixing="nonsense"), "'nonsense'"), (dict(rotary_dim=3), "3"), (dict(interleaved=None), "None"),
])
def test_lax_options_are_refused_and_leave_the_model_unchanged(bad, named, features):
    model = _stock()
    before = _host_state(model)
    tokens = torch.randint(0, DIMS.n_vocab, (2, 5))
    with torch.no_grad():
        logits = model.logits(tokens, features)
    with pytest.raises(ValueError, match=rf"got {named}"):
        rw.install(model, **bad)
    assert _host_state(model) == before and rw.installed(model) is None
    with torch.no_grad():
        assert torch.equal(model.logits(tokens, features), logits)


def test_missing_whisper_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "whisper", None)  # as if openai-whisper were not installed
    monkeypatch.setitem(sys.modules, "whisper.model", None)
    with pytest.raises(ImportError, match=r"pip install 'rotary\[whisper\]'"):
        rw.install(torch.nn.Linear(2, 2))


def test_compiled_decoder_decodes_as_eager_without_a_compile_per_step(features, fresh_dynamo):
    """The decode position comes from each call's cache (a shape), not from Python state: torch.compile'd, the
    cached decode equals eager's and compiles a bounded number of frames however many steps run."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _installed("attention")
    tokens = torch.randint(0, DIMS.n_vocab, (1, 14))
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model.decoder, backend=counter)

    def decode(decoder):
        cache, hooks = model.install_kv_cache_hooks()
        try:
            steps = [decoder(tokens[:, :3], features[:1], kv_cache=cache)]
            steps += [decoder(tokens[:, i : i + 1], features[:1], kv_cache=cache) for i in range(3, 14)]
        finally:
            for h in hooks:
                h.remove()
        return torch.cat(steps, dim=1)

    with torch.no_grad():
        want, got = decode(model.decoder), decode(compiled)
    assert (got - want).abs().max() <= _tol(want, 32)
    assert counter.frame_count <= 3  # the prompt, the first step, then one graph with a dynamic position
