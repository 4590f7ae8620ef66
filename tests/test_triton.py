"""The Triton kernel (rotary.core.kernels.rope and its ops) against the float64 oracle: outputs and every gradient.

Without a GPU the kernels run under Triton's interpreter. Triton reads TRITON_INTERPRET when its own library and
our kernels are decorated, i.e. when triton is first imported, which other tests of the suite may already have
done: so on CPU, unless TRITON_INTERPRET=1 was set before pytest started, this module runs itself once in a fresh
interpreter process with it set (one test here, the cases there). Small odd shapes keep that fast. On a GPU
machine (scripts/gpu_check.sh) the cases run in process on CUDA tensors, compiled.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from conftest import ulp

from rotary.core import kernels
from rotary.core.mixing import GivensMixing
from rotary.core.reference import apply_rotary_reference, givens_matrix_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IN_PROCESS = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
B, T, H, D = 2, 7, 3, 10
_ANGLES = torch.randn(16, D // 2, generator=torch.Generator().manual_seed(0))
COS, SIN = _ANGLES.cos().to(DEVICE), _ANGLES.sin().to(DEVICE)  # a (16, r/2) table, r = D



@pytest.fixture(autouse=True)
def _triton(request, monkeypatch):
    if not IN_PROCESS and request.node.name != "test_under_interpreter":
        pytest.skip("runs under the interpreter, in test_under_interpreter's subprocess")
    monkeypatch.setenv("ROTARY_KERNEL", "triton")


@pytest.mark.skipif(IN_PROCESS, reason="the cases run in this process")
def test_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def pairs(r, interleaved):
    return [(2 * i, 2 * i + 1) for i in range(r // 2)] if interleaved else [(i, i + r // 2) for i in range(r // 2)]


def givens_module(r, interleaved, d=D):
    g = GivensMixing(d, pairs(r, interleaved)).to(DEVICE)
    with torch.no_grad():
        g.angles.copy_(torch.randn(d // 2))
    return g


def table(rows, r):
    angles = torch.randn(rows, r // 2, device=DEVICE) * 3
    return angles.cos(), angles.sin()


def reference(x, cos_tok, sin_tok, interleaved, g=None, angles=None):
    """float64 ``R G x`` for x ``(B, T, H, D)`` and cos/sin ``(B|1, T, r/2)`` or ``(B|1, T, H, r/2)``."""
    xd = x.double()
    if g is not None:
        P = givens_matrix_reference(g.planes.cpu(), angles, x.shape[-1]).to(x.device)
        xd = torch.einsum("de,bthe->bthd", P, xd)
    if cos_tok.dim() == 4:  # per head: one (B, T) rotation per head
        outs = [apply_rotary_reference(xd[:, :, h : h + 1], cos_tok[:, :, h].expand(x.shape[0], -1, -1),
                                       sin_tok[:, :, h].expand(x.shape[0], -1, -1), interleaved=interleaved)
                for h in range(x.shape[2])]
        return torch.cat(outs, 2)
    return apply_rotary_reference(xd, cos_tok.double().expand(x.shape[0], -1, -1),
                                  sin_tok.double().expand(x.shape[0], -1, -1), interleaved=interleaved)


def close(a, b, atol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("layout", ["BTHD", "BHTD"])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("d, r", [(D, D), (D, 6), (16, 16)])  # 16: a whole power-of-two head, partners swapped
@pytest.mark.parametrize("mix", [False, True])
def test_forward_and_gradients_match_reference(layout, interleaved, d, r, mix):
    x = torch.randn(B, T, H, d, device=DEVICE)
    cos, sin = table(20, r)
    g = givens_module(r, interleaved, d) if mix else None
    xin = (x if layout == "BTHD" else x.transpose(1, 2).contiguous()).requires_grad_()
    y = kernels.rope(xin, cos, sin, interleaved=interleaved, layout=layout, offset=5,
                    givens=None if g is None else g.coefficients())
    angles = None if g is None else g.angles.detach().double().cpu().requires_grad_()
    xd = x.detach().double().requires_grad_()
    ref = reference(xd, cos[5 : 5 + T][None].double(), sin[5 : 5 + T][None].double(), interleaved, g, angles)
    y_bthd = y if layout == "BTHD" else y.transpose(1, 2)
    close(y_bthd, ref)
    grad = torch.randn_like(ref)
    y_bthd.backward(grad.to(y.dtype))
    ref.backward(grad)
    close(xin.grad if layout == "BTHD" else xin.grad.transpose(1, 2), xd.grad)
    if g is not None:
        close(g.angles.grad, angles.grad, atol=1e-4)
    if not mix:  # pass-through channels are bit-exact
        assert torch.equal(y_bthd[..., r:], x[..., r:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_one_rounding(dtype):
    x = torch.randn(B, T, H, D, device=DEVICE).to(dtype)
    cos, sin = table(T, 8)
    g = givens_module(8, True)
    xin = x.clone().requires_grad_()
    y = kernels.rope(xin, cos, sin, givens=g.coefficients(), layout="BTHD")
    assert y.dtype == dtype
    angles = g.angles.detach().double().cpu()
    ref = reference(x, cos[None], sin[None], True, g, angles)
    assert ((y.double() - ref).abs() <= ulp(ref, dtype) / 2 + 1e-6).all()  # float32 maths, rounded once
    grad = torch.randn(ref.shape, device=DEVICE).to(dtype)
    y.backward(grad)
    # the gradient is the inverse rotation of grad, rounded once: within one ulp of its float64 value
    P = givens_matrix_reference(g.planes.cpu(), angles, D).to(DEVICE)
    xd = x.double().requires_grad_()
    reference(xd, cos[None], sin[None], True).backward(grad.double(), inputs=[xd])
    gref = torch.einsum("ed,bthe->bthd", P, xd.grad)
    assert ((xin.grad.double() - gref).abs() <= ulp(gref, dtype) / 2 + 1e-6).all()
    assert torch.equal(kernels.rope(x, cos, sin, interleaved=True, layout="BTHD")[..., 8:], x[..., 8:])


@pytest.mark.parametrize("where", ["int", "offsets", "positions", "positions (T,)"])
def test_table_gathers_positions_in_kernel_with_gqa_keys(where):
    Tq, Tk, Hk = 3, T, 1
    q = torch.randn(B, H, Tq, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, Hk, Tk, D, device=DEVICE, requires_grad=True)
    cos, sin = table(40, 8)
    g = givens_module(8, False)
    kw = {"int": {"offset": 9}, "offsets": {"offset": torch.tensor([4, 11], device=DEVICE)},
          "positions": {"positions": torch.randint(0, 40, (B, Tk), device=DEVICE)},
          "positions (T,)": {"positions": torch.randint(0, 40, (Tk,), device=DEVICE)}}[where]
    yq, yk = kernels.rope(q, cos, sin, k=k, interleaved=False, layout="BHTD", givens=g.coefficients(), **kw)
    if where == "int":
        kpos = (9 - (Tk - Tq) + torch.arange(Tk, device=DEVICE)).expand(B, -1)
    elif where == "offsets":
        kpos = kw["offset"].view(B, 1) - (Tk - Tq) + torch.arange(Tk, device=DEVICE)
    else:
        kpos = kw["positions"].expand(B, -1)
    angles = g.angles.detach().double().cpu().requires_grad_()
    qd, kd = q.detach().double().transpose(1, 2).requires_grad_(), k.detach().double().transpose(1, 2).requires_grad_()
    rq = reference(qd, cos[kpos[:, Tk - Tq :]], sin[kpos[:, Tk - Tq :]], False, g, angles)
    rk = reference(kd, cos[kpos], sin[kpos], False, g, angles)
    close(yq.transpose(1, 2), rq)
    close(yk.transpose(1, 2), rk)
    gq, gk = torch.randn_like(rq), torch.randn_like(rk)
    torch.autograd.backward([yq, yk], [gq.transpose(1, 2).float(), gk.transpose(1, 2).float()])
    torch.autograd.backward([rq, rk], [gq, gk])
    close(q.grad.transpose(1, 2), qd.grad)
    close(k.grad.transpose(1, 2), kd.grad)
    close(g.angles.grad, angles.grad, atol=1e-4)


@pytest.mark.parametrize("shape", ["(B, T, r/2)", "(1, T, r/2)", "(B, T, H, r/2)", "table"])
@pytest.mark.parametrize("mix", [False, True])
@pytest.mark.parametrize("d, r, interleaved", [(D, 8, True), (16, 16, False)])
def test_cos_sin_gradients(shape, mix, d, r, interleaved):
    """Learned frequencies / directions: cos and sin carry gradients, which the kernel's backward computes."""
    x = torch.randn(B, T, H, d, device=DEVICE, requires_grad=True)
    lead = {"(B, T, r/2)": (B, T), "(1, T, r/2)": (1, T), "(B, T, H, r/2)": (B, T, H), "table": (12,)}[shape]
    angles_t = torch.randn(*lead, r // 2, device=DEVICE)
    cos, sin = angles_t.cos().requires_grad_(), angles_t.sin().requires_grad_()
    g = givens_module(r, interleaved, d) if mix else None
    kw = {"positions": torch.tensor([3, 0, 11, 5, 5, 2, 7], device=DEVICE)} if shape == "table" else {}
    y = kernels.rope(x, cos, sin, givens=None if g is None else g.coefficients(), layout="BTHD",
                    interleaved=interleaved, **kw)
    cd, sd = cos.detach().double().requires_grad_(), sin.detach().double().requires_grad_()
    ct, st = (cd[kw["positions"]][None], sd[kw["positions"]][None]) if shape == "table" else (cd, sd)
    angles = None if g is None else g.angles.detach().double().cpu().requires_grad_()
    xd = x.detach().double().requires_grad_()
    ref = reference(xd, ct, st, interleaved, g, angles)
    close(y, ref)
    grad = torch.randn_like(ref)
    y.backward(grad.float())
    ref.backward(grad)
    close(x.grad, xd.grad)
    close(cos.grad, cd.grad, atol=1e-4)
    close(sin.grad, sd.grad, atol=1e-4)
    if g is not None:
        close(g.angles.grad, angles.grad, atol=1e-4)


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_varlen_positions_restart_per_sequence(mode, monkeypatch):
    monkeypatch.setenv("ROTARY_KERNEL", mode)
    lengths = [3, 1, 5]
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32, device=DEVICE)
    x = torch.randn(9, H, D, device=DEVICE)
    k = torch.randn(9, 1, D, device=DEVICE)
    cos, sin = table(30, D)
    offsets = torch.tensor([0, 7, 2], device=DEVICE)
    yq, yk = kernels.rope(x, cos, sin, k=k, cu_seqlens=cu, offset=offsets)
    start = 0
    for n, length in enumerate(lengths):
        pos = offsets[n] + torch.arange(length, device=DEVICE)
        for t, y in ((x, yq), (k, yk)):
            ref = reference(t[start : start + length][None], cos[pos][None], sin[pos][None], True)
            close(y[start : start + length][None], ref)
        start += length
    assert torch.equal(kernels.varlen_positions(cu, 9), torch.tensor([0, 1, 2, 0, 0, 1, 2, 3, 4], device=DEVICE))


def test_inplace_matches_out_of_place_and_backpropagates():
    x = torch.randn(B, T, H, D, device=DEVICE)
    cos, sin = table(T, 6)
    g = givens_module(6, True)
    with torch.no_grad():
        c = g.coefficients()
        expected = kernels.rope(x, cos, sin, givens=c, layout="BTHD")
        buf = x.clone()
        out = kernels.rope(buf, cos, sin, givens=c, inplace=True, layout="BTHD")
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, expected, atol=0, rtol=0)
    leaf = x.clone().requires_grad_()
    y = kernels.rope(leaf * 1, cos, sin, givens=c, inplace=True, layout="BTHD")  # in place on a non-leaf
    y.backward(torch.ones_like(y))
    xd = x.double().requires_grad_()
    reference(xd, cos[None], sin[None], True, g, g.angles.detach().double().cpu()).sum().backward()
    close(leaf.grad, xd.grad)
    with pytest.raises(ValueError, match="inplace"):
        # the angles' gradient needs x
        kernels.rope(x.clone(), cos, sin, givens=g.coefficients(), inplace=True, layout="BTHD")


@pytest.mark.parametrize("packed", ["(B, T, 3, H, D)", "(B, T, Hq + 2 Hk, D)"])
@pytest.mark.parametrize("inplace", [False, True])
def test_packed_qkv(packed, inplace):
    Hq, Hk = (H, H) if packed.startswith("(B, T, 3") else (4, 2)
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE) if Hq == Hk else torch.randn(B, T, Hq + 2 * Hk, D, device=DEVICE)
    q, k, v = (qkv.unbind(2) if qkv.dim() == 5 else qkv.split([Hq, Hk, Hk], 2))
    expected = [reference(t, COS[4 : 4 + T][None], SIN[4 : 4 + T][None], False) for t in (q, k)]
    src = qkv.clone()
    out = kernels.rope_qkv(src, COS, SIN, heads_q=None if qkv.dim() == 5 else Hq, interleaved=False, offset=4,
                          inplace=inplace)
    assert out.shape == qkv.shape and (out.data_ptr() == src.data_ptr()) == inplace
    oq, ok, ov = (out.unbind(2) if out.dim() == 5 else out.split([Hq, Hk, Hk], 2))
    close(oq, expected[0])
    close(ok, expected[1])
    assert torch.equal(ov, v)


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_bad_input_raises_the_same_before_any_launch(mode, monkeypatch):
    monkeypatch.setenv("ROTARY_KERNEL", mode)
    x = torch.randn(B, T, H, D, device=DEVICE)
    cases = [
        ({"offset": 10}, "past the cos/sin table"),
        ({"positions": torch.tensor([0, 1, 2, 3, 4, 5, 16], device=DEVICE)}, "outside the cos/sin table"),
        ({"offset": torch.tensor([0, 12], device=DEVICE)}, "outside the cos/sin table"),
        ({"offset": -1}, "non-negative int"),
        ({"positions": torch.zeros(T, device=DEVICE)}, "integer tensor"),
        ({"layout": "THD"}, "layout"),
        ({"k": torch.randn(B, T, 2, D, device=DEVICE)}, "head count dividing"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            kernels.rope(x, COS, SIN, **{"layout": "BTHD", **kw})
    with pytest.raises(ValueError, match="one shape"):
        kernels.rope(x, COS, SIN[:, :4], layout="BTHD")
    with pytest.raises(ValueError, match="r/2 <= head_dim/2"):
        kernels.rope(x, torch.ones(16, 6, device=DEVICE), torch.ones(16, 6, device=DEVICE), layout="BTHD")


def test_choose(monkeypatch):
    x = torch.randn(2, 3, device=DEVICE)
    assert kernels.choose(x) == "triton"
    assert kernels.choose(x.double()) == "torch"  # float64 keeps float64 arithmetic
    with torch.no_grad():  # the Triton kernel comes before the no-grad one, which is for the torch side
        assert kernels.choose(x, table_rows=True) == "triton"
        assert kernels.choose(x.double(), table_rows=True) == "no-grad"
    monkeypatch.setenv("ROTARY_KERNEL", "torch")
    assert kernels.choose(x) == "torch"
    monkeypatch.setenv("ROTARY_KERNEL", "auto")
    assert kernels.choose(x) == ("triton" if DEVICE == "cuda" else "torch")
    monkeypatch.setenv("ROTARY_KERNEL", "gpu")
    with pytest.raises(ValueError, match="ROTARY_KERNEL"):
        kernels.choose(x)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_table_on_another_device_is_moved():
    x = torch.randn(B, T, H, D, device="cuda")
    y = kernels.rope(x, COS.cpu(), SIN.cpu(), offset=2, layout="BTHD")
    close(y, reference(x, COS[2 : 2 + T][None], SIN[2 : 2 + T][None], True))


def test_compile_fullgraph_traces_the_custom_op(fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend

    g = givens_module(D, True)
    x = torch.randn(B, H, T, D, device=DEVICE, requires_grad=True)
    freqs = torch.randn(D // 2, device=DEVICE, requires_grad=True)  # learned frequencies: cos/sin need gradients

    def f(x, offset):
        angles = (offset + torch.arange(T, device=x.device))[:, None] * freqs
        return kernels.rope(x, angles.cos()[None], angles.sin()[None], layout="BHTD", givens=g.coefficients())

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    y = compiled(x, 3)
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, freqs, g.angles)]
    for t in (x, freqs, g.angles):
        t.grad = None
    f(x, 3).square().sum().backward()
    for got, t in zip(grads, (x, freqs, g.angles)):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1  # one graph (fullgraph: no break), compiled once


@pytest.mark.parametrize("layout, cos_shape", [
    ("BTHD", (T, 1, 4)), ("BHTD", (T, 4)), ("BHTD", (B, 1, T, 4)), ("BTHD", (B, T, H, 4)), ("BHTD", (B, H, T, 4)),
])
def test_rotate_takes_functional_contract(layout, cos_shape):
    """kernels.rotate (Rotary's general path on the Triton kernel): cos/sin broadcast against x[..., :r/2] in x's
    own layout, gradients of x, cos, sin and the Givens angles."""
    g = givens_module(8, True)
    x = torch.randn((B, T, H, D) if layout == "BTHD" else (B, H, T, D), device=DEVICE, requires_grad=True)
    a = torch.randn(cos_shape, device=DEVICE)
    cos, sin = a.cos().requires_grad_(), a.sin().requires_grad_()
    y = kernels.rotate(x, cos, sin, interleaved=True, givens=g.coefficients(), kernel="triton")

    def bthd(t):  # x's layout -> (B, T, H, ...)
        return t if layout == "BTHD" else t.transpose(1, 2)

    angles = g.angles.detach().double().cpu().requires_grad_()
    xd = x.detach().double().requires_grad_()
    cd, sd = cos.detach().double().requires_grad_(), sin.detach().double().requires_grad_()
    shape = x.shape[:-1] + (4,)
    ref = reference(bthd(xd), bthd(cd.expand(shape)), bthd(sd.expand(shape)), True, g, angles)
    close(bthd(y), ref)
    grad = torch.randn_like(ref)
    bthd(y).backward(grad.float())
    ref.backward(grad)
    for got, want in ((x.grad, xd.grad), (cos.grad, cd.grad), (sin.grad, sd.grad), (g.angles.grad, angles.grad)):
        close(got, want, atol=1e-4)


# --- Rotary on the Triton kernel: the table gathered in the kernel, and the general path's kernels.rotate

def _trained(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.5)
    return m


@pytest.mark.parametrize("mixing", [None, "givens", "orthogonal"])
@pytest.mark.parametrize("grad", [False, True])
def test_rotary_forward_and_rotate_qk_on_the_kernel(mixing, grad):
    from rotary import Rotary, rotary_reference

    m = _trained(Rotary(H * D, H, mixing=mixing, interleaved=False, rotary_dim=8).to(DEVICE))
    P = None if m.mixer is None else m.mixing_matrix(torch.float64)
    q = torch.randn(B, H, 3, D, device=DEVICE)
    k = torch.randn(B, 1, T, D, device=DEVICE)  # grouped-query keys, longer than the queries (a cache)
    with torch.set_grad_enabled(grad):
        offsets = torch.tensor([7, 2], device=DEVICE)
        for offset in (9, offsets):
            yq, yk = m.rotate_qk(q, k, offset=offset)
            kpos = (torch.as_tensor(offset, device=DEVICE).view(-1, 1) - (T - 3) + torch.arange(T, device=DEVICE))
            kpos = kpos.expand(B, -1)
            rk = rotary_reference(k.transpose(1, 2), kpos, rotary_dim=8, interleaved=False, mixing=P)
            rq = rotary_reference(q.transpose(1, 2), kpos[:, T - 3 :], rotary_dim=8, interleaved=False, mixing=P)
            close(yq.transpose(1, 2), rq)
            close(yk.transpose(1, 2), rk)
        y = m(q, positions=torch.tensor([4, 0, 30], device=DEVICE))
        close(y.transpose(1, 2), rotary_reference(q.transpose(1, 2), torch.tensor([4, 0, 30]), rotary_dim=8,
                                                  interleaved=False, mixing=P))


def test_rotary_learned_frequencies_and_directions_take_kernel_gradients():
    """cos/sin that depend on parameters go through kernels.rotate: the gradients of the frequency scale (and of
    learned N-D directions) match autograd through the float64 oracle."""
    from rotary import Rotary, rotary_reference
    from rotary.core.reference import rotary_nd_reference

    m = _trained(Rotary(H * D, H, learned_freq=True).to(DEVICE))
    x = torch.randn(B, T, H, D, device=DEVICE, requires_grad=True)
    y = m(x, offset=3, layout="BTHD")
    scale = m.angles.log_freq_scale.detach().double().cpu().requires_grad_()
    P = givens_matrix_reference(m.mixer.planes.cpu(), m.mixer.angles.detach().double().cpu(), D)
    freqs = torch.tensor([10000.0 ** (-2 * i / D) for i in range(D // 2)], dtype=torch.float64) * scale.exp()
    ref = rotary_reference(x.detach().cpu(), torch.arange(3, 3 + T), mixing=P, freqs=freqs)
    close(y.cpu(), ref)
    grad = torch.randn_like(ref)
    y.backward(grad.float().to(DEVICE))
    ref.backward(grad)
    close(m.angles.log_freq_scale.grad.cpu(), scale.grad, atol=1e-4)

    nd = _trained(Rotary(H * D, H, axes=2, directions="mixed", mixing=None).to(DEVICE))
    pos = torch.randint(0, 9, (T, 2), device=DEVICE)
    x = torch.randn(B, H, T, D, device=DEVICE)
    y = nd(x, positions=pos)
    w = nd.angles.directions.weight.detach().double().cpu().requires_grad_()
    ref = rotary_nd_reference(x.transpose(1, 2).cpu(), pos.cpu(), w)
    close(y.transpose(1, 2).cpu(), ref)
    grad = torch.randn_like(ref)
    y.transpose(1, 2).backward(grad.float().to(DEVICE))
    ref.backward(grad)
    close(nd.angles.directions.weight.grad.cpu(), w.grad, atol=1e-4)


def test_empty_inputs_launch_nothing():
    g = givens_module(D, True)
    for shape in [(0, T, H, D), (B, 0, H, D)]:
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        y = kernels.rope(x, COS, SIN, givens=g.coefficients(), layout="BTHD")
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape
    q = torch.randn(B, 0, H, D, device=DEVICE, requires_grad=True)  # no queries, keys from a cache
    k = torch.randn(B, 4, 1, D, device=DEVICE, requires_grad=True)
    yq, yk = kernels.rope(q, COS, SIN, k=k, offset=4, givens=g.coefficients(), layout="BTHD")
    (yq.sum() + yk.square().sum()).backward()
    close(yk, reference(k, COS[:4][None], SIN[:4][None], True, g, g.angles.detach().double().cpu()))
    assert yq.shape == q.shape and k.grad.shape == k.shape and g.angles.grad is not None


def test_compiled_decoder_sees_the_kernel_without_breaks_or_recompiles(fresh_dynamo):
    """torch.compile(fullgraph=True) of a decoder on the kernel: each rotation decomposes into the kernel's launch
    (a ``triton_kernel_wrapper_functional`` node Inductor can schedule: the ops are ``torch.library.triton_op``s),
    one graph for every length once dynamo has marked the length dynamic (second call), eager's outputs and
    gradients."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.testing import CompileCounterWithBackend

    from rotary.integrations.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab=50, dims=32, heads=2, layers=2)).to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("angles"):
                p.normal_()
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    counter = CompileCounterWithBackend(aot_autograd(fw_compiler=keep, bw_compiler=keep))
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for T in (5, 6, 9, 13):
        tokens = torch.randint(0, 50, (2, T), device=DEVICE)
        y = compiled(tokens)
        got = torch.autograd.grad(y.square().sum(), params)
        y_e = model(tokens)
        want = torch.autograd.grad(y_e.square().sum(), params)
        torch.testing.assert_close(y, y_e, atol=1e-5, rtol=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 2  # the first length, then one dynamic graph for all others
    assert len(graphs) == 4  # forward and backward of both frames, each launching the kernel
    assert all(any("triton_kernel_wrapper" in str(n.target) for n in g.graph.nodes) for g in graphs)
