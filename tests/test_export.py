"""Deployment: ``torch.export`` with a dynamic sequence length, and ONNX through the dynamo exporter.

An attention that calls ``rot(x)`` or ``rot.rotate_qk(q, k)`` is exported once, with the sequence length (and the
key length of a KV cache) dynamic: the offset the attention derives from the shapes is then a symbolic int. The
exported program must equal eager at other lengths, including lengths past the angle table, and both must match
the float64 reference. ONNX: the exported program runs in onnxruntime (skipped without onnx/onnxruntime/onnxscript,
``pip install rotary[onnx]``).
"""

import pytest
import torch
from torch import nn
from torch.export import Dim, export

from rotary import Rotary, rotary_reference

MIXINGS = [None, "givens", "orthogonal", "quaternion"]
B, H, D = 2, 3, 6  # head_dim 6: quaternion mixing works on 3-d blocks
TOL = dict(atol=2e-5, rtol=0)  # float32 output against the float64 reference


def _rotary(mixing) -> Rotary:
    m = Rotary(H * D, H, mixing=mixing).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


def _reference(m: Rotary, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The float64 oracle for a (B, H, T, D) x at positions (T,) or (B, T)."""
    y = rotary_reference(x.transpose(1, 2), positions, rotary_dim=m.rotary_dim, interleaved=m.interleaved,
                         mixing=m.mixing_matrix(torch.float64), freqs=m.frequencies().detach())
    return y.transpose(1, 2).float()


class Attention(nn.Module):
    """Every way an attention calls the rotary, in one exported program. x, y ``(B, H, T, D)`` with T dynamic;
    q ``(B, H, 1, D)`` one new query against k ``(B, H, Tk, D)`` cached keys, Tk dynamic; offsets ``(B,)``."""

    def __init__(self, rot: Rotary, start: int):
        super().__init__()
        self.rot, self.start = rot, start

    def forward(self, x, y, q, k, offsets):
        first = self.start + k.shape[2] - 1  # the new query's position: a symbolic int under export
        return (
            self.rot(x, offset=self.start),
            self.rot(x, offset=offsets),
            *self.rot.rotate_qk(x, y),  # the call export refused: its key offset is symbolic
            *self.rot.rotate_qk(x, y, offset=offsets),
            *self.rot.rotate_qk(q, k, offset=first),
            *self.rot.rotate_qk(q, k, offset=offsets),
        )


def _expected(m: Rotary, start: int, x, y, q, k, offsets):
    """The float64 reference at the positions each call means."""
    T, Tk = x.shape[2], k.shape[2]
    at, rows = torch.arange(T), offsets[:, None]
    keys, first = torch.arange(Tk), start + Tk - 1
    return (
        _reference(m, x, start + at), _reference(m, x, rows + at),
        _reference(m, x, at), _reference(m, y, at),
        _reference(m, x, rows + at), _reference(m, y, rows + at),
        _reference(m, q, torch.tensor([first])), _reference(m, k, start + keys),
        _reference(m, q, rows), _reference(m, k, rows - (Tk - 1) + keys),  # rows: the query's; keys end there
    )


T, TK = Dim("T", min=2, max=1 << 15), Dim("Tk", min=2, max=1 << 15)


def _inputs(n: int, n_keys: int, offsets):
    return (torch.randn(B, H, n, D), torch.randn(B, H, n, D), torch.randn(B, H, 1, D), torch.randn(B, H, n_keys, D),
            offsets)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_export_with_a_dynamic_length_equals_eager(mixing):
    """Exported once at 7 tokens; run at other lengths, past the 2048 rows the table held at export too. (An
    export takes seconds: one program per mixing holds every call.)"""
    m, start = _rotary(mixing), 5
    model = Attention(m, start)
    offsets = torch.tensor([3, 11])
    program = export(model, _inputs(7, 9, offsets), dynamic_shapes=({2: T}, {2: T}, None, {2: TK}, None))
    for n, n_keys in ((2, 3), (13, 40), (2100, 2050)):
        args = _inputs(n, n_keys, offsets)
        got = program.module()(*args)
        for g, eager, ref in zip(got, model(*args), _expected(m, start, *args)):
            torch.testing.assert_close(g, eager, atol=1e-6, rtol=0)
            torch.testing.assert_close(g, ref, **TOL)


def test_symbolic_offset_still_checked():
    """The one offset check accepts a symbolic int; a plain one below the keys' start is still refused."""
    m = _rotary("givens")
    q, k = torch.randn(B, H, 2, D), torch.randn(B, H, 7, D)
    with pytest.raises(ValueError, match="must be at least 5"):
        m.rotate_qk(q, k, offset=4)
    with pytest.raises(ValueError, match="non-negative int"):
        m(q, offset=-1)


class Prefill(nn.Module):
    def __init__(self, rot: Rotary):
        super().__init__()
        self.rot = rot

    def forward(self, q, k):
        return self.rot.rotate_qk(q, k)


@pytest.mark.parametrize("mixing", ["givens", "orthogonal folded"])
def test_onnx_runs_in_onnxruntime(mixing, tmp_path):
    pytest.importorskip("onnxscript", reason="pip install rotary[onnx]")
    ort = pytest.importorskip("onnxruntime", reason="pip install rotary[onnx]")
    m = _rotary(mixing.split()[0] if mixing else None)
    q, k = torch.randn(B, H, 7, D), torch.randn(B, H, 7, D)
    path = tmp_path / "rotary.onnx"
    if mixing == "orthogonal folded":  # P = matrix_exp(A) has no ONNX form: refused, naming the fix
        with pytest.raises(Exception, match="fold P into the q/k projection weights") as refusal:
            torch.onnx.export(Prefill(m).eval(), (q, k), str(path), dynamo=True, dynamic_shapes=({2: T}, {2: T}))
        assert "matrix_exp" in str(refusal.value)
        P = m.remove_mixing()  # the fix: P leaves the module (into W_q/W_k); the rest exports
        q, k = (torch.einsum("de,bhte->bhtd", P, t.double()).float() for t in (q, k))
    model = Prefill(m).eval()
    torch.onnx.export(model, (q, k), str(path), dynamo=True, dynamic_shapes=({2: T}, {2: T}))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (5, 300):
        q, k = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
        names = [i.name for i in session.get_inputs()]
        got = session.run(None, dict(zip(names, (q.numpy(), k.numpy()))))
        pos = torch.arange(n)
        torch.testing.assert_close(torch.from_numpy(got[0]), _reference(m, q, pos), **TOL)
        torch.testing.assert_close(torch.from_numpy(got[1]), _reference(m, k, pos), **TOL)
