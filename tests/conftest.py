import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at each value of a float64 reference (one ulp of the rounded result)."""
    r = reference.abs().to(dtype)
    return (torch.nextafter(r, torch.full_like(r, float("inf"))).double() - r.double())
