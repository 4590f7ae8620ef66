"""Property-based tests of the public API against the float64 reference, over combinations nobody listed.

Hypothesis draws a whole configuration at once: head size, heads and grouped-query key heads, rotary_dim,
interleaved or half pairs, every mixing, learned frequencies, every scaling scheme, layout (3-D, ``BTHD``,
``BHTD``), int / 0-d tensor / per-row tensor offsets, int / float / per-row positions, and the input dtype
(float64, float32, bfloat16, float16). Properties:

- ``Rotary.forward`` and ``Rotary.rotate_qk`` equal the float64 reference (``rotary.rotary_reference`` with the
  module's own frequencies and P), within the dtype's rounding; gradients (input and parameters) too;
- ``rotary.apply_rotary`` equals ``rotary.apply_rotary_reference``;
- attention scores depend only on relative position;
- decoding token by token (``forward`` and ``rotate_qk`` with a growing key cache) equals the full sequence;
- N-D positions (``axes`` 2 or 3, every ``directions`` kind) equal ``rotary.reference.rotary_nd_reference``.

Profiles (``ROTARY_HYPOTHESIS=<name>``): ``ci`` (default: derandomized, so every run tries the same cases),
``dev`` (random, more examples) and ``thorough`` (many more, for a local hunt:
``ROTARY_HYPOTHESIS=thorough pytest tests/test_properties.py``). Run with ``--hypothesis-show-statistics`` to
see how many cases each property tried.

Tolerances come from the dtype, never guessed per case: a 16-bit result is rounded once from a float32
computation, so it is within one ulp of the reference (``ulp`` in conftest) plus the float32 error; float32 and
float64 results are within a few machine epsilons of the magnitudes involved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from conftest import ulp
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from rotary import Rotary, apply_rotary, apply_rotary_reference, rotary_reference
from rotary.core.reference import rotary_nd_reference

settings.register_profile("ci", derandomize=True, max_examples=120, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=10_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# applied per test (not settings.load_profile), so that other test files keep their own Hypothesis settings
PROFILE = settings.get_profile(os.environ.get("ROTARY_HYPOTHESIS", "ci"))

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
EPS = {dt: torch.finfo(dt).eps for dt in DTYPES}


def _scalings(rotary_dim: int, original: int = 16) -> list:
    """One rope_parameters dict per scheme the module accepts for this rotary_dim (None: no scaling)."""
    half = rotary_dim // 2
    out = [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "p", "p": 0.5},
           {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": original},
           {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": original,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0},
           {"rope_type": "longrope", "original_max_position_embeddings": original, "factor": 4.0,
            "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [1.0 + 0.5 * i for i in range(half)]}]
    if rotary_dim > 2:
        out += [{"rope_type": "ntk", "factor": 4.0},
                {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": original}]
    return out


@dataclass
class Case:
    module: Rotary
    dtype: torch.dtype
    batch: int
    kv_heads: int
    layout: str  # "3D", "BTHD" or "BHTD"
    where: dict  # the position keyword arguments: offset=... or positions=...
    rows: torch.Tensor  # (B, T) float64 positions every row is at, what ``where`` means

    @property
    def length_dependent(self) -> bool:
        return self.module.angles.scaling is not None and self.module.angles.scaling.depends_on_length


@st.composite
def modules(draw, *, length_dependent: bool = True, attention_factor: bool = True) -> Rotary:
    head_dim = draw(st.integers(2, 9))
    heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    mixings = [None, "givens", "orthogonal"] + (["quaternion"] if head_dim % 3 == 0 else [])
    mixing = draw(st.sampled_from(mixings))
    rotary_dim = draw(st.sampled_from([None, *range(2, head_dim + 1, 2)]))
    r = rotary_dim or head_dim - head_dim % 2
    scalings = [s for s in _scalings(r) if (length_dependent or s is None or s["rope_type"] not in
                                            ("dynamic", "longrope"))
                and (attention_factor or s is None or s["rope_type"] not in ("yarn", "longrope"))]
    scaling = draw(st.sampled_from(scalings))
    m = Rotary(head_dim * heads, heads, mixing=mixing, interleaved=draw(st.booleans()), rotary_dim=rotary_dim,
               learned_freq=draw(st.booleans()), scaling=scaling,
               base=draw(st.sampled_from([None, 500.0])) if scaling is None else None)
    seed = draw(st.integers(0, 2**16))
    with torch.no_grad():  # trained-looking parameters: P far from the identity, frequencies moved
        g = torch.Generator().manual_seed(seed)
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.05 if "freq" in name else 1.0))
    return m


@st.composite
def cases(draw, *, seq=(1, 6), dtypes=DTYPES, **kw) -> tuple[Case, int]:
    m = draw(modules(**kw))
    B, T = draw(st.integers(1, 3)), draw(st.integers(*seq))
    kv_heads = draw(st.sampled_from([h for h in range(1, m.heads + 1) if m.heads % h == 0]))
    layout = draw(st.sampled_from(["3D", "BTHD", "BHTD"]))
    start = draw(st.sampled_from([0, 1, 37, 2040, 5000, 70_000]))  # table, its end, past it, far past
    kind = draw(st.sampled_from(["int", "tensor0", "tensorB", "positionsT", "positionsBT", "float"]))
    steps = torch.arange(T, dtype=torch.float64)
    if kind == "int":
        where, rows = {"offset": start}, (start + steps).expand(B, T)
    elif kind == "tensor0":
        where, rows = {"offset": torch.tensor(start)}, (start + steps).expand(B, T)
    elif kind == "tensorB":
        offs = torch.tensor([start + 3 * b for b in range(B)])
        where, rows = {"offset": offs}, offs.double()[:, None] + steps
    elif kind == "positionsT":
        pos = start + torch.randperm(T + 2, generator=torch.Generator().manual_seed(T))[:T]
        where, rows = {"positions": pos}, pos.double().expand(B, T)
    elif kind == "positionsBT":
        pos = start + torch.arange(B * T).view(B, T) % (T + 1)
        where, rows = {"positions": pos}, pos.double()
    else:  # float positions, e.g. interpolated
        pos = start + 0.25 * torch.arange(B * T, dtype=torch.float32).view(B, T)
        where, rows = {"positions": pos}, pos.double()
    return Case(m, draw(st.sampled_from(dtypes)), B, kv_heads, layout, where, rows), T


def _lengths(case: Case, rows: torch.Tensor) -> list:
    """Per row, the length a length-dependent scheme is evaluated at (the module's documented default)."""
    if not case.length_dependent:
        return [None] * rows.shape[0]
    if "offset" in case.where:
        return [int(r[-1]) + 1 for r in rows]
    return [float(r.max()) + 1 for r in rows]


def reference(m: Rotary, x4: torch.Tensor, rows: torch.Tensor, lengths: list) -> torch.Tensor:
    """float64 ``a R(m) P x`` for x ``(B, T, H, D)``, row by row (each row may have its own length); a is the
    scheme's attention factor on the rotated channels. Differentiable in x and in the module's parameters."""
    P = m.mixing_matrix(torch.float64)
    out = []
    for b in range(x4.shape[0]):
        freqs = m.frequencies(None if lengths[b] is None else torch.tensor(lengths[b], dtype=torch.float64))
        y = rotary_reference(x4[b : b + 1], rows[b], rotary_dim=m.rotary_dim, interleaved=m.interleaved,
                             mixing=P, freqs=freqs)
        r = m.rotary_dim
        out.append(torch.cat([m.angles.attention_factor * y[..., :r], y[..., r:]], dim=-1))
    return torch.cat(out)


def _make(case: Case, T: int, heads: int, g: torch.Generator) -> torch.Tensor:
    """An input in the case's layout and dtype: (B, T, dims), (B, T, H, D) or (B, H, T, D)."""
    m, B = case.module, case.batch
    if case.layout == "3D":
        x = torch.randn(B, T, heads * m.head_dim, generator=g)
    elif case.layout == "BTHD":
        x = torch.randn(B, T, heads, m.head_dim, generator=g)
    else:
        x = torch.randn(B, heads, T, m.head_dim, generator=g)
    return x.to(case.dtype)


def _as_bthd(x: torch.Tensor, case: Case, heads: int) -> torch.Tensor:
    if case.layout == "3D":
        return x.unflatten(-1, (heads, case.module.head_dim))
    return x.transpose(1, 2) if case.layout == "BHTD" else x


def _mixing_error(m: Rotary, dtype: torch.dtype) -> float:
    """Spectral-norm error of P built in the compute dtype of ``dtype`` (float32 for 16-bit inputs), against P
    built in float64 from the same parameters: what a naive low-precision P costs (matrix_exp of a dense
    generator loses a few epsilons per unit of its norm)."""
    if m.mixer is None or dtype == torch.float64:
        return 0.0
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(m.mixing_matrix(torch.float32).double() - m.mixing_matrix(torch.float64),
                                              ord=2))


def _tolerance(ref: torch.Tensor, x4: torch.Tensor, case: Case) -> torch.Tensor:
    """What the dtype allows: one rounding of the result (16-bit) plus a float32-or-better computation's error,
    a few epsilons of the head's norm (a rotation whose cos/sin are rounded to the compute dtype) and the error
    of P built in that dtype."""
    compute = torch.float64 if case.dtype == torch.float64 else torch.float32
    scale = case.module.angles.attention_factor * x4.double().norm(dim=-1, keepdim=True)  # per head vector
    slack = (8 * case.module.head_dim * EPS[compute] + 2 * _mixing_error(case.module, case.dtype)) * scale
    rounding = ulp(ref, case.dtype) if case.dtype in (torch.bfloat16, torch.float16) else 0
    return rounding + slack


def _check(y: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    err = (y.double() - ref).abs()
    bad = err > tol
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {err.numel()} elements off; worst error "
                                 f"{float(err.max()):.3e} where the tolerance is "
                                 f"{float(tol.expand_as(err)[bad].min()):.3e}")


@PROFILE
@given(cases())
def test_forward_equals_the_float64_reference(drawn):
    case, T = drawn
    m = case.module
    note(f"{m!r} dtype={case.dtype} B={case.batch} T={T} kv_heads={case.kv_heads} layout={case.layout} "
         f"where={case.where}")
    heads = m.heads if case.layout == "3D" else case.kv_heads
    x = _make(case, T, heads, torch.Generator().manual_seed(T))
    kw = {} if case.layout == "3D" else {"layout": case.layout}
    y = m(x, **kw, **case.where)
    assert y.shape == x.shape and y.dtype == x.dtype
    x4 = _as_bthd(x, case, heads)
    ref = reference(m, x4, case.rows, _lengths(case, case.rows))
    _check(_as_bthd(y, case, heads), ref, _tolerance(ref, x4, case), "forward")


@PROFILE
@given(cases(dtypes=(torch.float32, torch.float64)))
def test_gradients_equal_the_float64_reference(drawn):
    """Input and parameter gradients, the same upstream gradient pushed through both."""
    case, T = drawn
    m = case.module
    note(f"{m!r} dtype={case.dtype} B={case.batch} T={T} layout={case.layout} where={case.where}")
    heads = m.heads if case.layout == "3D" else case.kv_heads
    g = torch.Generator().manual_seed(T)
    x = _make(case, T, heads, g).requires_grad_()
    kw = {} if case.layout == "3D" else {"layout": case.layout}
    y = m(x, **kw, **case.where)
    up = torch.randn(y.shape, generator=g, dtype=y.dtype)
    params = list(m.parameters())
    grads = torch.autograd.grad(y, [x, *params], up, allow_unused=True)
    xd = x.detach().double().requires_grad_()
    ref = reference(m, _as_bthd(xd, case, heads), case.rows, _lengths(case, case.rows))
    ref_grads = torch.autograd.grad(ref, [xd, *params], _as_bthd(up.double(), case, heads), allow_unused=True)
    # a parameter's gradient is rounded to the parameter's dtype (float32), whatever the input's
    eps = {"x": EPS[case.dtype], **{n: max(EPS[case.dtype], EPS[p.dtype]) for n, p in m.named_parameters()}}
    p_err = 2 * _mixing_error(m, case.dtype)
    # each gradient is a sum over B * T * H terms of size |up| |x| (times the position for frequencies)
    size = float((up.double().abs().sum() + 1) * (x.detach().double().abs().max() + 1))
    reach = float(case.rows.abs().max() + 1) * float(m.frequencies().detach().abs().max())
    for name, got, want, like in zip(["x", *(n for n, _ in m.named_parameters())], grads, ref_grads, [x, *params]):
        got = torch.zeros_like(like, dtype=torch.float64) if got is None else got.double()
        want = torch.zeros_like(like, dtype=torch.float64) if want is None else want.double()
        if name == "x":
            tol = (64 * m.head_dim * eps[name] + p_err) * (float(up.abs().max()) + 1)
        else:
            tol = (64 * m.head_dim * eps[name] + p_err) * size * (1 + (reach if "freq" in name else 0))
        torch.testing.assert_close(got, want, atol=tol, rtol=0, msg=lambda s, name=name: f"grad {name}: {s}")


@PROFILE
@given(cases(seq=(1, 5)), st.integers(0, 4))
def test_rotate_qk_equals_the_float64_reference(drawn, extra):
    """Queries at the last Tq of the keys' positions, keys with any number of heads dividing the queries'; an int
    or tensor offset is the first query's position (the keys start ``Tk - Tq`` before it)."""
    case, Tq = drawn
    m = case.module
    if case.layout == "3D":
        case.layout = "BHTD"  # rotate_qk's default
    Tk = Tq + extra
    B = case.batch
    # keys at start + arange(Tk) (per row for a (B,) offset); the queries are the last Tq of them, so the offset
    # passed (the first query's position) is start + Tk - Tq
    steps = torch.arange(Tk, dtype=torch.float64)
    if "offset" in case.where:
        off = case.where["offset"]
        rows = (off.double()[:, None] if isinstance(off, torch.Tensor) and off.dim() == 1 else
                torch.as_tensor(float(off)).expand(B, 1)) + steps
        where = {"offset": off + extra}
    else:
        pos = case.where["positions"]
        extended = torch.cat([pos.new_zeros(*pos.shape[:-1], extra) + pos.reshape(-1)[0] - 1, pos], dim=-1)
        extended = extended.clamp_min(0)
        where, rows = {"positions": extended}, extended.double().expand(B, Tk)
    note(f"{m!r} dtype={case.dtype} B={B} Tq={Tq} Tk={Tk} kv_heads={case.kv_heads} layout={case.layout} "
         f"where={where}")
    g = torch.Generator().manual_seed(Tk)
    q = _make(Case(m, case.dtype, B, m.heads, case.layout, where, rows), Tq, m.heads, g)
    k = _make(Case(m, case.dtype, B, case.kv_heads, case.layout, where, rows), Tk, case.kv_heads, g)
    q_rot, k_rot = m.rotate_qk(q, k, layout=case.layout, **where)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    if extra and isinstance(where.get("offset"), int):  # an int offset must leave the first key at >= 0
        with pytest.raises(ValueError, match="position of the first query"):
            m.rotate_qk(q, k, layout=case.layout, offset=extra - 1)
    lengths = _lengths(Case(m, case.dtype, B, 0, case.layout, where, rows), rows)
    k4, q4 = _as_bthd(k, case, case.kv_heads), _as_bthd(q, case, m.heads)
    k_ref = reference(m, k4, rows, lengths)
    q_ref = reference(m, q4, rows[:, Tk - Tq :], lengths)
    _check(_as_bthd(k_rot, case, case.kv_heads), k_ref, _tolerance(k_ref, k4, case), "rotate_qk keys")
    _check(_as_bthd(q_rot, case, m.heads), q_ref, _tolerance(q_ref, q4, case), "rotate_qk queries")


@PROFILE
@given(st.integers(1, 3), st.integers(0, 6), st.integers(1, 4), st.integers(1, 5), st.booleans(),
       st.sampled_from(DTYPES), st.booleans(), st.integers(0, 10**6))
def test_apply_rotary_equals_its_reference(B, T, H, half_dim, interleaved, dtype, per_row, start):
    D = 2 * half_dim + (T % 2)  # odd head sizes too: the last channel passes through
    r = 2 * max(1, half_dim - (start % 2))
    g = torch.Generator().manual_seed(start)
    x = torch.randn(B, T, H, D, generator=g).to(dtype)
    rows = start + torch.arange(T, dtype=torch.float64) + (torch.arange(B, dtype=torch.float64)[:, None] if per_row
                                                            else torch.zeros(1, 1, dtype=torch.float64))
    angles = rows[..., None] * 10000.0 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    cos, sin = angles.cos().float(), angles.sin().float()
    if not per_row:
        cos, sin = cos[0], sin[0]
    y = apply_rotary(x, cos, sin, interleaved=interleaved)
    ref = apply_rotary_reference(x, cos, sin, interleaved=interleaved)  # the same float32 table: exact oracle
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 4 * EPS[compute] * x.double().abs().amax(-1, keepdim=True)
    if dtype in (torch.bfloat16, torch.float16):
        tol = tol + ulp(ref, dtype)
    _check(y, ref, tol, "apply_rotary")
    assert torch.equal(y[..., r:], x[..., r:])  # pass-through channels bit-exact


@PROFILE
@given(modules(length_dependent=False), st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 10_000))
def test_scores_depend_only_on_relative_position(m, i, j, shift):
    """<R(i) P q, R(j) P k> = <R(i + s) P q, R(j + s) P k>; in float64, so any difference is the method's."""
    m = m.double()
    g = torch.Generator().manual_seed(i + j)
    q = torch.randn(1, 1, m.heads, m.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, m.heads, m.head_dim, generator=g, dtype=torch.float64)

    def scores(a, b):
        qa = m(q, positions=torch.tensor([a]), layout="BTHD")  # (1, 1, H, D): one token
        return (qa * m(k, positions=torch.tensor([b]), layout="BTHD")).sum(-1)

    bound = m.angles.attention_factor**2 * float(q.norm() * k.norm())
    # angles are exact to ~1e-16 of the position: shifting by s moves them by ~s * 1e-16 rad
    tol = bound * (64 * EPS[torch.float64] * m.head_dim + 4e-16 * (max(i, j) + shift + 1))
    torch.testing.assert_close(scores(i, j), scores(i + shift, j + shift), atol=tol, rtol=0)


@PROFILE
@given(cases(seq=(2, 7), dtypes=(torch.float32, torch.bfloat16)))
def test_incremental_equals_full(drawn):
    """Token by token: ``forward`` on each new token, and ``rotate_qk`` with the whole (unrotated) key cache so
    far, give the full sequence's rotations. Length-dependent schemes get one fixed ``length`` (as a KV cache
    with rotated keys must)."""
    case, T = drawn
    m = case.module
    B = case.batch
    layout = "BTHD"
    start = int(case.rows[0, 0])
    kw = {"length": start + T} if case.length_dependent else {}
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, m.heads, m.head_dim, generator=g).to(case.dtype)
    k = torch.randn(B, T, case.kv_heads, m.head_dim, generator=g).to(case.dtype)
    note(f"{m!r} dtype={case.dtype} B={B} T={T} start={start} kv_heads={case.kv_heads}")
    full = m(q, offset=start, layout=layout, **kw)
    steps = torch.cat([m(q[:, t : t + 1], offset=start + t, layout=layout, **kw) for t in range(T)], dim=1)
    tol = 4 * EPS[torch.float32] * m.head_dim * q.double().norm(dim=-1, keepdim=True)  # a matmul's blocking
    _check(steps, full.double(), tol, "forward, token by token")
    q_full, k_full = m.rotate_qk(q, k, offset=start, layout=layout, **kw)
    for t in range(T):
        q_t, k_t = m.rotate_qk(q[:, t : t + 1], k[:, : t + 1], offset=start + t, layout=layout, **kw)  # the query's
        _check(q_t, q_full[:, t : t + 1].double(), tol[:, t : t + 1], f"rotate_qk query at step {t}")
        _check(k_t, k_full[:, : t + 1].double(), 4 * EPS[torch.float32] * m.head_dim * k[:, : t + 1].double().norm(
            dim=-1, keepdim=True), f"rotate_qk keys at step {t}")


@st.composite
def nd_modules(draw) -> Rotary:
    axes = draw(st.sampled_from([2, 3]))
    head_dim = draw(st.integers(2 * axes, 10))
    heads = draw(st.sampled_from([1, 2, 3]))
    rotary_dim = draw(st.sampled_from([None, *range(2 * axes, head_dim + 1, 2)]))
    pairs = (rotary_dim or head_dim - head_dim % 2) // 2
    kind = draw(st.sampled_from(["axial", "sections", "oblique", "mixed"]))
    sections = None
    if kind == "sections":  # any split of the pairs among the axes, each axis at least one pair
        cuts = sorted(draw(st.lists(st.integers(1, pairs - 1), min_size=axes - 1, max_size=axes - 1, unique=True)))
        sections = [b - a for a, b in zip([0, *cuts], [*cuts, pairs])]
    mixings = [None, "givens", "orthogonal"] + (["quaternion"] if head_dim % 3 == 0 else [])
    m = Rotary(head_dim * heads, heads, mixing=draw(st.sampled_from(mixings)), interleaved=draw(st.booleans()),
               rotary_dim=rotary_dim, axes=axes, directions=kind, sections=sections,
               learned_freq=kind != "mixed" and draw(st.booleans()))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    with torch.no_grad():  # trained-looking parameters
        for name, p in m.named_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.05 if "freq" in name else 0.5))
    return m


def _angle_slack(pos: torch.Tensor, vectors: torch.Tensor, x4: torch.Tensor) -> torch.Tensor:
    """N-D angles are sums <w_i, r> formed in float64 on both sides, each rounding n products and n - 1 sums in its
    own order (a 1-D angle m * w_i is one product both round alike): each side's angle is within n float64
    epsilons of max |w_i| . |r|, which turns a head vector by at most that many radians times its norm."""
    n = pos.shape[-1]
    reach = float(pos.double().abs().max()) * float(vectors.double().abs().sum(-1).max()) if pos.numel() else 0.0
    return 2 * n * EPS[torch.float64] * reach * x4.double().norm(dim=-1, keepdim=True)


@PROFILE
@given(nd_modules(), st.sampled_from(DTYPES), st.integers(1, 3), st.integers(0, 5),
       st.sampled_from(["positionsT", "positionsBT", "float", "offset"]), st.sampled_from(["BTHD", "BHTD", "3D"]),
       st.sampled_from([0, 7, 3000]), st.booleans())
def test_nd_positions_equal_the_float64_reference(m, dtype, B, T, kind, layout, start, grouped):
    """Forward and rotate_qk at N-D positions, pair i of head h turning by <w_i, r>, against the reference."""
    n = m.axes
    g = torch.Generator().manual_seed(T + start)
    if kind == "offset":  # token t at offset + t on every axis (text tokens in M-RoPE)
        where, pos = {"offset": start}, (start + torch.arange(T, dtype=torch.float64))[:, None].expand(T, n)
    elif kind == "float":
        pos = start + 0.5 * torch.randint(0, 40, (B, T, n), generator=g).float()
        where = {"positions": pos}
    else:
        shape = (T, n) if kind == "positionsT" else (B, T, n)
        pos = start + torch.randint(0, 40, shape, generator=g)
        where = {"positions": pos}
    kv = 1 if grouped and m.options.directions != "mixed" else m.heads
    case = Case(m, dtype, B, kv, layout, where, torch.zeros(B, T))
    heads = m.heads if layout == "3D" else kv
    x = _make(case, T, heads, g)
    note(f"{m!r} dtype={dtype} B={B} T={T} kv={kv} layout={layout} where={where}")
    y = m(x, **({} if layout == "3D" else {"layout": layout}), **where)
    x4 = _as_bthd(x, case, heads)
    vectors = m.frequencies().detach()
    if vectors.dim() == 3 and heads != m.heads:
        vectors = vectors[:heads]
    ref = rotary_nd_reference(x4, pos, vectors, interleaved=m.interleaved, mixing=m.mixing_matrix(torch.float64))
    _check(_as_bthd(y, case, heads), ref, _tolerance(ref, x4, case) + _angle_slack(pos, vectors, x4), "N-D forward")
    if m.options.directions == "mixed" and m.heads > 1:  # per-head directions: keys need every head
        k1 = torch.randn(B, 1, T, m.head_dim).to(dtype)
        with pytest.raises(ValueError, match="grouped-query keys"):
            m.rotate_qk(torch.randn(B, m.heads, T, m.head_dim).to(dtype), k1, **where)
    qk_layout = "BTHD" if layout == "BTHD" else "BHTD"
    q = _make(Case(m, dtype, B, m.heads, qk_layout, where, case.rows), T, m.heads, g)
    k = _make(Case(m, dtype, B, kv, qk_layout, where, case.rows), T, kv, g)
    q_rot, k_rot = m.rotate_qk(q, k, layout=qk_layout, **where)
    qc = Case(m, dtype, B, kv, qk_layout, where, case.rows)
    for got, inp, h, what in ((q_rot, q, m.heads, "queries"), (k_rot, k, kv, "keys")):
        x4 = _as_bthd(inp, qc, h)
        w = m.frequencies().detach()
        w = w[:h] if w.dim() == 3 else w
        ref = rotary_nd_reference(x4, pos, w, interleaved=m.interleaved, mixing=m.mixing_matrix(torch.float64))
        _check(_as_bthd(got, qc, h), ref, _tolerance(ref, x4, qc) + _angle_slack(pos, w, x4), f"N-D rotate_qk {what}")
