import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at each value of a float64 reference (one ulp of the rounded result)."""
    r = reference.abs().to(dtype)
    return (torch.nextafter(r, torch.full_like(r, float("inf"))).double() - r.double())


def assert_decodes_without_recompiles(module, offsets, dims: int = 32) -> None:
    """Compile ``module`` (fullgraph), warm it up with a prompt and two decode steps (dynamo specialises on the
    first values it sees, then marks offset dynamic), then decode at ``offsets``: same numbers as eager, and no
    new compiled frame."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(module, backend=counter, fullgraph=True)
    f(torch.randn(2, 8, dims), offset=0)
    f(torch.randn(2, 1, dims), offset=8)
    f(torch.randn(2, 1, dims), offset=9)
    warm = counter.frame_count
    for t in offsets:
        x = torch.randn(2, 1, dims)
        torch.testing.assert_close(f(x, offset=t), module(x, offset=t), atol=1e-6, rtol=0)
    assert counter.frame_count == warm


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
