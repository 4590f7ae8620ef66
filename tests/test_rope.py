"""The public kernel function ``rotary.rope`` (and ``rotary.apply_rotary``, it in flash-attn's layout) on the torch
kernel, against the float64 reference and rotary-embedding-torch; :func:`rotary.core.kernels.choose`'s table.
(The same calls on the Triton kernel: tests/test_triton.py.)"""

import pytest
import torch
from conftest import ulp

import rotary
from rotary import apply_rotary, apply_rotary_reference
from rotary.core.frequencies import inverse_frequencies, rotary_angles
from rotary.core.kernels import choose


def _cos_sin(T, half, batch=None, offset=0):
    pos = torch.arange(offset, offset + T, dtype=torch.float64)
    if batch is not None:
        pos = pos + torch.arange(batch, dtype=torch.float64)[:, None] * 7
    ang = rotary_angles(pos, inverse_frequencies(2 * half, 10000.0))
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("D,r", [(16, 16), (18, 10), (7, 6), (9, 2)])
@pytest.mark.parametrize("batched_cos", [False, True])
def test_matches_reference_outputs_and_grads(interleaved, D, r, batched_cos):
    B, T, H = 3, 5, 2
    x = torch.randn(B, T, H, D, requires_grad=True)
    cos, sin = _cos_sin(T, r // 2, batch=B if batched_cos else None, offset=11)
    y = apply_rotary(x, cos, sin, interleaved=interleaved)
    ref = apply_rotary_reference(x.detach(), cos, sin, interleaved=interleaved)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, atol=2e-6, rtol=0)
    # the same upstream gradient through both: the reference is differentiable (einsum on float64)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    xd = x.detach().double().requires_grad_()
    (gref,) = torch.autograd.grad(apply_rotary_reference(xd, cos, sin, interleaved=interleaved), xd, g.double())
    torch.testing.assert_close(gx.double(), gref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("interleaved", [True, False])
def test_pass_through_channels_bit_exact_and_input_untouched(interleaved):
    x = torch.randn(2, 4, 3, 12)
    x[..., 8:] = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.0e38])  # survive only if untouched
    before = x.clone()
    cos, sin = _cos_sin(4, 4)
    y = apply_rotary(x, cos, sin, interleaved=interleaved)
    assert torch.equal(y[..., 8:].view(torch.int32), x[..., 8:].view(torch.int32))
    assert torch.equal(x.view(torch.int32), before.view(torch.int32))


@pytest.mark.parametrize("interleaved", [True, False])
def test_non_contiguous_input(interleaved):
    base = torch.randn(2, 3, 6, 8)  # (B, H, T, D) -> transposed view (B, T, H, D)
    x = base.transpose(1, 2)
    cos, sin = _cos_sin(6, 4)
    y = apply_rotary(x, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(y, apply_rotary(x.contiguous(), cos, sin, interleaved=interleaved), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [True, False])
def test_low_precision_is_rounded_once(dtype, interleaved):
    x = torch.randn(2, 64, 4, 32).to(dtype)
    cos, sin = _cos_sin(64, 16, offset=100_000)
    y = apply_rotary(x, cos, sin, interleaved=interleaved)
    assert y.dtype == dtype
    ref = apply_rotary_reference(x, cos, sin, interleaved=interleaved)
    # rounding the exact result once gives at most half an ulp; allow one ulp, nothing more
    err = (y.double() - ref).abs()
    assert bool((err <= ulp(ref, dtype)).all()), float((err / ulp(ref, dtype)).max())


def test_matches_rotary_embedding_torch():
    ret = pytest.importorskip("rotary_embedding_torch")
    D = 32
    emb = ret.RotaryEmbedding(dim=D)
    q = torch.randn(2, 3, 10, D)  # its layout: (B, H, T, D)
    expected = emb.rotate_queries_or_keys(q)
    cos, sin = _cos_sin(10, D // 2)
    ours = apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "x_shape,cos_shape,match",
    [
        ((2, 3, 4), (3, 2), "must be a 4-D floating-point tensor in layout BTHD"),
        ((2, 3, 4, 8), (2, 2), "positions 0..2 lie past the cos/sin table \\(2 rows\\)"),
        ((2, 3, 4, 8), (5, 3, 2), "per-token cos/sin must have shape"),
        ((2, 3, 4, 8), (3, 5), "1 <= r/2 <= head_dim/2 = 4"),
    ],
)
def test_bad_shapes(x_shape, cos_shape, match):
    with pytest.raises(ValueError, match=match):
        apply_rotary(torch.randn(x_shape), torch.randn(cos_shape), torch.randn(cos_shape))


def test_integer_input_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        apply_rotary(torch.ones(1, 2, 1, 4, dtype=torch.long), torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="of one shape"):
        apply_rotary(torch.ones(1, 2, 1, 4), torch.ones(2, 2), torch.ones(2, 1))


@pytest.mark.parametrize("where", ["offset", "offsets", "positions"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_reads_table_rows_for_q_and_k(where, interleaved):
    """rope's default layout (B, H, T, D), a table read at the keys' rows, queries the last Tq of them, grouped-query
    keys: against the reference fed the rows by hand."""
    B, Hq, Hk, Tq, Tk, D = 2, 4, 2, 3, 5, 8
    table = torch.rand(40, D // 2, dtype=torch.float64) * 50
    cos, sin = table.cos().float(), table.sin().float()
    q, k = torch.randn(B, Hq, Tq, D), torch.randn(B, Hk, Tk, D)
    if where == "offset":  # the first query's position: keys at 5..9
        kw, rows = {"offset": 7}, torch.arange(5, 10).expand(B, Tk)
    elif where == "offsets":
        kw, rows = {"offset": torch.tensor([7, 30])}, torch.tensor([[5], [28]]) + torch.arange(Tk)
    else:  # the keys' positions, any order
        rows = torch.randint(0, 40, (B, Tk), generator=torch.Generator().manual_seed(0))
        kw = {"positions": rows}
    yq, yk = rotary.rope(q, cos, sin, k=k, interleaved=interleaved, **kw)
    for y, x, r in ((yq, q, rows[:, Tk - Tq:]), (yk, k, rows)):
        ref = apply_rotary_reference(x.transpose(1, 2), cos[r], sin[r], interleaved=interleaved).transpose(1, 2)
        torch.testing.assert_close(y.double(), ref, atol=2e-6, rtol=0)


def test_rope_refuses_rows_outside_the_table():
    x, cos = torch.randn(1, 2, 3, 8), torch.ones(10, 4)
    with pytest.raises(ValueError, match=r"positions 8\.\.10 lie past the cos/sin table \(10 rows\)"):
        rotary.rope(x, cos, cos, offset=8)
    with pytest.raises(ValueError, match=r"positions 0\.\.10 lie outside the cos/sin table \(10 rows\)"):
        rotary.rope(x, cos, cos, positions=torch.tensor([0, 10, 3]))
    with pytest.raises(ValueError, match=r"positions 8\.\.10 lie outside"):
        rotary.rope(x, cos, cos, offset=torch.tensor([8]))
    with pytest.raises(ValueError, match="leaves 2 earlier keys before position 0"):
        rotary.rope(x, cos, cos, k=torch.randn(1, 2, 5, 8), offset=1)


def test_choose_decision_table(monkeypatch):
    """The rows of choose's table that a CPU without Triton reaches (the Triton rows: tests/test_triton.py)."""
    x = torch.randn(2, 3)
    monkeypatch.delenv("ROTARY_KERNEL", raising=False)
    assert choose(x) == "torch" and choose(x, table_rows=True) == "torch"  # autograd on: never the no-grad kernel
    with torch.no_grad():
        assert choose(x) == "torch" and choose(x, table_rows=True) == "no-grad"
    for mode in ("torch", "auto"):
        monkeypatch.setenv("ROTARY_KERNEL", mode)
        with torch.inference_mode():
            assert choose(x, table_rows=True) == "no-grad" and choose(x.double(), table_rows=True) == "no-grad"
        assert choose(x, table_rows=True) == "torch"
    monkeypatch.setenv("ROTARY_KERNEL", "gpu")
    with pytest.raises(ValueError, match="ROTARY_KERNEL must be one of"):
        choose(x)
