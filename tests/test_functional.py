"""apply_rotary (the fast path) against the float64 reference and against rotary-embedding-torch."""

import pytest
import torch
from conftest import ulp

from rotary import apply_rotary, apply_rotary_reference
from rotary.core.frequencies import inverse_frequencies, rotary_angles


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
        ((2, 3, 4), (3, 2), "shape \\(batch, seq, heads, head_dim\\)"),
        ((2, 3, 4, 8), (4, 2), "cos/sin must have shape"),
        ((2, 3, 4, 8), (5, 3, 2), "cos/sin must have shape"),
        ((2, 3, 4, 8), (3, 5), "last dim r/2 must be in"),
    ],
)
def test_bad_shapes(x_shape, cos_shape, match):
    with pytest.raises(ValueError, match=match):
        apply_rotary(torch.randn(x_shape), torch.randn(cos_shape), torch.randn(cos_shape))


def test_integer_input_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        apply_rotary(torch.ones(1, 2, 1, 4, dtype=torch.long), torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="same shape"):
        apply_rotary(torch.ones(1, 2, 1, 4), torch.ones(2, 2), torch.ones(2, 1))
