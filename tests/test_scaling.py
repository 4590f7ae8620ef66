"""Frequency scaling (context extension): equal to transformers, invariants, KV cache, compile, mixing, errors."""

import copy
import math

import pytest
import torch
from conftest import assert_decodes_without_recompiles
from torch._dynamo.testing import CompileCounterWithBackend

from rotary import Rotary, rotary_reference
from rotary.core.frequencies import inverse_frequencies

L0 = 32  # original (training) context of every test scheme
HEAD_DIM, HEADS = 16, 3
EPS32 = 2.0**-23

# Each scheme as a transformers config would carry it, with the config's max_position_embeddings.
SCHEMES = {
    "default": ({"rope_type": "default"}, L0),
    "linear": ({"rope_type": "linear", "factor": 4.0}, L0),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, L0),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L0}, 4 * L0),
    "yarn_deepseek": (
        {
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L0, "beta_fast": 8,
            "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False, "rope_theta": 5000.0,
        },
        4 * L0,
    ),
    "llama3": (
        {
            "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": L0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "rope_theta": 500000.0,
        },
        8 * L0,
    ),
    "longrope": (
        {
            "rope_type": "longrope", "original_max_position_embeddings": L0,
            "short_factor": [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)],
            "long_factor": [1.0 + 0.9 * i for i in range(HEAD_DIM // 2)],
        },
        4 * L0,  # no factor: transformers takes max_position_embeddings / original_max_position_embeddings
    ),
    "proportional": ({"rope_type": "proportional", "partial_rotary_factor": 0.5}, L0),
    "legacy_type_key": ({"type": "linear", "factor": 2.0}, L0),
}
LENGTHS = [21, L0, L0 + 1, 3 * L0 + 1]  # below, at and above the original context


def _hf_config(params: dict, max_positions: int):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        hidden_size=HEAD_DIM * HEADS,
        num_attention_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_positions,
        rope_parameters=copy.deepcopy(params),
    )


def _scaling_from(config) -> dict:
    """What a user writes: the config's dict as it is, plus the config's max_position_embeddings."""
    return {**config.rope_parameters, "max_position_embeddings": config.max_position_embeddings}


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_matches_transformers(scheme, T):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = _hf_config(*SCHEMES[scheme])
    hf = llama.LlamaRotaryEmbedding(config)  # fresh: transformers' dynamic/longrope keep state between calls
    m = Rotary(HEAD_DIM * HEADS, HEADS, mixing=None, interleaved=False, scaling=_scaling_from(config))
    assert m.angles.attention_factor == pytest.approx(hf.attention_scaling, rel=1e-12)
    q = torch.randn(2, HEADS, T, HEAD_DIM)  # transformers' (B, H, T, D)
    k = torch.randn(2, HEADS, T, HEAD_DIM)
    cos, sin = hf(q, torch.arange(T).expand(2, T))
    q_hf, k_hf = llama.apply_rotary_pos_emb(q, k, cos, sin)
    q_ours, k_ours = m.rotate_qk(q, k)
    y = m(q.transpose(1, 2), layout="BTHD").transpose(1, 2)  # (B, T, H, D) layout through forward
    # transformers rounds each angle m * w_i (|m w_i| < T) to float32 (error ~ T * 2^-23) and its frequencies
    # carry a few float32 ulps; each output mixes two inputs, scaled by the attention factor.
    atol = 2 * m.angles.attention_factor * max(q.abs().max(), k.abs().max()).item() * (T + 8) * EPS32
    for ours, theirs in ((q_ours, q_hf), (k_ours, k_hf), (y, q_hf)):
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


@pytest.mark.parametrize("scheme", ["dynamic", "yarn", "longrope"])
@pytest.mark.parametrize("start", [5, 2 * L0])
def test_matches_transformers_for_a_chunk_at_an_offset(scheme, start):
    # transformers evaluates length-dependent schemes at max(position_ids) + 1: here offset + T
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = _hf_config(*SCHEMES[scheme])
    m = Rotary(HEAD_DIM * HEADS, HEADS, mixing=None, interleaved=False, scaling=_scaling_from(config))
    T = 7
    x = torch.randn(2, HEADS, T, HEAD_DIM)
    cos, sin = llama.LlamaRotaryEmbedding(config)(x, torch.arange(start, start + T)[None])
    expected, _ = llama.apply_rotary_pos_emb(x, x, cos, sin)
    atol = 2 * m.angles.attention_factor * x.abs().max().item() * (start + T + 8) * EPS32
    for kwargs in ({"offset": start}, {"offset": torch.tensor(start)}, {"positions": torch.arange(start, start + T)}):
        y = m(x.transpose(1, 2), **kwargs, layout="BTHD").transpose(1, 2)
        torch.testing.assert_close(y, expected, atol=atol, rtol=0)


def test_matches_transformers_with_partial_rotary_factor():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    params = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": L0, "partial_rotary_factor": 0.5}
    config = _hf_config(params, 2 * L0)
    m = Rotary(HEAD_DIM * HEADS, HEADS, mixing=None, interleaved=False, scaling=_scaling_from(config))
    assert m.rotary_dim == HEAD_DIM // 2
    T = 3 * L0
    x = torch.randn(2, HEADS, T, HEAD_DIM)
    cos, sin = llama.LlamaRotaryEmbedding(config)(x, torch.arange(T)[None])
    r = m.rotary_dim  # partial-rotary models rotate the first r channels and pass the rest (e.g. Phi, NeoX)
    rotated, _ = llama.apply_rotary_pos_emb(x[..., :r], x[..., :r], cos, sin)
    expected = torch.cat((rotated, x[..., r:]), dim=-1)
    q, _ = m.rotate_qk(x, x)
    atol = 2 * m.angles.attention_factor * x.abs().max().item() * (T + 8) * EPS32
    torch.testing.assert_close(q, expected, atol=atol, rtol=0)
    assert torch.equal(q[..., r:], x[..., r:])  # the attention factor only touches rotated channels, as in transformers


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s not in ("default", "legacy_type_key")])
def test_every_scheme_changes_long_contexts(scheme):
    params, max_positions = SCHEMES[scheme]
    m = Rotary(HEAD_DIM * HEADS, HEADS, mixing=None, scaling={**params, "max_position_embeddings": max_positions})
    plain = Rotary(HEAD_DIM * HEADS, HEADS, mixing=None, base=m.base)
    x = torch.randn(1, 3 * L0, HEADS, HEAD_DIM)
    assert (m(x, layout="BTHD") - plain(x, layout="BTHD")).abs().max() > 1e-2


def test_dynamic_is_plain_rope_within_the_original_context():
    m = Rotary(48, 3, mixing=None, scaling={"rope_type": "dynamic", "factor": 4.0, "max_position_embeddings": L0})
    plain = Rotary(48, 3, mixing=None)
    x = torch.randn(2, L0, 48)
    assert torch.equal(m(x), plain(x))
    assert not torch.equal(m(x, length=L0 + 1), plain(x))


@pytest.mark.parametrize("L", [L0 + 1, 100, 1000])
def test_static_ntk_is_dynamic_frozen_at_one_length(L):
    factor, r = 4.0, HEAD_DIM
    dynamic = Rotary(48, 3, mixing=None,
                     scaling={"rope_type": "dynamic", "factor": factor, "max_position_embeddings": L0})
    frozen = factor * L / L0 - (factor - 1)
    ntk = Rotary(48, 3, mixing=None, scaling={"rope_type": "ntk", "factor": frozen})
    torch.testing.assert_close(ntk.frequencies(), dynamic.frequencies(L), rtol=1e-13, atol=0)
    # and ntk is plain RoPE with base' = base * factor ** (r / (r - 2))
    torch.testing.assert_close(ntk.frequencies(), inverse_frequencies(r, 10000.0 * frozen ** (r / (r - 2))),
                               rtol=1e-13, atol=0)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.75, 1.0])
def test_p_rope_keeps_the_fastest_fraction_and_passes_the_rest_exactly(p):
    m = Rotary(48, 3, mixing=None, interleaved=False, scaling={"rope_type": "p", "p": p})
    same = Rotary(48, 3, mixing=None, interleaved=False,
                  scaling={"rope_type": "proportional", "partial_rotary_factor": p})
    kept = math.floor(p * HEAD_DIM / 2)
    w = m.frequencies()
    assert torch.equal(w[:kept], inverse_frequencies(HEAD_DIM, 10000.0)[:kept])
    assert bool((w[kept:] == 0).all())
    x = torch.randn(2, 9, 3, HEAD_DIM)
    y = m(x, offset=5, layout="BTHD")
    assert torch.equal(y, same(x, offset=5, layout="BTHD"))
    half = HEAD_DIM // 2
    dropped = [i for i in range(half) if i >= kept] + [i + half for i in range(half) if i >= kept]
    assert torch.equal(y[..., dropped], x[..., dropped])  # frequency 0: the identity, bit-exact


def test_legacy_type_key_is_rope_type():
    x = torch.randn(2, 7, 48)
    a = Rotary(48, 3, scaling={"type": "linear", "factor": 2.0})
    b = Rotary(48, 3, scaling={"rope_type": "linear", "factor": 2.0})
    assert torch.equal(a(x, offset=3), b(x, offset=3))


LENGTH_DEPENDENT = {
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "max_position_embeddings": 16},
    "longrope": {
        "rope_type": "longrope", "original_max_position_embeddings": 16, "factor": 4.0,
        "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [1.0, 2.0, 4.0, 8.0],
    },
}


def _attend(q, k, v):
    """Causal attention of the last Tq queries over all Tk keys (B, H, T, D)."""
    Tq, Tk = q.shape[2], k.shape[2]
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("scheme", list(LENGTH_DEPENDENT))
@pytest.mark.parametrize("mixing", [None, "givens"])
def test_unrotated_key_cache_equals_full_forward(scheme, mixing):
    # Semantics: frequencies follow the total length offset + Tk. Generating without a cache reruns a full
    # forward over the prefix and reads its last row; with a cache of unrotated keys, rotate_qk rotates the
    # whole cache each step at the same length: the same numbers, token after token, across the original context.
    m = Rotary(32, 4, mixing=mixing, scaling=LENGTH_DEPENDENT[scheme])
    B, H, N, D = 2, 4, 40, 8
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    prefill = 10
    qr, kr = m.rotate_qk(q[:, :, :prefill], k[:, :, :prefill])
    outputs = [_attend(qr, kr, v[:, :, :prefill])]
    for t in range(prefill, N):  # decode: one query, all cached (unrotated) keys
        qr, kr = m.rotate_qk(q[:, :, t : t + 1], k[:, :, : t + 1], offset=t)  # offset: the query's position
        outputs.append(_attend(qr, kr, v[:, :, : t + 1]))
    cached = torch.cat(outputs, dim=2)
    for t in range(prefill, N + 1):  # no cache: a full forward over the first t tokens (the prompt: all rows)
        qr, kr = m.rotate_qk(q[:, :, :t], k[:, :, :t])
        full = _attend(qr, kr, v[:, :, :t])
        rows = slice(0, t) if t == prefill else slice(t - 1, t)
        torch.testing.assert_close(cached[:, :, rows], full[:, :, rows], atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme", list(LENGTH_DEPENDENT))
def test_rotated_key_cache_with_fixed_length_equals_full_forward(scheme):
    m = Rotary(32, 4, scaling=LENGTH_DEPENDENT[scheme])
    with torch.no_grad():
        m.mixer.angles.normal_()
    N = 40
    x = torch.randn(2, N, 32)
    full = m(x, length=N)
    steps = [m(x[:, :7], length=N)] + [m(x[:, t : t + 1], offset=t, length=N) for t in range(7, N)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=0)
    assert torch.equal(m(x), full)  # a full forward's default length is its own length
    assert not torch.equal(m(x[:, :12]), full[:, :12])  # ...which is why a rotated cache needs length=


@pytest.mark.parametrize("scheme", list(LENGTH_DEPENDENT))
def test_lengths_are_per_row(scheme):
    m = Rotary(32, 4, scaling=LENGTH_DEPENDENT[scheme])
    x = torch.randn(2, 5, 32)
    offsets = torch.tensor([3, 30])  # row 0 within the original context, row 1 beyond it
    y = m(x, offset=offsets)
    for b in range(2):
        torch.testing.assert_close(y[b : b + 1], m(x[b : b + 1], offset=int(offsets[b])), atol=1e-6, rtol=0)
    positions = offsets[:, None] + torch.arange(5)
    torch.testing.assert_close(m(x, positions=positions), y, atol=1e-6, rtol=0)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("scheme", list(LENGTH_DEPENDENT))
def test_compile_fullgraph_without_recompiles_across_the_original_context(scheme):
    m = Rotary(32, 4, scaling=LENGTH_DEPENDENT[scheme])
    assert_decodes_without_recompiles(m, range(10, 40))  # from inside to well past the original context (16)
    counter = CompileCounterWithBackend("aot_eager")
    g = torch.compile(m.rotate_qk, backend=counter, fullgraph=True)  # the unrotated-cache path
    g(torch.randn(2, 4, 1, 8), torch.randn(2, 4, 3, 8), offset=2)  # offset: the query's position, Tk - 1
    g(torch.randn(2, 4, 1, 8), torch.randn(2, 4, 4, 8), offset=3)
    warm = counter.frame_count
    for t in range(5, 40):
        q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 4, t, 8)
        for a, b in zip(g(q, k, offset=t - 1), m.rotate_qk(q, k, offset=t - 1)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert counter.frame_count == warm


MIXED = ["linear", "dynamic", "yarn_deepseek", "llama3", "longrope", "proportional"]


@pytest.mark.parametrize("scheme", MIXED)
@pytest.mark.parametrize("mixing", ["givens", "orthogonal"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_learned_mixing_composes(scheme, mixing, interleaved):
    params, max_positions = SCHEMES[scheme]
    m = Rotary(HEAD_DIM * HEADS, HEADS, mixing=mixing, interleaved=interleaved,
               scaling={**params, "max_position_embeddings": max_positions})
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    B, T, offset = 2, 5, 3 * L0
    x = torch.randn(B, T, HEADS, HEAD_DIM, requires_grad=True)
    y = m(x, offset=offset, layout="BTHD")
    pos = torch.arange(offset, offset + T)
    freqs = m.frequencies(offset + T).detach()
    ref = m.angles.attention_factor * rotary_reference(x.detach(), pos, interleaved=interleaved, freqs=freqs,
                                                mixing=m.mixing_matrix(torch.float64).detach())
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    xd = x.detach().double().requires_grad_()
    ref = m.angles.attention_factor * rotary_reference(xd, pos, interleaved=interleaved, freqs=freqs,
                                                mixing=m.mixing_matrix(torch.float64).detach())
    (gref,) = torch.autograd.grad(ref, xd, g.double())
    torch.testing.assert_close(gx.double(), gref, atol=1e-5, rtol=0)


def test_dtype_casts_keep_the_scaled_tables():
    m = Rotary(48, 3, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L0})
    cast = copy.deepcopy(m).to(torch.bfloat16)
    assert cast.angles.cos_table.dtype == torch.float32
    assert torch.equal(cast.angles.cos_table, m.angles.cos_table)
    assert torch.equal(cast.angles.sin_table, m.angles.sin_table)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scaling": {"factor": 2.0}}, "needs a 'rope_type'"),
        ({"scaling": {"rope_type": "ntk-by-parts", "factor": 2.0}}, "unknown scaling rope_type"),
        ({"scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 32}}, "unknown keys \\['beta_fast'\\]"),
        ({"scaling": {**YARN, "mrope_section": [2, 2]}}, "unknown keys"),
        ({"scaling": {"rope_type": "linear"}}, "missing required keys \\['factor'\\]"),
        ({"scaling": {"rope_type": "yarn", "factor": 4.0}},
         "missing required keys \\['original_max_position_embeddings'\\]"),
        ({"scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}},
         "high_freq_factor"),
        ({"scaling": {"rope_type": "dynamic", "factor": 2.0}}, "needs the training length"),
        ({"scaling": {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
                      "original_max_position_embeddings": 16}}, "needs 'max_position_embeddings'"),
        ({"scaling": {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3,
                      "original_max_position_embeddings": 16, "factor": 2.0}}, "must have rotary_dim / 2 = 4"),
        ({"scaling": {"type": "linear", "rope_type": "dynamic", "factor": 2.0}}, "give one"),
        ({"scaling": {"rope_type": "linear", "factor": -1.0}}, "must be > 0"),
        ({"scaling": {"rope_type": "linear", "factor": "2"}}, "finite number"),
        ({"scaling": {"rope_type": "p", "p": 1.5}}, "in \\[0, 1\\]"),
        ({"scaling": {"rope_type": "ntk", "factor": 2.0}, "rotary_dim": 2}, "rotary_dim > 2"),
        ({"scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}, "base": 100.0}, "disagrees"),
        ({"scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "rotary_dim": 8},
         "disagrees"),
        ({"scaling": [("rope_type", "linear")]}, "must be a dict"),
    ],
)
def test_bad_scaling(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Rotary(32, 4, **kwargs)


def test_rope_theta_and_partial_rotary_factor_set_base_and_rotary_dim():
    m = Rotary(32, 2, scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0, "partial_rotary_factor": 0.5})
    assert (m.base, m.rotary_dim) == (500.0, 8)
    assert Rotary(32, 2, base=500.0, rotary_dim=8, scaling={"rope_type": "default", "rope_theta": 500.0,
                                                            "partial_rotary_factor": 0.5}).base == 500.0


@pytest.mark.parametrize("length,match", [(0, "positive int"), (torch.tensor([3, 4, 5]), "shape"),
                                           (torch.tensor(3.0), "integer tensor")])
def test_bad_length(length, match):
    m = Rotary(32, 4, scaling=LENGTH_DEPENDENT["dynamic"])
    with pytest.raises(ValueError, match=match):
        m(torch.randn(2, 3, 32), length=length)
