"""Rotary (the module) against the float64 reference, its invariants, its errors, state_dict and meta device."""

import copy
import subprocess
import sys

import pytest
import torch
from conftest import ulp

from rotary import Rotary, rotary, rotary_reference

MIXINGS = [None, "givens", "orthogonal", "quaternion"]


def _randomise(m: Rotary, std: float = 1.0) -> Rotary:
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=std)
    return m


def _reference(m: Rotary, x4: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return rotary_reference(
        x4,
        positions,
        rotary_dim=m.rotary_dim,
        interleaved=m.interleaved,
        mixing=m.mixing_matrix(torch.float64),
        freqs=m.frequencies().detach(),
        base=m.base,
    )


def _module(mixing, interleaved=True, head_dim=8, heads=3, rotary_dim=None, learned_freq=False):
    if mixing == "quaternion" and head_dim % 3:
        head_dim = 6
    m = Rotary(head_dim * heads, heads, mixing=mixing, interleaved=interleaved, rotary_dim=rotary_dim,
               learned_freq=learned_freq)
    return _randomise(m, 0.1 if learned_freq else 1.0)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("head_dim,rotary_dim", [(8, None), (12, 6), (7, None), (3, 2)])
@pytest.mark.parametrize("where", ["int", "tensor", "positions1d", "positions2d", "float_positions"])
def test_matches_reference(mixing, interleaved, head_dim, rotary_dim, where):
    m = _module(mixing, interleaved, head_dim, rotary_dim=rotary_dim)
    B, T = 2, 5
    x = torch.randn(B, T, m.dims, requires_grad=True)
    if where == "int":
        kwargs, pos = {"offset": 9}, torch.arange(9, 9 + T)
    elif where == "tensor":
        off = torch.tensor([3, 70])
        kwargs, pos = {"offset": off}, off[:, None] + torch.arange(T)
    elif where == "positions1d":
        pos = torch.tensor([4, 0, 11, 2, 2])
        kwargs = {"positions": pos, "offset": 1000}  # positions override offset
    elif where == "positions2d":
        pos = torch.randint(0, 5000, (B, T))
        kwargs = {"positions": pos}
    else:
        pos = torch.rand(B, T) * 50
        kwargs = {"positions": pos}
    y = m(x, **kwargs)
    assert y.shape == x.shape
    x4 = x.detach().view(B, T, m.heads, m.head_dim)
    ref = _reference(m, x4, pos).view(B, T, -1)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    xd = x4.double().requires_grad_()
    (gref,) = torch.autograd.grad(_reference(m, xd, pos), xd, g.double().view_as(xd))
    torch.testing.assert_close(gx.double(), gref.view_as(gx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_four_dim_input_comes_back_four_dim(mixing):
    m = _module(mixing)
    x = torch.randn(2, 5, m.heads, m.head_dim)  # (B, T, H, D)
    y = m(x, layout="BTHD")
    assert y.shape == x.shape
    torch.testing.assert_close(y.flatten(-2), m(x.flatten(-2)), atol=0, rtol=0)
    # the default layout is (B, H, T, D), as in rotate_qk
    torch.testing.assert_close(m(x.transpose(1, 2).contiguous()), y.transpose(1, 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("interleaved", [True, False])
def test_fresh_module_is_plain_rope_and_alias(mixing, interleaved):
    x = torch.randn(2, 6, 24)
    fresh = Rotary(24, 4 if mixing == "quaternion" else 3, mixing=mixing, interleaved=interleaved)
    plain = Rotary(24, fresh.heads, mixing=None, interleaved=interleaved)
    torch.testing.assert_close(fresh(x, offset=5), plain(x, offset=5), atol=1e-6, rtol=0)
    assert rotary is Rotary
    assert rotary(dims=24, heads=3).options.mixing == "givens"
    assert rotary(dims=9, heads=3).options.mixing == "quaternion"  # 3-dimensional heads


@pytest.mark.parametrize("mixing", MIXINGS)
def test_norm_preserved(mixing):
    m = _module(mixing, head_dim=12, rotary_dim=8)
    x = torch.randn(3, 40, m.heads, m.head_dim)
    y = m(x, offset=123, layout="BTHD")
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("interleaved", [True, False])
def test_scores_depend_only_on_relative_position(mixing, interleaved):
    m = _module(mixing, interleaved).double()
    q = torch.randn(1, 1, m.heads, m.head_dim, dtype=torch.float64)
    k = torch.randn(1, 1, m.heads, m.head_dim, dtype=torch.float64)
    scores = []
    for shift in (0, 17, 1000):
        qr = m(q, offset=3 + shift, layout="BTHD")
        kr = m(k, offset=10 + shift, layout="BTHD")
        scores.append((qr * kr).sum(-1))
    torch.testing.assert_close(scores[1], scores[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(scores[2], scores[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_incremental_equals_full_and_positions_equal_offset(mixing):
    m = _module(mixing)
    x = torch.randn(2, 9, m.dims)
    full = m(x)
    steps = torch.cat([m(x[:, t : t + 1], offset=t) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-6, rtol=0)
    chunks = torch.cat([m(x[:, :4]), m(x[:, 4:], offset=torch.tensor([4, 4]))], dim=1)
    torch.testing.assert_close(chunks, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(m(x, positions=torch.arange(9)), full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_rotate_qk_with_cached_keys(mixing):
    m = _module(mixing)
    B, H, D = 2, m.heads, m.head_dim
    q = torch.randn(B, H, 7, D)
    k = torch.randn(B, H, 7, D)
    q_full, k_full = m.rotate_qk(q, k, offset=2)
    # forward and rotate_qk take the same layout and the same offset: the first token's position
    torch.testing.assert_close(k_full, m(k, offset=2), atol=1e-6, rtol=0)
    torch.testing.assert_close(q_full, m(q, offset=2), atol=1e-6, rtol=0)
    # decoding: 2 new queries at positions 7 and 8, 7 keys in the cache (positions 2 .. 8)
    q_last, k_all = m.rotate_qk(q[:, :, -2:], k, offset=7)
    torch.testing.assert_close(q_last, q_full[:, :, -2:], atol=1e-6, rtol=0)
    torch.testing.assert_close(k_all, k_full, atol=1e-6, rtol=0)
    torch.testing.assert_close(q_last, m(q[:, :, -2:], offset=7), atol=1e-6, rtol=0)
    # a (B,) tensor offset means the same
    q_t, k_t = m.rotate_qk(q[:, :, -2:], k, offset=torch.tensor([7, 7]))
    torch.testing.assert_close(q_t, q_last, atol=1e-6, rtol=0)
    torch.testing.assert_close(k_t, k_all, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least q's length"):
        m.rotate_qk(q, k[:, :, :3])
    with pytest.raises(ValueError, match="must be at least 5"):  # the keys would start at -1
        m.rotate_qk(q[:, :, -2:], k, offset=4)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("learned_freq", [False, True])
def test_gradcheck_float64(mixing, learned_freq):
    m = _module(mixing, head_dim=6, heads=2, learned_freq=learned_freq).double()
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(2, 3, m.dims, dtype=torch.float64, requires_grad=True)
    offset = torch.tensor([5, 40])

    def f(x, *params):
        return torch.func.functional_call(m, dict(zip(names, params)), (x,), {"offset": offset})

    params = tuple(p.detach().requires_grad_() for p in m.parameters())
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("learned_freq", [False, True])
def test_several_optimizer_steps(mixing, learned_freq):
    m = _module(mixing, learned_freq=learned_freq)
    proj = torch.nn.Linear(m.dims, m.dims)  # as in attention: the rotary sits after a projection
    opt = torch.optim.SGD([*proj.parameters(), *m.parameters()], lr=0.1)
    x = torch.randn(2, 6, m.dims)
    target = torch.randn(2, 6, m.dims)
    before = [p.detach().clone() for p in m.parameters()]
    losses = []
    for _ in range(4):  # the original module raised on the second backward
        opt.zero_grad()
        loss = (m(proj(x)) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for p, b in zip(m.parameters(), before):
        assert not torch.equal(p, b)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_state_dict_round_trip_is_bit_identical(mixing):
    torch.manual_seed(0)
    a = _module(mixing, learned_freq=True)
    torch.manual_seed(12345)  # a different global RNG state must not matter
    b = Rotary(a.dims, a.heads, mixing=mixing, learned_freq=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, a.dims)
    assert torch.equal(a(x, offset=3), b(x, offset=3))
    assert not any("cached" in k for k in a.state_dict())  # tables are derived, not stored


@pytest.mark.parametrize("mixing", MIXINGS)
def test_meta_device_construction(mixing):
    with torch.device("meta"):
        m = _module(mixing)
    assert all(t.is_meta for t in m.state_dict().values())
    m.to_empty(device="cpu")
    m.reset_parameters()
    ref = Rotary(m.dims, m.heads, mixing=mixing)
    x = torch.randn(2, 5, m.dims)
    assert torch.equal(m(x, offset=7), ref(x, offset=7))


def test_dtype_casts_leave_angles_in_float32_and_bf16_is_exact_at_large_positions():
    m = Rotary(64, 2, mixing=None).to(torch.bfloat16)
    assert m.angles.cos_table.dtype == torch.float32
    x = torch.randn(1, 16, 2, 32).to(torch.bfloat16)
    y = m(x, offset=100_000, layout="BTHD")
    ref = rotary_reference(x, torch.arange(100_000, 100_016))
    err = (y.double() - ref).abs()
    assert bool((err <= ulp(ref, torch.bfloat16)).all())


@pytest.mark.parametrize("mixing", ["givens", "orthogonal"])
def test_bf16_with_mixing_rounds_once(mixing):
    m = _randomise(Rotary(64, 2, mixing=mixing), 0.5).to(torch.bfloat16)
    x = torch.randn(2, 8, 2, 32).to(torch.bfloat16)
    pos = torch.arange(5000, 5008)
    y = m(x, offset=5000, layout="BTHD")
    assert y.dtype == torch.bfloat16
    # the cast rounded the mixing parameters to bf16: the float64 reference uses those same rounded values (P is
    # built from them in float64), so what remains is the output's single rounding
    ref = _reference(copy.deepcopy(m), x, pos)
    assert bool(((y.double() - ref).abs() <= ulp(ref, torch.bfloat16) + 1e-6).all())


def test_table_grows_in_eager_mode():
    m = Rotary(16, 2, mixing=None)
    start = m.angles.cos_table.shape[0]
    x = torch.randn(1, 3, 16)
    y = m(x, offset=start + 10)
    assert m.angles.cos_table.shape[0] >= start + 13
    ref = rotary_reference(x.view(1, 3, 2, 8), torch.arange(start + 10, start + 13)).view(1, 3, 16)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dims": 10, "heads": 3}, "divisible by heads"),
        ({"dims": 0, "heads": 1}, "positive int"),
        ({"dims": 16, "heads": 2, "rotary_dim": 10}, "rotary_dim"),
        ({"dims": 16, "heads": 2, "rotary_dim": 3}, "rotary_dim"),
        ({"dims": 16, "heads": 2, "rotary_dim": 0}, "rotary_dim"),
        ({"dims": 16, "heads": 2, "mixing": "householder"}, "mixing must be one of"),
        ({"dims": 16, "heads": 2, "mixing": "quaternion"}, "divisible by 3"),
        ({"dims": 16, "heads": 2, "base": 1.0}, "base"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Rotary(**kwargs)


@pytest.mark.parametrize(
    "x,kwargs,match",
    [
        (torch.randn(2, 5), {}, "rank 3"),
        (torch.randn(1, 2, 5, 3, 8), {}, "rank 3"),
        (torch.randn(2, 5, 15), {}, "dims=16"),
        (torch.randn(2, 5, 4, 4), {}, "head_dim=8 and heads=2 or a divisor"),
        (torch.randn(2, 5, 4, 8), {}, "head_dim=8 and heads=2 or a divisor"),  # 4 heads do not divide 2
        (torch.randn(2, 5, 2, 8), {"layout": "THBD"}, "layout must be one of"),
        (torch.ones(2, 5, 16, dtype=torch.long), {}, "floating-point"),
        (torch.randn(2, 5, 16), {"offset": -1}, "non-negative"),
        (torch.randn(2, 5, 16), {"offset": 1.5}, "non-negative int"),
        (torch.randn(2, 5, 16), {"offset": torch.tensor([1, 2, 3])}, "shape \\(\\) or \\(2,\\)"),
        (torch.randn(2, 5, 16), {"offset": torch.tensor([1.0, 2.0])}, "integer tensor"),
        (torch.randn(2, 5, 16), {"positions": torch.arange(4)}, "positions must be a tensor of shape"),
        (torch.randn(2, 5, 16), {"positions": torch.zeros(3, 5)}, "positions must be a tensor of shape"),
        (torch.randn(2, 5, 16), {"positions": [0, 1, 2, 3, 4]}, "positions must be a tensor"),
    ],
)
def test_bad_input(x, kwargs, match):
    m = Rotary(16, 2)
    with pytest.raises(ValueError, match=match):
        m(x, **kwargs)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("case", ["bf16", "non-contiguous-grad"])
def test_gradients_low_precision_and_strided_upstream(mixing, interleaved, case):
    """The backward's aliasing paths: a bf16 gradient (upcast copy, rotated in place) and a strided one."""
    m = _module(mixing, interleaved)
    B, T = 2, 5
    pos = torch.arange(7, 7 + T)
    if case == "bf16":
        x = torch.randn(B, T, m.heads, m.head_dim).to(torch.bfloat16).requires_grad_()
        g = torch.randn(B, T, m.heads, m.head_dim).to(torch.bfloat16)
    else:
        x = torch.randn(B, T, m.heads, m.head_dim, requires_grad=True)
        g = torch.randn(T, B, m.heads, m.head_dim).transpose(0, 1)  # not contiguous
    (gx,) = torch.autograd.grad(m(x, offset=7, layout="BTHD"), x, g)
    xd = x.detach().double().requires_grad_()
    (gref,) = torch.autograd.grad(_reference(m, xd, pos), xd, g.double())
    if case == "bf16":
        assert bool(((gx.double() - gref).abs() <= ulp(gref, torch.bfloat16) + 1e-6).all())
    else:
        torch.testing.assert_close(gx.double(), gref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("layout", ["BTHD", "BHTD"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("storage", ["contiguous", "transposed-view"])
def test_grouped_query_keys_and_layouts_match_reference(mixing, layout, kv_heads, storage):
    """Keys with fewer heads than queries, both layouts, contiguous or transposed views: all equal the float64
    reference, and the transposed view is rotated without a copy of the input (its output keeps its layout)."""
    m = _module(mixing, interleaved=False, head_dim=8 if mixing != "quaternion" else 6, heads=4)
    B, Tq, Tk, D = 2, 3, 7, m.head_dim

    def make(h, T):  # (B, T, h, D) values, presented in `layout` and `storage`
        t = torch.randn(B, T, h, D)
        if layout == "BTHD":
            return t if storage == "contiguous" else t.transpose(1, 2).contiguous().transpose(1, 2), t
        return (t.transpose(1, 2).contiguous() if storage == "contiguous" else t.transpose(1, 2)), t

    q, q_bthd = make(m.heads, Tq)
    k, k_bthd = make(kv_heads, Tk)
    offset = torch.tensor([5, 40])  # of the first key: the first query sits Tk - Tq later
    qr, kr = m.rotate_qk(q, k, offset=offset + (Tk - Tq), layout=layout)
    pos = offset[:, None] + torch.arange(Tk)
    to_bthd = (lambda t: t) if layout == "BTHD" else (lambda t: t.transpose(1, 2))
    torch.testing.assert_close(to_bthd(kr).double(), _reference(m, k_bthd, pos), atol=1e-5, rtol=0)
    torch.testing.assert_close(to_bthd(qr).double(), _reference(m, q_bthd, pos[:, Tk - Tq :]), atol=1e-5, rtol=0)
    assert qr.shape == q.shape and kr.shape == k.shape
    if storage == "transposed-view" and layout == "BHTD" and kv_heads > 1:
        assert kr.stride() == k.stride()  # rotated in its own (B, T, H, D) buffer order, as given
    y = m(k, offset=offset, layout=layout)  # forward takes the same inputs
    torch.testing.assert_close(y, kr, atol=0, rtol=0)


def test_grouped_query_errors():
    m = Rotary(32, 4, mixing=None)
    with pytest.raises(ValueError, match="dividing q's"):
        m.rotate_qk(torch.randn(1, 2, 5, 8), torch.randn(1, 4, 5, 8))  # more key heads than query heads
    with pytest.raises(ValueError, match="divisor"):
        m.rotate_qk(torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8))  # 3 key heads do not divide 4
    with pytest.raises(ValueError, match="divisor"):
        m.rotate_qk(torch.randn(1, 8, 5, 8), torch.randn(1, 4, 5, 8))  # more query heads than the module has


@pytest.mark.parametrize("where", ["tensor-offset", "int-positions"])
def test_tensor_offsets_index_the_table_and_compute_only_rows_past_it(where):
    """Gathered rows are the table's rows bit for bit; rows past the largest table (and negative positions)
    are computed directly, and both agree with the float64 reference."""
    m = Rotary(32, 2, mixing=None)
    x = torch.randn(3, 4, 32)
    if where == "tensor-offset":
        offset = torch.tensor([0, 17, 2000])
        y = m(x, offset=offset)
        expect = torch.stack([m(x[i : i + 1], offset=int(o))[0] for i, o in enumerate(offset)])
        assert torch.equal(y, expect)  # the same table rows as an int offset
    far = torch.tensor([[3, -2, 1 << 20, 7]] * 3)  # negative, inside, past the largest table
    rows = m.angles.cos_table.shape[0]
    y = m(x, positions=far)
    assert m.angles.cos_table.shape[0] == rows  # 1 << 20 is past _MAX_TABLE: no growth to a giant table
    ref = rotary_reference(x.view(3, 4, 2, 16), far).view(3, 4, 32)
    torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=0)


def test_import_rotary_loads_the_core_only():
    """`import rotary` loads no integration, experiment or benchmark module (nor their third-party packages)."""
    code = (
        "import sys, torch; before = set(sys.modules); import rotary; new = set(sys.modules) - before; "
        "bad = sorted(m for m in new - {'rotary'} if not m.startswith('rotary.') or m.split('.')[1] in "
        "('integrations', 'lab', 'decoder', 'whisper', 'hf')); print(bad); assert not bad"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_integrations_answer_to_their_short_names():
    """``import rotary.hf``, ``rotary.hf`` and ``rotary.integrations.hf`` are one module (so one set of classes)."""
    code = (
        "import sys, rotary; assert 'rotary.integrations' not in sys.modules; "
        "import rotary.decoder, rotary.integrations.decoder as d; assert rotary.decoder is d; "
        "from rotary import hf; import rotary.integrations.hf as h; assert hf is h is sys.modules['rotary.hf']; "
        "assert rotary.whisper is sys.modules['rotary.integrations.whisper']; "
        "from rotary.hf import install; assert install is h.install"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("interleaved,rotary_dim", [(True, None), (False, None), (True, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["int", "tensor", "BHTD-view", "past-table"])
def test_inference_path_equals_training_path(mixing, interleaved, rotary_dim, dtype, where):
    """Under no_grad (the decode path: cached table rows, a complex multiply, frozen mixing) the output is the one
    the autograd path computes, bit for bit, and a mixing changed in place is picked up at once."""
    m = _module(mixing, interleaved, head_dim=8 if mixing != "quaternion" else 6, heads=4, rotary_dim=rotary_dim)
    x = torch.randn(3, 2, m.heads, m.head_dim).to(dtype)
    layout, offset = "BTHD", 5
    if where == "tensor":
        offset = torch.tensor([0, 7, 300])
    elif where == "BHTD-view":
        x, layout = x.transpose(1, 2), "BHTD"
    elif where == "past-table":
        offset = m.angles.cos_table.shape[0] - 1  # the general path grows the table for these rows

    def both():
        with torch.no_grad():
            fast = m(x, offset=offset, layout=layout)
        slow = m(x.detach().requires_grad_(), offset=offset, layout=layout)
        return fast, slow.detach()

    def same(a, b):  # bit for bit; a dense P is a matmul whose blocking may differ by an ulp between grad modes
        if mixing in ("orthogonal", "quaternion"):
            return bool(((a.double() - b.double()).abs() <= ulp(b.double(), dtype) + 1e-6).all())
        return torch.equal(a, b)

    fast, slow = both()
    assert same(fast, slow)
    if mixing is not None:
        with torch.no_grad():
            for p in m.mixer.parameters():
                p.add_(0.3)
        fast2, slow2 = both()
        assert same(fast2, slow2) and not torch.equal(fast2, fast)
    with torch.no_grad(), pytest.raises(ValueError):  # bad input still raises on the inference path
        m(x, offset=-1, layout=layout)
    last = x[:, -1:] if layout == "BTHD" else x[:, :, -1:]  # one new query against the whole key sequence
    with torch.inference_mode():
        q, k = m.rotate_qk(last, x, offset=offset, layout=layout)
    q_slow, k_slow = m.rotate_qk(last.detach().requires_grad_(), x.detach().requires_grad_(), offset=offset,
                                 layout=layout)
    assert same(q, q_slow.detach()) and same(k, k_slow.detach())


def test_old_state_dict_keys_load():
    """0.1 checkpoints named P ``mixing.*`` and kept ``log_freq_scale`` / ``directions.*`` on the module itself."""
    m = Rotary(24, 3, learned_freq=True)
    with torch.no_grad():
        m.mixer.angles.normal_()
        m.angles.log_freq_scale.normal_(std=0.1)
    old = {k.replace("mixer.", "mixing.").replace("angles.log_freq_scale", "log_freq_scale"): v
           for k, v in m.state_dict().items()}
    assert "mixing.angles" in old and "log_freq_scale" in old
    fresh = Rotary(24, 3, learned_freq=True)
    fresh.load_state_dict(old)  # strict: every key is placed
    x = torch.randn(2, 5, 24)
    assert torch.equal(fresh(x, offset=3), m(x, offset=3))
    nd = Rotary(24, 2, axes=2, directions="mixed")
    with torch.no_grad():
        nd.angles.directions.weight.add_(0.3)
    fresh_nd = Rotary(24, 2, axes=2, directions="mixed")
    fresh_nd.load_state_dict({k.replace("angles.directions.", "directions."): v for k, v in nd.state_dict().items()})
    assert torch.equal(fresh_nd.angles.directions.weight, nd.angles.directions.weight)


@pytest.mark.parametrize("kwargs,match", [
    ({"learned_freq": 1}, "learned_freq must be True or False"),
    ({"interleaved": "yes"}, "interleaved must be True or False"),
    ({"base": "10000"}, "base must be a number"),
    ({"axes": True}, "axes must be 1, 2 or 3"),
])
def test_flags_and_numbers_are_typed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Rotary(16, 2, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {},
    {"mixing": None, "interleaved": False, "rotary_dim": 6},
    {"learned_freq": True, "scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    {"axes": 2, "directions": "sections", "sections": [1, 3]},
    {"dims": 9, "heads": 3},  # givens on 3-dimensional heads is built (and recorded) as the quaternion rotation
])
def test_options_round_trip_through_json(kwargs):
    import json

    from rotary.core.options import RotaryOptions

    m = Rotary(**{"dims": 16, "heads": 2, **kwargs})
    record = json.loads(json.dumps(m.options.to_dict()))  # what config.json holds
    rebuilt = Rotary.from_options(RotaryOptions.from_dict(record))
    assert rebuilt.options == m.options and repr(rebuilt) == repr(m)
    assert rebuilt.state_dict().keys() == m.state_dict().keys()
    assert m.options.mixing == (None if kwargs.get("mixing", "givens") is None else
                                "quaternion" if kwargs.get("dims") == 9 else "givens")
    with pytest.raises(ValueError, match="unknown rotary options \\['typo'\\]"):
        RotaryOptions.from_dict({**record, "typo": 1})
