"""rotary.core.positions: a call's offset / positions / length resolved once, checked by one validator, and the one
range check before a table gather. The expected positions are written out here, not computed by the module."""

import pytest
import torch

from rotary import Rotary
from rotary.core.positions import Span, check_offset, index_range, resolve


def _positions(where, device="cpu"):
    return where.keys.tensor(device) if isinstance(where.keys, Span) else where.keys


def test_forward_positions():
    assert _positions(resolve(2, 3, 4, None, None)).tolist() == [4, 5, 6]
    assert _positions(resolve(2, 3, torch.tensor([0, 10]), None, None)).tolist() == [[0, 1, 2], [10, 11, 12]]
    given = torch.tensor([7, 1, 3])
    assert resolve(2, 3, 999, given, None).keys is given  # positions override the offset


def test_rotate_qk_keys_end_at_the_last_query():
    """5 keys, 2 queries, the first query at 9: keys at 6..10, the queries the last 2 of them."""
    where = resolve(1, 5, 9, None, None, shift=3)
    assert _positions(where).tolist() == [6, 7, 8, 9, 10] and where.shift == 3
    where = resolve(2, 5, torch.tensor([9, 1]), None, None, shift=3)  # a tensor's keys may start below 0
    assert _positions(where).tolist() == [[6, 7, 8, 9, 10], [-2, -1, 0, 1, 2]]
    with pytest.raises(ValueError, match="must be at least 3"):
        resolve(1, 5, 2, None, None, shift=3)


def test_length_defaults_to_the_last_query_plus_one():
    def length(*args, **kw):
        return resolve(*args, length_dependent=True, **kw).length.tolist()

    assert length(1, 5, 9, None, None, shift=3) == 11  # queries at 9, 10
    assert length(2, 5, torch.tensor([9, 1]), None, None, shift=3) == [11, 3]
    assert length(2, 3, 0, torch.tensor([[4, 0, 2], [1, 1, 1]]), None) == [5, 2]
    assert length(1, 3, 0, None, 40) == 40  # given
    assert resolve(1, 3, 0, None, None).length is None  # nothing depends on it


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None, torch.tensor([1.0, 2.0]), torch.tensor([True, False])])
def test_one_validator_for_every_offset(bad):
    with pytest.raises(ValueError, match="offset must be"):
        check_offset(bad, 2)
    with pytest.raises(ValueError, match="offset must be"):  # the module says the same through its one check
        Rotary(8, 2, mixing=None)(torch.randn(2, 3, 8), offset=bad)


def test_a_symbolic_offset_is_accepted():
    """Under torch.export an offset derived from shapes is a SymInt, not an int: the check passes it on as a
    runtime assertion (tests/test_export.py runs such programs)."""
    seen = []

    class Check(torch.nn.Module):
        def forward(self, q, k):
            offset = k.shape[1] - q.shape[1]
            seen.append(type(offset))
            check_offset(offset)
            return q + 1

    T = torch.export.Dim("T", min=2, max=64)
    torch.export.export(Check(), (torch.randn(1, 3), torch.randn(1, 5)), dynamic_shapes=({1: T}, {1: T + 2}))
    assert torch.SymInt in seen


def test_tensor_offsets_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"shape \(\) or \(2,\)"):
        resolve(2, 3, torch.tensor([1, 2, 3]), None, None)


def test_index_range():
    assert index_range(torch.tensor([[3, 9], [-2, 4]])) == (-2, 9)
    assert index_range(torch.tensor([1.0, 2.0])) is None  # float positions: no gather
    assert index_range(torch.zeros(0, dtype=torch.long)) is None
