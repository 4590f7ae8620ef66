"""Edge inputs, each with its stated behaviour.

- Empty batch or sequence: an empty result of the right shape and dtype (forward, rotate_qk, apply_rotary,
  and their backward).
- NaN / inf: propagate within the head vector they sit in (P mixes a head's channels), never raise, and leave
  every other head vector's output bit-identical.
- bf16 / fp16 at positions up to 1e6: within one ulp of the float64 reference after rounding (angles are formed
  in float64 whatever the input dtype).
- Non-contiguous inputs (transposed, sliced, permuted strides, expanded) and tables: the same result as the
  contiguous copies, bit for bit.
- Tensors created under ``torch.inference_mode()``: usable inside it, and outside it wherever torch itself
  allows (no autograd through them: with parameters that require grad torch raises its own "Inference tensors
  cannot be saved for backward", as for any op); a module that ran under it still trains afterwards.
- Second derivatives (``create_graph=True``, e.g. gradient penalties): correct, checked with ``gradgradcheck``
  in float64, through the hand-written backward too.

"""

from __future__ import annotations

import pytest
import torch
from conftest import ulp

from rotary import Rotary, apply_rotary, apply_rotary_reference, rotary_reference

MIXINGS = [None, "givens", "orthogonal"]


def _module(mixing, heads=2, head_dim=8, **kw) -> Rotary:
    m = Rotary(heads * head_dim, heads, mixing=mixing, **kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _reference(m: Rotary, x4: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """float64 ``R P x`` with the module's frequencies and P (differentiable in its parameters)."""
    return rotary_reference(x4, positions, rotary_dim=m.rotary_dim, interleaved=m.interleaved,
                            mixing=m.mixing_matrix(torch.float64), freqs=m.frequencies())


# ------------------------------------------------------------------------------------------------ empty
EMPTY = [(0, 5, 2, 8), (3, 0, 2, 8), (0, 0, 2, 8)]


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("shape", EMPTY)
@pytest.mark.parametrize("offset", [0, 3000, "tensor"])
def test_empty_batch_or_sequence(mixing, shape, offset):
    m = _module(mixing)
    B = shape[0]
    off = torch.arange(B) + 7 if offset == "tensor" else offset
    x = torch.randn(shape)
    y = m(x, offset=off, layout="BTHD")
    assert y.shape == x.shape and y.dtype == x.dtype
    y3 = m(torch.randn(shape[0], shape[1], 16), offset=off)
    assert y3.shape == (shape[0], shape[1], 16)
    q = torch.randn(shape[0], 2, shape[1], 8)
    q_rot, k_rot = m.rotate_qk(q, torch.randn(shape[0], 1, shape[1], 8), offset=off)
    assert q_rot.shape == q.shape and k_rot.shape == (shape[0], 1, shape[1], 8)


@pytest.mark.parametrize("mixing", [None, "givens", "orthogonal"])
@pytest.mark.parametrize("shape", EMPTY)
def test_empty_backward(mixing, shape):
    m = _module(mixing)
    x = torch.randn(shape, requires_grad=True)
    y = m(x, offset=3, layout="BTHD")
    (g, *gp) = torch.autograd.grad(y.sum(), [x, *m.parameters()], allow_unused=True)
    assert g.shape == x.shape
    assert all(p is None or not bool(p.any()) for p in gp)  # nothing to learn from nothing


def test_empty_apply_rotary():
    for B, T in ((0, 4), (2, 0)):
        x = torch.randn(B, T, 2, 8)
        cos = sin = torch.zeros(T, 4)
        assert apply_rotary(x, cos, sin).shape == x.shape


# ------------------------------------------------------------------------------------------------ NaN / inf
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_values_stay_in_their_head_vector(mixing, bad, dtype):
    m = _module(mixing)
    x = torch.randn(2, 5, 2, 8).to(dtype)
    clean = m(x, offset=11, layout="BTHD")
    x_bad = x.clone()
    x_bad[1, 3, 0, 5] = bad
    y = m(x_bad, offset=11, layout="BTHD")
    assert not bool(torch.isfinite(y[1, 3, 0]).all())  # propagates: no silent finite answer
    others = torch.ones(2, 5, 2, dtype=torch.bool)
    others[1, 3, 0] = False
    assert torch.equal(y[others], clean[others])  # every other head vector bit-identical


# ------------------------------------------------------------------------------------------------ large positions
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("start", [65_530, 131_070, 999_990])  # in the table, at its end, far past it
@pytest.mark.parametrize("how", ["offset", "tensor offset", "positions"])
def test_16_bit_at_positions_up_to_a_million_within_one_ulp(dtype, mixing, start, how):
    m = _module(mixing, heads=2, head_dim=16)
    B, T = 2, 10
    x = torch.randn(B, T, 2, 16).to(dtype)
    pos = torch.arange(start, start + T)
    kw = {"offset": start} if how == "offset" else {"offset": torch.tensor([start, start])} if how == "tensor offset" \
        else {"positions": pos}
    y = m(x, **kw, layout="BTHD")
    with torch.no_grad():
        ref = _reference(m, x, pos)
    # P is built in float32 from the parameters: its own error (a few float32 epsilons) is well below bf16/fp16's
    err = (y.double() - ref).abs()
    assert bool((err <= ulp(ref, dtype) + 1e-6 * x.double().norm(dim=-1, keepdim=True)).all()), float(err.max())


# ------------------------------------------------------------------------------------------------ strides
def _strided(name: str, B: int, T: int, H: int, D: int) -> torch.Tensor:
    """A non-contiguous (B, T, H, D) view of random data."""
    g = torch.Generator().manual_seed(1)
    if name == "transposed (B, H, T, D) buffer":
        return torch.randn(B, H, T, D, generator=g).transpose(1, 2)
    if name == "sequence-major (T, B, H, D) buffer":  # fairseq-style (T, B, C) activations
        return torch.randn(T, B, H, D, generator=g).transpose(0, 1)
    if name == "every other step":
        return torch.randn(B, 2 * T, H, D, generator=g)[:, ::2]
    if name == "batch-minor":
        return torch.randn(T, H, D, B, generator=g).permute(3, 0, 1, 2)
    if name == "channels strided":
        return torch.randn(B, T, H, 2 * D, generator=g)[..., ::2]
    return torch.randn(1, T, H, D, generator=g).expand(B, T, H, D)  # "expanded batch"


STRIDES = ["transposed (B, H, T, D) buffer", "sequence-major (T, B, H, D) buffer", "every other step", "batch-minor",
           "channels strided", "expanded batch"]
DENSE = ("orthogonal", "quaternion")


@pytest.mark.parametrize("strides", STRIDES)
@pytest.mark.parametrize("mixing", [None, "givens", *DENSE])
@pytest.mark.parametrize("interleaved", [True, False])
def test_non_contiguous_inputs_equal_contiguous(mixing, strides, interleaved):
    D = 6 if mixing == "quaternion" else 8
    # bit for bit, every mixing: a dense P multiplies a contiguous copy, so strides cannot change its rounding
    m = _module(mixing, head_dim=D, interleaved=interleaved)
    x = _strided(strides, 3, 5, 2, D)
    assert not x.is_contiguous()
    assert torch.equal(m(x, offset=4, layout="BTHD"), m(x.contiguous(), offset=4, layout="BTHD"))
    if x.stride(0):  # an expanded tensor is read-only: no gradient into it
        up = torch.randn(x.shape)
        xg, xc = x.detach().requires_grad_(), x.contiguous().requires_grad_()  # xg keeps x's strides
        (g1,) = torch.autograd.grad(m(xg, offset=4, layout="BTHD"), xg, up)
        (g2,) = torch.autograd.grad(m(xc, offset=4, layout="BTHD"), xc, up)
        assert torch.equal(g1, g2)
    q, k = x.transpose(1, 2), x[:, :, :1].transpose(1, 2)  # (B, H, T, D) views, one key head
    qr, kr = m.rotate_qk(q, k, offset=2)
    qc, kc = m.rotate_qk(q.contiguous(), k.contiguous(), offset=2)
    assert torch.equal(qr, qc)
    assert torch.equal(kr, kc)


def test_dense_mixing_sequence_major_input_equals_contiguous_bit_for_bit():
    m = Rotary(16, 2, mixing="orthogonal")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 5, 16, generator=g)
    xs = x.transpose(0, 1).contiguous().transpose(0, 1)  # a (T, B, C) buffer seen as (B, T, C)
    with torch.no_grad():
        assert torch.equal(m(xs, offset=3), m(x, offset=3))


def test_non_contiguous_apply_rotary_and_tables():
    x, cos, sin, cos_t, sin_t = _strided_tables()
    assert torch.equal(apply_rotary(x, cos, sin), apply_rotary(x.contiguous(), cos, sin))
    assert torch.equal(apply_rotary(x.contiguous(), cos_t, sin_t), apply_rotary(x.contiguous(), cos, sin))
    torch.testing.assert_close(apply_rotary(x, cos_t, sin_t).double(), apply_rotary_reference(x, cos, sin),
                               atol=1e-6, rtol=0)  # right within rounding whatever the strides


def _strided_tables():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 3, 8, generator=g).transpose(0, 1)  # batch-minor
    angles = torch.arange(5.0)[:, None] * torch.tensor([1.0, 0.1, 0.01, 0.001])
    cos, sin = angles.cos(), angles.sin()
    cos_t, sin_t = cos.t().contiguous().t(), sin.t().contiguous().t()  # column-major tables
    return x, cos, sin, cos_t, sin_t


def test_non_contiguous_x_and_tables_together_equal_contiguous():
    x, cos, sin, cos_t, sin_t = _strided_tables()
    assert torch.equal(apply_rotary(x, cos_t, sin_t), apply_rotary(x.contiguous(), cos, sin))


# ------------------------------------------------------------------------------------------------ inference mode
@pytest.mark.parametrize("mixing", MIXINGS)
def test_inference_mode_tensors(mixing):
    m = _module(mixing)
    with torch.inference_mode():
        x = torch.randn(2, 5, 16)
        inside = m(x, offset=3)
    with torch.no_grad():  # an inference tensor used outside the mode, without autograd
        assert torch.equal(m(x, offset=3), inside)
    if mixing is None:  # nothing requires grad: no autograd at all
        assert torch.equal(m(x, offset=3), inside)
    else:  # torch's own rule for any op between an inference tensor and a parameter that requires grad
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            m(x, offset=3)
    # training afterwards, at positions the construction-time table covers
    xg = torch.randn(2, 5, 16, requires_grad=True)
    m(xg, offset=3).sum().backward()
    assert xg.grad is not None and all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("mixing", [None, "givens"])
def test_training_after_the_table_grew_under_inference_mode(mixing):
    m = _module(mixing)
    with torch.inference_mode():
        m(torch.randn(2, 5, 16), offset=5000)  # e.g. generating a long sample mid-training
    xg = torch.randn(2, 5, 16, requires_grad=True)
    m(xg, offset=3).sum().backward()
    assert xg.grad is not None


# ------------------------------------------------------------------------------------------------ second order


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("learned_freq", [False, True])
@pytest.mark.parametrize("offset", [3, "tensor"])
def test_second_derivatives(mixing, learned_freq, offset):
    """create_graph=True through the fast path: gradgradcheck in float64, input and parameters."""
    m = _module(mixing, heads=1, head_dim=4, learned_freq=learned_freq).double()
    off = torch.tensor([3, 9]) if offset == "tensor" else offset
    x = torch.randn(2, 3, 1, 4, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())

    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,), {"offset": off, "layout": "BTHD"})

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_gradient_penalty_matches_the_reference():
    """The use case: a penalty on ||dL/dx||^2, differentiated again, equals the float64 reference's."""
    m = _module("givens", heads=2, head_dim=8, learned_freq=True).double()
    x = torch.randn(2, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 2, 8, dtype=torch.float64)
    params = list(m.parameters())

    def penalty(y):
        (gx,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
        return (gx**2).sum() + (y**2 * gx).sum()

    got = torch.autograd.grad(penalty(m(x, offset=5, layout="BTHD")), params)
    want = torch.autograd.grad(penalty(_reference(m, x, torch.arange(5, 9))), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
