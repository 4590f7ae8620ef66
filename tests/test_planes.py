"""rotary.core.planes and GivensMixing.rotate: Givens P along one axis, against the float64 oracle's dense P.

The reference is ``givens_matrix_reference`` (a product of dense plane rotations built from the planes and angles
alone); gradients are checked by finite differences (``torch.autograd.gradcheck``) in float64.
"""

import pytest
import torch

from rotary.core.mixing import GivensMixing, default_planes
from rotary.core.planes import plane_slices
from rotary.core.reference import givens_matrix_reference

# (head_dim, planes): the strided patterns default_planes picks (neighbours, halves, partial rotary), and a
# shuffled set that needs a gather
PATTERNS = {
    "neighbours": (8, [(0, 1), (2, 3), (4, 5), (6, 7)]),
    "halves": (8, [(0, 4), (1, 5), (2, 6), (3, 7)]),
    "partial": (10, [(0, 3), (1, 4), (2, 5)]),
    "gather": (6, [(0, 5), (1, 3), (2, 4)]),
}


def mixing(head_dim, planes, dtype=torch.float64, seed=0):
    g = GivensMixing(head_dim, [])
    g.load_state_dict({"planes": torch.tensor(planes), "angles": torch.zeros(len(planes))})
    with torch.no_grad():
        g.angles.copy_(torch.randn(len(planes), generator=torch.Generator().manual_seed(seed)))
    return g.to(dtype)


def test_plane_slices_finds_strided_patterns_and_only_those():
    assert plane_slices(PATTERNS["neighbours"][1], 8) == (slice(0, 7, 2), slice(1, 8, 2))
    assert plane_slices(PATTERNS["halves"][1], 8) == (slice(0, 4, 1), slice(4, 8, 1))
    assert plane_slices(PATTERNS["partial"][1], 10) == (slice(0, 3, 1), slice(3, 6, 1))
    assert plane_slices(PATTERNS["gather"][1], 6) is None
    assert plane_slices([(0, 1), (1, 2)], 4) is None  # overlapping channels
    assert plane_slices([(0, 5), (1, 6)], 6) is None  # past the head
    assert plane_slices([], 4) is None


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("dim", [-1, 1])
def test_rotate_equals_the_dense_reference_along_any_axis(pattern, dim):
    head_dim, planes = PATTERNS[pattern]
    g = mixing(head_dim, planes)
    P = givens_matrix_reference(torch.tensor(planes), g.angles.detach(), head_dim)
    x = torch.randn(3, 5, head_dim, 4, dtype=torch.float64).movedim(2, dim)  # the channel axis at dim
    expected = torch.einsum("ij,...j->...i", P, x.movedim(dim, -1)).movedim(-1, dim)
    assert (g._slices is None) == (pattern == "gather")
    assert torch.allclose(g.rotate(x, dim=dim), expected, atol=1e-13, rtol=0)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_rotate_gradients_pass_finite_differences(pattern):
    head_dim, planes = PATTERNS[pattern]
    g = mixing(head_dim, planes)
    x = torch.randn(2, 3, head_dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, head_dim, 5, dtype=torch.float64, requires_grad=True)  # weight rows: the axis before last

    class Rotate(torch.nn.Module):  # so that functional_call can put the checked angles in g's place
        def __init__(self):
            super().__init__()
            self.g = g

        def forward(self, x, dim):
            return self.g.rotate(x, dim=dim)

    module = Rotate()

    def outputs(x, w, angles):
        with_angles = {"g.angles": angles}
        return (torch.func.functional_call(module, with_angles, (x, -1)),
                torch.func.functional_call(module, with_angles, (w, -2)))

    angles = g.angles.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(outputs, (x, w, angles))


def test_neighbour_pairs_take_the_complex_product_and_strided_views_the_slices():
    # the neighbours' fast path needs contiguous channel pairs; a strided view (a weight's rows) takes the slices:
    # both must give the dense reference
    head_dim, planes = PATTERNS["neighbours"]
    g = mixing(head_dim, planes, dtype=torch.float32)
    P = givens_matrix_reference(torch.tensor(planes), g.angles.detach().double(), head_dim).float()
    x = torch.randn(7, head_dim)
    assert torch.allclose(g.rotate(x), x @ P.T, atol=1e-6)
    assert torch.allclose(g.rotate(x.T.contiguous(), dim=0), P @ x.T, atol=1e-6)
    odd = torch.randn(7, head_dim + 1)[:, 1:]  # odd offset: no complex view
    assert torch.allclose(g.rotate(odd), odd @ P.T, atol=1e-6)


def test_planes_read_from_a_checkpoint_decide_the_pattern():
    g = GivensMixing(8, [(i, i + 4) for i in range(4)])  # rotate-half RoPE pairs: neighbours planes
    assert g._slices == (slice(0, 7, 2), slice(1, 8, 2))
    shuffled = PATTERNS["gather"][1]
    g6 = GivensMixing(6, [])
    g6.load_state_dict({"planes": torch.tensor(shuffled), "angles": torch.full((3,), 0.3)})
    assert g6._slices is None
    g6.reset_parameters()
    assert g6._slices == plane_slices(default_planes(6, []), 6)


def test_rotate_is_traced_by_dynamo_without_a_graph_break():
    g = mixing(*PATTERNS["halves"], dtype=torch.float32)
    w = torch.randn(2, 8, 6, requires_grad=True)

    def step(w):
        return (g.rotate(w, dim=-2) ** 2).sum() + (g.rotate(w.transpose(-1, -2)) ** 3).sum()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(w)
    assert explained.graph_break_count == 0
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, expected = compiled(w), step(w)
    grads = torch.autograd.grad(loss, [w, g.angles])
    expected_grads = torch.autograd.grad(expected, [w, g.angles])
    assert torch.allclose(loss, expected, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected_grads))
