"""Learned orthogonal mixings: orthogonality, identity at init, planes, against the dense float64 references."""

import pytest
import torch

from rotary.core.mixing import GivensMixing, OrthogonalMixing, QuaternionMixing, default_planes
from rotary.core.reference import givens_matrix_reference, orthogonal_matrix_reference, quaternion_matrix_reference

INTERLEAVED = lambda D: [(2 * i, 2 * i + 1) for i in range(D // 2)]  # noqa: E731
HALF = lambda D: [(i, i + D // 2) for i in range(D // 2)]  # noqa: E731


def _mixings(D):
    out = [GivensMixing(D, INTERLEAVED(D)), OrthogonalMixing(D)]
    if D % 3 == 0:
        out.append(QuaternionMixing(D))
    return out


@pytest.mark.parametrize("D", [3, 6, 8, 9, 64])
def test_identity_at_init_and_orthogonal_for_any_parameters(D):
    for mixing in _mixings(D):
        assert torch.equal(mixing.matrix(), torch.eye(D)), type(mixing).__name__
        with torch.no_grad():
            for p in mixing.parameters():
                p.normal_(std=3.0)
        P = mixing.matrix()
        torch.testing.assert_close(P @ P.T, torch.eye(D), atol=1e-5, rtol=0)
        x = torch.randn(100, D)
        torch.testing.assert_close((x @ P.T).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
        # +1: a rotation, not a reflection
        assert float(torch.linalg.det(P.detach().double())) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("D", [2, 3, 5, 8, 64, 65])
@pytest.mark.parametrize("pairs", [INTERLEAVED, HALF])
def test_planes_are_disjoint_distinct_and_never_a_rope_pair(D, pairs):
    planes = default_planes(D, pairs(D - D % 2))
    assert len(planes) == D // 2
    flat = [c for p in planes for c in p]
    assert len(set(flat)) == len(flat)  # disjoint, and i != j within each plane
    if D >= 4:
        rope = {frozenset(p) for p in pairs(D - D % 2)}
        assert not any(frozenset(p) in rope for p in planes)


@pytest.mark.parametrize("D, r", [(16, 8), (16, 4), (16, 2), (32, 12), (10, 6), (64, 16)])
@pytest.mark.parametrize("pairs", [INTERLEAVED, HALF])
def test_planes_under_partial_rotary_each_touch_a_rotated_channel(D, r, pairs):
    """A plane of two pass-through channels commutes with RoPE and cancels between q and k: none may exist, and
    every plane acts (P R(m) != R(m) P for the plane's rotation at a generic angle)."""
    planes = default_planes(D, pairs(r))
    assert len(planes) == min(D // 2, r)
    flat = [c for p in planes for c in p]
    assert len(set(flat)) == len(flat)
    rope = {frozenset(p) for p in pairs(r)}
    for i, j in planes:
        assert i < r or j < r, (i, j)
        assert frozenset((i, j)) not in rope
    R = torch.eye(D, dtype=torch.float64)  # RoPE at position 1, frequencies 1, 1/2, 1/3, ... (none equal)
    for k, (a, b) in enumerate(pairs(r)):
        t = torch.tensor(1.0 / (k + 1), dtype=torch.float64)
        R[a, a], R[a, b], R[b, a], R[b, b] = t.cos(), -t.sin(), t.sin(), t.cos()
    for plane in planes:
        G = givens_matrix_reference(torch.tensor([plane]), torch.tensor([0.7]), D)
        assert (G @ R - R @ G).abs().max() > 1e-3, plane


def test_a_state_dict_brings_its_own_number_of_planes():
    """Checkpoints of versions that kept head_dim // 2 planes under partial rotary load as they were."""
    today = GivensMixing(16, HALF(4))
    new = GivensMixing(16, HALF(4))
    assert new.planes.shape == (4, 2)
    state = {"planes": torch.tensor([(2 * k, 2 * k + 1) for k in range(8)]), "angles": torch.randn(8)}
    new.load_state_dict(state)
    expected = givens_matrix_reference(state["planes"], state["angles"], 16)
    torch.testing.assert_close(new.matrix(torch.float64), expected, atol=1e-12, rtol=0)
    new.reset_parameters()  # back to today's planes
    assert torch.equal(new.planes, today.planes) and torch.equal(new.matrix(), torch.eye(16))


def test_planes_do_not_use_the_global_rng():
    torch.manual_seed(0)
    a = GivensMixing(64, INTERLEAVED(64)).planes
    torch.manual_seed(99)
    torch.rand(10)
    b = GivensMixing(64, INTERLEAVED(64)).planes
    assert torch.equal(a, b)
    assert "planes" in GivensMixing(8, INTERLEAVED(8)).state_dict()


@pytest.mark.parametrize("D", [5, 8, 64])
def test_givens_matrix_matches_product_of_dense_rotations(D):
    mixing = GivensMixing(D, INTERLEAVED(D - D % 2))
    with torch.no_grad():
        mixing.angles.uniform_(-3, 3)
    expected = givens_matrix_reference(mixing.planes, mixing.angles, D)
    torch.testing.assert_close(mixing.matrix(torch.float64), expected, atol=1e-12, rtol=0)
    c, s, partner = mixing.coefficients(torch.float64)  # the sparse form used by the fast path
    x = torch.randn(7, D, dtype=torch.float64)
    torch.testing.assert_close(c * x + s * x[:, partner], x @ expected.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("D", [3, 6])
def test_quaternion_matches_hamilton_product(D):
    mixing = QuaternionMixing(D)
    with torch.no_grad():
        mixing.axis.normal_()
        mixing.angle.uniform_(-3, 3)
    blocks = [quaternion_matrix_reference(a, t) for a, t in zip(mixing.axis, mixing.angle)]
    torch.testing.assert_close(mixing.matrix(torch.float64), torch.block_diag(*blocks), atol=1e-12, rtol=0)


def test_orthogonal_matches_series_exponential():
    mixing = OrthogonalMixing(8)
    with torch.no_grad():
        mixing.generator.normal_(std=0.5)
    expected = orthogonal_matrix_reference(mixing.generator)
    torch.testing.assert_close(mixing.matrix(torch.float64), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mixing", [GivensMixing(6, INTERLEAVED(6)), QuaternionMixing(6), OrthogonalMixing(6)])
def test_gradcheck_through_parameters(mixing):
    mixing = mixing.double()
    with torch.no_grad():
        for p in mixing.parameters():
            p.normal_()
    names = [n for n, _ in mixing.named_parameters()]

    def build(*values):  # P as a function of the parameters
        return torch.func.functional_call(mixing, dict(zip(names, values)), (torch.float64,))

    assert torch.autograd.gradcheck(build, tuple(p.detach().requires_grad_() for p in mixing.parameters()))


def test_bf16_parameters_still_give_an_orthogonal_float32_matrix():
    for mixing in _mixings(6):
        with torch.no_grad():
            for p in mixing.parameters():
                p.normal_()
        mixing.to(torch.bfloat16)
        P = mixing.matrix(torch.bfloat16)
        assert P.dtype == torch.float32
        torch.testing.assert_close(P @ P.T, torch.eye(6), atol=1e-5, rtol=0)
