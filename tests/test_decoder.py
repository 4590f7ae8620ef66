"""The reference decoder against a float64 oracle, incremental decoding against full forwards, folding, beams."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import rotary
from rotary import rotary_reference
from rotary.integrations.decoder import Decoder, DecoderConfig, KVCache, load, save

VOCAB, XA_DIMS = 97, 24
# every positional mode: the rotary placements by their placement name, the tables by theirs
MODES = {"attention": {"positional": "rotary", "placement": "attention"},
         "embedding": {"positional": "rotary", "placement": "embedding"},
         "learned": {"positional": "learned"}, "sinusoidal": {"positional": "sinusoidal"},
         "none": {"positional": "none"}}


def _model(mode="attention", xa=False, mixing="givens", dims=48, heads=4, layers=2, **kw):
    cfg = DecoderConfig(vocab=VOCAB, ctx=64, dims=dims, heads=heads, layers=layers,
                        xa_dims=XA_DIMS if xa else None, mixing=mixing, **MODES[mode], **kw)
    model = Decoder(cfg).eval()
    with torch.no_grad():  # away from the identity, so that P and learned frequencies matter wherever tested
        for name, p in model.named_parameters():
            if "mixer" in name or "log_freq_scale" in name:
                p.normal_(std=0.1 if "log_freq_scale" in name else 1.0)
    return model


def _inputs(B=3, T=13, xa=False):
    tokens = torch.randint(0, VOCAB, (B, T))
    return tokens, (torch.randn(B, 7, XA_DIMS) if xa else None)


def _reference(model: Decoder, tokens, xa=None) -> torch.Tensor:
    """Naive float64 forward: explicit masked softmax, rotations by ``rotary_reference``, no cache."""
    c = model.config
    m = copy.deepcopy(model).double()
    B, T = tokens.shape
    H, D = c.heads, c.head_dim
    pos = torch.arange(T)

    def rope(t):  # (B, T, C) -> R(m) P t per head, P on the activations whichever placement
        r = m.rotary
        return rotary_reference(t.view(B, T, H, D), pos, rotary_dim=r.rotary_dim, interleaved=r.interleaved,
                                mixing=m.mixing_matrix(torch.float64), freqs=r.frequencies()).reshape(B, T, H * D)

    def attention(attn, x, kv, causal):
        q = attn.query(x).view(B, T, H, D).transpose(1, 2)
        S = kv.shape[1]
        k = attn.key(kv).view(B, S, H, D).transpose(1, 2)
        v = attn.value(kv).view(B, S, H, D).transpose(1, 2)
        if causal and c.positional == "rotary" and c.placement == "attention":
            q = rope(q.transpose(1, 2).reshape(B, T, -1)).view(B, T, H, D).transpose(1, 2)
            k = rope(k.transpose(1, 2).reshape(B, T, -1)).view(B, T, H, D).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, S)
        if causal:
            scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
        return attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D))

    x = m.token_embedding.weight[tokens]
    if c.positional == "learned":
        x = x + m.positional_embedding[:T]
    if c.positional == "sinusoidal":
        half = c.dims // 2
        table = [[f(t * 10000 ** (-i / (half - 1))) for f in (math.sin, math.cos) for i in range(half)]
                 for t in range(T)]
        x = x * math.sqrt(c.dims) + torch.tensor(table, dtype=torch.float64)  # Vaswani's sqrt(C) scaling
    if c.positional == "rotary" and c.placement == "embedding":
        x = rope(x)
    for blk in m.blocks:
        x = x + attention(blk.attn, blk.attn_ln(x), blk.attn_ln(x), causal=True)
        if blk.cross_attn is not None:
            x = x + attention(blk.cross_attn, blk.cross_attn_ln(x), xa.double(), causal=False)
        x = x + blk.mlp(blk.mlp_ln(x))
    return m.ln(x) @ m.token_embedding.weight.T


def _incremental(model, tokens, xa, chunks, cache=None):
    """Logits of tokens fed through a KV cache in the given chunk sizes (which sum to T)."""
    cache = cache if cache is not None else KVCache()
    out, start, first = [], 0, cache.offset
    for n in chunks:
        out.append(model(tokens[:, start : start + n], xa, cache=cache))
        start += n
    assert cache.offset == first + start
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("positional", MODES)
@pytest.mark.parametrize("xa", [False, True])
def test_matches_float64_reference(positional, xa):
    model = _model(positional, xa)
    tokens, feats = _inputs(xa=xa)
    with torch.no_grad():
        got = model(tokens, feats)
        want = _reference(model, tokens, feats)
    assert got.dtype == torch.float32 and got.shape == (3, 13, VOCAB)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("positional", MODES)
@pytest.mark.parametrize("xa", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 13, [4, 3, 1, 1, 4]])
def test_incremental_equals_full(positional, xa, chunks):
    model = _model(positional, xa)
    tokens, feats = _inputs(xa=xa)
    with torch.no_grad():
        full = model(tokens, feats)
        inc = _incremental(model, tokens, feats, chunks)
    assert (full - inc).abs().max() <= 1e-5


@pytest.mark.parametrize("positional", MODES)
def test_reorder_cache_for_beam_search(positional):
    model = _model(positional, xa=True)
    tokens, feats = _inputs(B=2, T=6, xa=True)
    more = torch.randint(0, VOCAB, (3, 4))
    beams = torch.tensor([1, 0, 1])  # beam 0 continues sequence 1, beam 2 duplicates it
    with torch.no_grad():
        cache = KVCache()
        model(tokens, feats, cache=cache)
        Decoder.reorder_cache(cache, beams)
        inc = _incremental(model, more, feats[beams], [1, 2, 1], cache=cache)
        full = model(torch.cat([tokens[beams], more], dim=1), feats[beams])[:, 6:]
    assert (full - inc).abs().max() <= 1e-5


@pytest.mark.parametrize("mode,relative", [("attention", True), ("none", True), ("embedding", False),
                                           ("learned", False)])
def test_relative_only_in_the_attention_placement(mode, relative):
    """Starting the same text at position 29 changes nothing iff scores depend only on relative positions."""
    model = _model(mode, xa=False)
    tokens, _ = _inputs(T=9)
    with torch.no_grad():
        at0 = model(tokens)
        at29 = model(tokens, cache=KVCache(offset=29))
    diff = (at0 - at29).abs().max()
    assert diff <= 1e-5 if relative else diff > 1e-3


@pytest.mark.parametrize("mixing", ["givens", "orthogonal", "quaternion"])
@pytest.mark.parametrize("interleaved,rotary_dim", [(True, None), (False, 6)])
def test_fold_keeps_logits_and_exact_cache(mixing, interleaved, rotary_dim, tmp_path):
    model = _model("attention", xa=True, mixing=mixing, interleaved=interleaved, rotary_dim=rotary_dim)
    tokens, feats = _inputs(xa=True)
    with torch.no_grad():
        before = model(tokens, feats)
        assert rotary.fold(model) is model
        after = model(tokens, feats)
        inc = _incremental(model, tokens, feats, [5, 1, 1, 6])
    assert model.rotary.mixer is None and model.config.mixing is None
    assert not any("mixer" in k for k in model.state_dict())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert (after - inc).abs().max() <= 1e-5
    save(model, tmp_path / "folded.pt")  # the folded config rebuilds a plain-RoPE model that loads strictly
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "folded.pt")(tokens, feats), after)


@pytest.mark.parametrize("mode", ["embedding", "learned", "attention-without-mixing"])
def test_fold_refuses_embedding_placement_and_leaves_plain_models_alone(mode):
    model = _model("attention", mixing=None) if mode == "attention-without-mixing" else _model(mode)
    tokens, _ = _inputs()
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(tokens)
        if mode == "embedding":
            with pytest.raises(ValueError, match="embedding placement cannot be folded"):
                rotary.fold(model)
        else:
            rotary.fold(model)
        assert torch.equal(model(tokens), before)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_old_checkpoint_loads(tmp_path):
    """A checkpoint from before ``placement`` (positional="rotary-attention", P saved as ``mixing.*``) loads."""
    model = _model("attention", xa=True)
    tokens, feats = _inputs(xa=True)
    config = {**dataclasses.asdict(model.config), "positional": "rotary-attention"}
    del config["placement"]
    # P under its names of then: ``mixing.*`` at the top (later ``rotary.mixing.*``, now ``rotary.mixer.*``)
    state = {(k.replace("rotary.mixer.", "mixing.", 1) if k.startswith("rotary.mixer.") else k): v
             for k, v in model.state_dict().items()}
    assert "mixing.angles" in state
    torch.save({"config": config, "state_dict": state}, tmp_path / "old.pt")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "old.pt")(tokens, feats), model(tokens, feats))
    torch.save({"config": {**config, "alibi": True}, "state_dict": state}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="unknown fields \\['alibi'\\]"):
        load(tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="positional='rotary', placement='attention'"):
        DecoderConfig(vocab=10, positional="rotary-attention")


def test_follows_the_dtype_of_xa():
    """As whisper's decoder: fp32 weights, bf16 features -> the decoder computes in bf16 (no dtype error)."""
    model = _model("attention", xa=True)
    tokens, feats = _inputs(xa=True)
    with torch.no_grad():
        full = model(tokens, feats)
        half = model(tokens, feats.bfloat16())
    assert half.dtype == torch.float32  # logits are returned in float32, as whisper's
    assert (half - full).abs().max() < 0.1 * full.abs().max()


@pytest.mark.parametrize("mode", MODES)
def test_save_load_roundtrip_bit_identical(mode, tmp_path):
    model = _model(mode, xa=True, learned_freq=True)
    tokens, feats = _inputs(xa=True)
    save(model, tmp_path / "m.pt")
    loaded = load(tmp_path / "m.pt")
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens, feats), model(tokens, feats))


@pytest.mark.parametrize("mode", ["attention", "embedding"])
def test_training_steps_update_rotary(mode):
    model = _model(mode, mixing="givens", learned_freq=True).train()
    names = {"rotary.mixer.angles", "rotary.angles.log_freq_scale"}  # one place for P, whatever the placement
    assert {n for n, _ in model.named_parameters() if "mixer" in n or "rotary" in n} == names
    with torch.no_grad():
        for n in names:
            model.get_parameter(n).zero_()  # from the identity, as in real training
    start = {n: model.get_parameter(n).detach().clone() for n in names}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens, _ = _inputs(B=4, T=16)
    for _ in range(3):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    for n in start:
        assert not torch.equal(model.get_parameter(n), start[n]), n


def test_learned_table_is_initialised():
    a, b = _model("learned"), _model("learned")
    for m in (a, b):
        table = m.positional_embedding
        assert torch.isfinite(table).all() and 0.005 < table.std() < 0.02
    assert not torch.equal(a.positional_embedding, b.positional_embedding)  # drawn from the RNG, not left empty


def test_errors():
    with pytest.raises(ValueError, match="positional"):
        DecoderConfig(vocab=10, positional="alibi")
    with pytest.raises(ValueError, match="divisible"):
        DecoderConfig(vocab=10, dims=10, heads=3)
    tokens, feats = _inputs(xa=True)
    with pytest.raises(ValueError, match="xa"):
        _model(xa=True)(tokens)
    with pytest.raises(ValueError, match="xa"):
        _model(xa=False)(tokens, feats)
    with pytest.raises(ValueError, match="ctx"):
        _model("learned")(tokens, cache=KVCache(offset=60))
    _model("attention")(tokens, cache=KVCache(offset=1000))  # rotary modes have no table to run out of


@pytest.mark.parametrize("positional", MODES)
def test_positions_arange_equals_default_and_rows_equal_their_offsets(positional):
    """positions=arange (as (T,) or (B, T)) is the default path bit for bit; per-row positions o_b + arange give
    each row what a forward starting at o_b (a cache's offset) gives."""
    model = _model(positional, xa=True)
    tokens, feats = _inputs(xa=True)
    B, T = tokens.shape
    with torch.no_grad():
        default = model(tokens, feats)
        assert torch.equal(model(tokens, feats, positions=torch.arange(T)), default)
        assert torch.equal(model(tokens, feats, positions=torch.arange(T).expand(B, T)), default)
        offsets = [0, 5, 17]
        rows = model(tokens, feats, positions=torch.tensor(offsets)[:, None] + torch.arange(T))
        for b, o in enumerate(offsets):
            alone = model(tokens[b : b + 1], feats[b : b + 1], cache=KVCache(offset=o))
            torch.testing.assert_close(rows[b : b + 1], alone, rtol=0, atol=1e-5)


def test_positions_with_learned_frequencies_follow_each_row():
    """Learned frequencies take the direct path (no table): skipped positions must still equal the offsets."""
    model = _model("attention", mixing=None, learned_freq=True)
    tokens, _ = _inputs()
    offsets = [0, 7, 100]
    with torch.no_grad():
        rows = model(tokens, positions=torch.tensor(offsets)[:, None] + torch.arange(13))
        for b, o in enumerate(offsets):
            torch.testing.assert_close(rows[b : b + 1], model(tokens[b : b + 1], cache=KVCache(offset=o)),
                                       rtol=0, atol=1e-5)


def test_positions_errors():
    tokens, _ = _inputs()
    model = _model("attention")
    with pytest.raises(ValueError, match="cache"):
        model(tokens, cache=KVCache(), positions=torch.arange(13))
    with pytest.raises(ValueError, match=r"\(T,\) or \(B, T\)"):
        model(tokens, positions=torch.arange(12))
    with pytest.raises(ValueError, match="integer"):
        model(tokens, positions=torch.arange(13.0))
    with pytest.raises(ValueError, match="ctx"):
        _model("learned")(tokens, positions=torch.arange(13) + 60)
