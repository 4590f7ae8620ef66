"""torch.compile(fullgraph=True): same numbers as eager, no recompiles while decoding."""

import pytest
import torch
from conftest import assert_decodes_without_recompiles
from torch._dynamo.testing import CompileCounterWithBackend

from rotary import Rotary


@pytest.fixture(autouse=True)
def _fresh(fresh_dynamo):
    yield


@pytest.mark.parametrize("mixing", [None, "givens", "orthogonal"])
@pytest.mark.parametrize("learned_freq", [False, True])
def test_no_recompiles_across_decode_steps(mixing, learned_freq):
    m = Rotary(32, 4, mixing=mixing, learned_freq=learned_freq)
    assert_decodes_without_recompiles(m, range(1, 65))  # decode steps with a cache of length 1..64


def test_no_recompiles_across_lengths():
    m = Rotary(32, 4)
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(m, backend=counter, fullgraph=True)
    f(torch.randn(2, 3, 32))
    f(torch.randn(2, 4, 32))
    warm = counter.frame_count
    for T in range(2, 65):
        x = torch.randn(2, T, 32)
        torch.testing.assert_close(f(x), m(x), atol=1e-6, rtol=0)
    assert counter.frame_count == warm


@pytest.mark.parametrize("interleaved", [True, False])
def test_inductor_forward_backward_matches_eager(interleaved):
    m = Rotary(48, 3, interleaved=interleaved, rotary_dim=12)
    with torch.no_grad():
        m.mixer.angles.normal_()
    f = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 7, 48, requires_grad=True)
    g = torch.randn(2, 7, 48)
    offset = torch.tensor([3, 4000])  # per-row offsets, one past the initial table
    y_c = f(x, offset=offset)
    y_e = m(x, offset=offset)
    torch.testing.assert_close(y_c, y_e, atol=1e-6, rtol=0)
    grads_c = torch.autograd.grad(y_c, [x, m.mixer.angles], g)
    grads_e = torch.autograd.grad(y_e, [x, m.mixer.angles], g)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
