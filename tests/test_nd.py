"""N-D positions: every direction kind against the float64 reference (outputs and gradients), scores that depend
only on 2-D/3-D shifts, n = 1 unchanged, fp32+ angles under casts, compile without recompiles, clear errors, and
M-RoPE equal to transformers' Qwen2-VL."""

import pytest
import torch

from rotary import Rotary
from rotary.core.directions import oblique_units
from rotary.core.reference import direction_vectors_reference, rotary_nd_reference

KINDS = ["axial", "sections", "oblique", "mixed"]


def _make(kind, axes, *, dims=60, heads=3, rotary_dim=None, **kw):
    head_dim = dims // heads
    pairs = (rotary_dim or head_dim) // 2
    sections = None
    if kind == "sections":
        sections = [pairs // axes] * axes
        sections[0] += pairs - sum(sections)
    m = Rotary(dims, heads, axes=axes, directions=kind, sections=sections, rotary_dim=rotary_dim, **kw)
    if m.mixer is not None:
        with torch.no_grad():
            for p in m.mixer.parameters():
                p.normal_()
    return m


def _vectors(m):
    """The reference's own vectors for fixed kinds; the module's parameter for mixed."""
    if m.options.directions == "mixed":
        return m.angles.directions.weight
    return direction_vectors_reference(m.options.directions, m.axes, m.rotary_dim, base=m.base,
                                       sections=m.angles.directions.counts)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axes", [2, 3])
@pytest.mark.parametrize("mixing", [None, "givens", "orthogonal"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_matches_reference_outputs_and_gradients(kind, axes, mixing, interleaved):
    m = _make(kind, axes, mixing=mixing, interleaved=interleaved, rotary_dim=14)  # 14 of 20 channels rotated
    B, T, H, D = 2, 7, 3, 20
    x = torch.randn(B, T, H, D, requires_grad=True)
    cases = (torch.randint(-5, 50, (T, axes)), torch.rand(B, T, axes) * 90, torch.randint(0, 3000, (B, T, axes)))
    for positions in cases:
        y = m(x, positions=positions, layout="BTHD")
        P = m.mixing_matrix(torch.float64)
        ref = rotary_nd_reference(x, positions, _vectors(m), interleaved=interleaved, mixing=P)
        torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=0)
        g = torch.randn_like(y)
        wanted = [x] + ([m.angles.directions.weight] if kind == "mixed" else [])
        got = torch.autograd.grad(y, wanted, g)
        want = torch.autograd.grad(ref, wanted, g.double())
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b.double(), atol=2e-5 * max(1.0, float(b.abs().max())), rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_layouts_and_rotate_qk(kind):
    m = _make(kind, 2, dims=48, heads=4)
    q, k = torch.randn(2, 3, 4, 12), torch.randn(2, 9, 4, 12)
    pos = torch.randint(0, 20, (2, 9, 2))
    full = m(k, positions=pos, layout="BTHD")
    q_rot, k_rot = m.rotate_qk(q, k, positions=pos, layout="BTHD")
    torch.testing.assert_close(k_rot, full)
    torch.testing.assert_close(q_rot, m(q, positions=pos[:, -3:], layout="BTHD"))
    qh, kh = m.rotate_qk(q.transpose(1, 2), k.transpose(1, 2), positions=pos)  # (B, H, T, D)
    torch.testing.assert_close(kh.transpose(1, 2), full)
    torch.testing.assert_close(qh.transpose(1, 2), q_rot)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) view of a (B, H, T, D) buffer
    torch.testing.assert_close(m(kt, positions=pos, layout="BTHD"), full)
    torch.testing.assert_close(m(k.flatten(2), positions=pos), full.flatten(2))  # (B, T, dims)
    params = [p for p in m.parameters() if p.requires_grad]
    if params:  # the same parameter gradients from either layout and from a transposed view
        g = torch.randn_like(full)
        want = torch.autograd.grad(m(k, positions=pos, layout="BTHD"), params, g)
        for y in (m(k.transpose(1, 2), positions=pos, layout="BHTD").transpose(1, 2),
                  m(kt, positions=pos, layout="BTHD")):
            for a, b in zip(torch.autograd.grad(y, params, g), want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axes", [2, 3])
def test_scores_depend_only_on_position_difference(kind, axes):
    m = _make(kind, axes, dims=48, heads=4, mixing="orthogonal")
    q, k = torch.randn(1, 6, 4, 12, dtype=torch.float64), torch.randn(1, 6, 4, 12, dtype=torch.float64)
    pos = torch.randint(0, 16, (6, axes))
    for shift in (torch.tensor([7, -3, 11][:axes]), torch.tensor([1000, 250, -40][:axes])):
        s0 = torch.einsum("bthd,bshd->bhts", m(q, positions=pos, layout="BTHD"), m(k, positions=pos, layout="BTHD"))
        s1 = torch.einsum("bthd,bshd->bhts", m(q, positions=pos + shift, layout="BTHD"),
                          m(k, positions=pos + shift, layout="BTHD"))
        torch.testing.assert_close(s0, s1, atol=1e-9, rtol=0)


def test_scores_see_relations_axial_cannot():
    """Axial scores are a sum over axes of per-axis terms; oblique ones are not (a diagonal step is not a row
    step plus a column step once the pairs mix the axes): the point of N-D directions."""
    def score(m, d):
        q = torch.ones(1, 1, 1, 16, dtype=torch.float64)
        k = m(q, positions=torch.tensor([d]))
        return float((m(q, positions=torch.tensor([[0, 0]])) * k).sum())

    for kind, separable in (("axial", True), ("oblique", False)):
        m = Rotary(16, 1, axes=2, directions=kind, mixing=None, base=10.0)
        extra = score(m, [3, 5]) - score(m, [3, 0]) - score(m, [0, 5]) + score(m, [0, 0])
        assert (abs(extra) < 1e-12) == separable


def test_one_axis_is_standard_rope():
    x = torch.randn(2, 9, 48)
    pos = torch.randint(0, 5000, (2, 9))
    plain = Rotary(48, 4)
    want = plain(x, positions=pos)
    torch.testing.assert_close(plain(x, positions=pos.unsqueeze(-1)), want, atol=0, rtol=0)  # (B, T, 1)
    torch.testing.assert_close(plain(x, positions=pos[0].unsqueeze(-1)), plain(x, positions=pos[0]), atol=0, rtol=0)
    for kind, sections in (("oblique", None), ("sections", [6]), ("axial", None)):
        m = Rotary(48, 4, directions=kind, sections=sections)
        m.load_state_dict(plain.state_dict())
        assert m.angles.directions is None  # the 1-D path itself
        torch.testing.assert_close(m(x, positions=pos), want, atol=0, rtol=0)
        torch.testing.assert_close(m(x, offset=3), plain(x, offset=3), atol=0, rtol=0)
    assert "axes" not in repr(plain)
    mixed = Rotary(48, 4, directions="mixed", mixing=None)  # one axis, learned per-head frequencies
    torch.testing.assert_close(mixed.frequencies()[:, :, 0], torch.stack([plain.frequencies()] * 4), atol=1e-7, rtol=0)


@pytest.mark.parametrize("kind", ["axial", "sections"])
def test_table_gather_equals_direct(kind):
    m = _make(kind, 3, dims=48, heads=2, mixing=None)
    pos = torch.randint(0, 3000, (2, 11, 3))  # past the initial table: it grows
    cos, sin = m.cos_sin(pos)
    angles = m.angles.directions.angles(pos)
    torch.testing.assert_close(cos, angles.cos().float(), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin, angles.sin().float(), atol=1e-7, rtol=0)
    c_neg, _ = m.cos_sin(pos - 10)  # negative positions: computed directly
    torch.testing.assert_close(c_neg, m.angles.directions.angles(pos - 10).cos().float(), atol=1e-7, rtol=0)


def test_offset_puts_every_axis_at_the_same_position():
    m = _make("sections", 3, mixing=None, dims=48, heads=2)
    x = torch.randn(2, 5, 48)
    pos = (torch.arange(5) + 4).unsqueeze(-1).expand(5, 3)
    torch.testing.assert_close(m(x, offset=4), m(x, positions=pos))
    torch.testing.assert_close(m(x, offset=torch.tensor([4, 7])), m(x, positions=torch.stack([pos, pos + 3])))
    plain = Rotary(48, 2, mixing=None)  # M-RoPE on text tokens is 1-D RoPE
    torch.testing.assert_close(m(x, offset=4), plain(x, offset=4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_angles_whatever_the_module_dtype(kind):
    m = _make(kind, 2, dims=48, heads=4, mixing=None)
    before = m.frequencies().detach().clone()
    m.to(torch.bfloat16)
    after = m.frequencies()
    assert after.dtype == torch.float64
    if kind != "mixed":  # fixed directions are rebuilt exactly; a learned weight is a parameter the cast rounds
        torch.testing.assert_close(after, before, atol=0, rtol=0)
    x = torch.randn(2, 4, 4, 12, dtype=torch.bfloat16)
    pos = torch.tensor([[5000, 3001], [4097, 7], [1, 6000], [2500, 2500]])
    ref = rotary_nd_reference(x, pos, (after if kind == "mixed" else before).detach())
    with torch.no_grad():
        y = m(x, positions=pos, layout="BTHD")
    assert y.dtype == torch.bfloat16
    assert float((y.double() - ref).abs().max()) <= 2 ** -7 * float(ref.abs().max())  # one bf16 rounding
    m.float()
    torch.testing.assert_close(m.frequencies(), after.to(torch.float64), atol=0, rtol=0)


def test_mixed_gradcheck_and_state_dict():
    m = Rotary(24, 2, axes=2, directions="mixed", mixing="givens").double()
    x = torch.randn(1, 3, 2, 12, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[0.5, 1.0], [2.0, -1.5], [3.0, 4.0]], dtype=torch.float64)
    w = m.angles.directions.weight
    torch.autograd.gradcheck(lambda x_: m(x_, positions=pos, layout="BTHD"), (x,))
    y = m(x, positions=pos, layout="BTHD")
    (gw,) = torch.autograd.grad(y, [w], torch.ones_like(y))
    eps, num = 1e-6, torch.zeros_like(w)
    with torch.no_grad():
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in w.shape]).tolist():
            idx = tuple(idx)
            w[idx] += eps
            up = m(x, positions=pos, layout="BTHD").sum()
            w[idx] -= 2 * eps
            down = m(x, positions=pos, layout="BTHD").sum()
            w[idx] += eps
            num[idx] = (up - down) / (2 * eps)
    torch.testing.assert_close(gw, num, atol=1e-6, rtol=1e-6)
    state = m.state_dict()
    assert set(state) >= {"angles.directions.weight"} and not any("units" in k or "magnitudes" in k for k in state)
    fresh = Rotary(24, 2, axes=2, directions="mixed", mixing="givens").double()
    with torch.no_grad():
        w.add_(0.1)
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x, positions=pos, layout="BTHD"), m(x, positions=pos, layout="BTHD"),
                               atol=0, rtol=0)
    fresh.reset_parameters()
    initial = Rotary(24, 2, axes=2, directions="mixed").angles.directions.weight.double()
    torch.testing.assert_close(fresh.angles.directions.weight, initial)


def test_mixed_initialisation_spreads_directions():
    """Oblique magnitudes; unit directions of all heads distinct and spread over the half circle."""
    m = Rotary(64, 4, axes=2, directions="mixed")
    w = m.frequencies()  # (H, r/2, 2)
    oblique = Rotary(64, 4, axes=2, directions="oblique").frequencies()
    torch.testing.assert_close(w.norm(dim=-1), oblique.norm(dim=-1).expand_as(w[..., 0]), atol=1e-6, rtol=1e-6)
    angle = torch.atan2(w[..., 1], w[..., 0]).flatten()  # in [0, pi)
    counts = torch.histc(angle, bins=8, min=0, max=torch.pi)
    assert counts.min() >= 0.6 * angle.numel() / 8
    sphere = torch.tensor(oblique_units(40, 3), dtype=torch.float64)
    torch.testing.assert_close(sphere.norm(dim=-1), torch.ones(40, dtype=torch.float64))
    assert (sphere[:, 0] > 0).all()  # half sphere


@pytest.mark.parametrize("kind", ["axial", "oblique", "mixed"])
def test_compile_without_recompiles_while_decoding(kind, fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend

    m = _make(kind, 2, dims=32, heads=4)
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(m.rotate_qk, backend=counter, fullgraph=True)

    def step(Tk):
        q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 4, Tk, 8)
        pos = torch.randint(0, 64, (2, Tk, 2))
        got, want = f(q, k, positions=pos), m.rotate_qk(q, k, positions=pos)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    step(8), step(9), step(10)
    warm = counter.frame_count
    for Tk in range(11, 40):
        step(Tk)
    assert counter.frame_count == warm


def test_errors():
    m = Rotary(48, 4, axes=2)
    x = torch.randn(2, 5, 48)
    with pytest.raises(ValueError, match="3 axes given, the module has axes=2"):
        m(x, positions=torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(5, 2\) or \(2, 5, 2\)"):
        m(x, positions=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(5, 2\) or \(2, 5, 2\)"):
        m(x, positions=torch.zeros(2, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer or float"):
        m(x, positions=torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-negative int"):
        m(x, offset=1.5)
    with pytest.raises(ValueError, match="trailing axis dimension of 2"):
        m.cos_sin(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="length= is for"):
        m.cos_sin(torch.zeros(5, 2), length=5)
    with pytest.raises(ValueError, match="length= is for"):
        m(x, positions=torch.zeros(5, 2), length=5)
    with pytest.raises(ValueError, match="axes must be 1, 2 or 3"):
        Rotary(48, 4, axes=4)
    with pytest.raises(ValueError, match="directions must be one of"):
        Rotary(48, 4, axes=2, directions="diagonal")
    with pytest.raises(ValueError, match="sections must be 2 non-negative ints summing to"):
        Rotary(48, 4, axes=2, directions="sections", sections=[3, 2])
    with pytest.raises(ValueError, match="needs sections="):
        Rotary(48, 4, axes=2, directions="sections")
    with pytest.raises(ValueError, match="only for"):
        Rotary(48, 4, axes=2, sections=[3, 3])
    with pytest.raises(ValueError, match="scaling= is for 1-D"):
        Rotary(48, 4, axes=2, scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="drop learned_freq"):
        Rotary(48, 4, axes=2, directions="mixed", learned_freq=True)
    mixed = Rotary(48, 4, axes=2, directions="mixed")
    with pytest.raises(ValueError, match="needs all 4 heads"):
        mixed.rotate_qk(torch.randn(1, 4, 3, 12), torch.randn(1, 2, 3, 12), positions=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(5,\) or \(2, 5\)"):
        Rotary(48, 4)(x, positions=torch.zeros(5, 2, dtype=torch.long))  # 1-D module, 2-D positions


def test_learned_freq_scales_fixed_directions():
    m = Rotary(48, 4, axes=2, directions="oblique", learned_freq=True, mixing=None)
    with torch.no_grad():
        m.angles.log_freq_scale.normal_()
    x = torch.randn(2, 5, 4, 12, requires_grad=True)
    pos = torch.randint(0, 30, (5, 2))
    scale = torch.exp(m.angles.log_freq_scale.detach().double()).unsqueeze(-1)
    vec = direction_vectors_reference("oblique", 2, 12) * scale
    torch.testing.assert_close(m(x, positions=pos, layout="BTHD").double(), rotary_nd_reference(x, pos, vec),
                               atol=2e-5, rtol=0)
    m(x, positions=pos, layout="BTHD").sum().backward()
    assert m.angles.log_freq_scale.grad is not None and m.angles.log_freq_scale.grad.abs().sum() > 0


@pytest.mark.parametrize("batch_positions", [False, True])
def test_mrope_equals_transformers_qwen2_vl(batch_positions):
    tv = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    from transformers import Qwen2VLConfig

    heads, head_dim, section = 4, 32, [4, 6, 6]
    config = Qwen2VLConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=heads,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    config = getattr(config, "text_config", config)
    hf = tv.Qwen2VLRotaryEmbedding(config)
    ours = Rotary(heads * head_dim, heads, axes=3, directions="sections", sections=section, interleaved=False,
                  mixing=None)
    # a text prefix (all axes equal), a 3 x 4 image at t = 5, then text again from max + 1
    text = [[t, t, t] for t in range(5)]
    image = [[5, 5 + h, 5 + w] for h in range(3) for w in range(4)]
    after = [[t, t, t] for t in range(9, 12)]
    pos = torch.tensor(text + image + after)  # (T, 3)
    B, T = 2, pos.shape[0]
    pos_b = torch.stack([pos, pos + 2]) if batch_positions else pos.expand(B, T, 3)
    q = torch.randn(B, heads, T, head_dim, dtype=torch.float64)
    k = torch.randn(B, heads, T, head_dim, dtype=torch.float64)
    cos, sin = hf(q, pos_b.permute(2, 0, 1))  # position_ids (3, B, T)
    q_hf, k_hf = tv.apply_rotary_pos_emb(q, k, cos, sin)
    q_us, k_us = ours.rotate_qk(q, k, positions=pos_b if batch_positions else pos)
    # transformers forms the angles in float32 (positions up to 13 here): that is the difference
    torch.testing.assert_close(q_us, q_hf, atol=1e-5, rtol=0)
    torch.testing.assert_close(k_us, k_hf, atol=1e-5, rtol=0)


@pytest.mark.bench
@pytest.mark.parametrize("axes", [2, 3])
def test_speed_benchmark_runs_at_a_tiny_shape(axes):
    """`rotary bench nd`, as a smoke run: every contender timed, every kind's ratio to 1-D judged."""
    from rotary.lab.bench.suites import run_suite

    rows = list(run_suite("nd", quick=True, device="cpu", axes=(axes,)))
    assert {r.name for r in rows if r.unit == "ms"} == {"1-D"} | {f"{axes}-D {k}" for k in KINDS}
    assert [(r.name, r.ok is not None) for r in rows if r.unit == "x"] == [(f"{axes}-D {k} / 1-D", True) for k in KINDS]
