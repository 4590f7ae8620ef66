"""The Triton kernels compiled ahead of time for real GPUs (sm_80, sm_90) without one: every variant the launcher
can produce compiles, none spills to local memory, none takes more than 128 registers at the training shape, and
the head rows move in 128-bit accesses.

The variants are :data:`rotary.core.kernels.triton_launch.VARIANTS`, the list the launcher looks every launch up
in, so a new switch cannot go untested. The default run compiles the training shape's main variants for sm_90 (a
few seconds each); ``pytest -m aot -s`` (CI: .ci/run) compiles every variant, and the training shape's for both
targets in fp32, bf16 and fp16, full and partial rotary, and prints the register table. Compilation needs triton's
own ptxas, no GPU; the kernels must not be the interpreter's (``TRITON_INTERPRET=1`` unset).
"""

import importlib.util
import inspect
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from rotary.core.kernels import triton_kernel
from rotary.core.kernels.triton_launch import VARIANTS, Variant, aot_launch

if triton_kernel.INTERPRETED:
    pytest.skip("the kernels were decorated under TRITON_INTERPRET=1: nothing to compile", allow_module_level=True)

from rotary.core.kernels.triton_aot import TARGETS, compile_launch

MAX_REGS = 128  # the budget: 128 threads x 128 registers still fit 4 programs (16 warps) on an SM
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _name(v: Variant) -> str:
    trig = v.trig + ("" if v.trig != "table" else ("+offset", "+offsets", "+positions")[v.pos_mode])
    grads = (" dc/ds" if v.need_cs else "") + (" dcos/dsin" if v.need_trig else "")
    return (f"{'bwd' if v.backward else 'fwd'} {'interleaved' if v.interleaved else 'half'} {trig}"
            f"{' givens' if v.givens else ''}{' q+k' if v.has_x2 else ''}{grads}")


def _compile(job):
    v, dtype, rotary_dim, target = job
    kernel, args, constexprs = aot_launch(v, DTYPES[dtype], rotary_dim=rotary_dim)
    return job, compile_launch(kernel, args, constexprs, TARGETS[target])


def test_variants_cover_every_kernel_switch():
    """Every constexpr of both kernels is a Variant field or follows the shape, and the list has no duplicates."""
    shape = {"D", "R2", "BLOCK_T", "BLOCK_H", "BLOCK_D"}
    for kernel, backward in ((triton_kernel.fwd_kernel, False), (triton_kernel.bwd_kernel, True)):
        params = inspect.signature(kernel.fn).parameters.values()
        switches = {p.name for p in params if "constexpr" in str(p.annotation)} - shape
        listed = [v for v in VARIANTS if v.backward == backward]
        assert all(set(v.constexprs()) == switches for v in listed)
    assert len(set(VARIANTS)) == len(VARIANTS) == 160
    # every value of every switch the launcher can set appears
    assert {v.pos_mode for v in VARIANTS if v.trig == "table"} == {0, 1, 2}
    assert {(v.givens, v.need_cs, v.need_trig) for v in VARIANTS if v.backward} == {
        (False, False, False), (False, False, True), (True, False, False), (True, False, True), (True, True, False),
        (True, True, True)}


TRAINING = [  # (8, 4096, 32, 128) bf16, q and k in one launch: the plain kernels and the heaviest Givens ones
    Variant(False, False, "table", 0, False, True),
    Variant(True, False, "table", 0, False, True),
    Variant(False, True, "per_head", 0, True, True),
    Variant(True, True, "per_head", 0, True, True, True, True),
]


@pytest.mark.parametrize("v", TRAINING, ids=_name)
def test_training_shape_compiles_without_spills(v):
    _, r = _compile((v, "bf16", None, "sm_90"))
    assert not r.spills and r.regs <= MAX_REGS, r
    if not (v.givens and v.need_trig):  # (that one takes half the tile: 64-bit accesses)
        assert r.loads.get(128, 0) >= 2, r.loads  # the head rows of q and k
        assert r.stores.get(128, 0) >= 2, r.stores
    if not v.givens:  # all of it: head rows, per-head cos/sin rows, outputs
        assert set(r.stores) == {128}, r.stores


@pytest.mark.aot
def test_every_variant_compiles_without_spills():
    """Every variant in bf16 for sm_90, and the target, dtype and partial-rotary axes (sm_80 / sm_90 x fp32 / bf16
    / fp16 x full / partial) on the training-shape variants, at the training shape: compiles, no spills, at most
    128 registers (CI: about 200 kernels, 3 to 4 minutes on 2 cores). ``ROTARY_AOT=all`` compiles the whole product,
    VARIANTS x dtypes x (full, partial) x targets (1920 kernels, about 30 minutes on 2 cores). Prints one row per
    variant: registers (max over what was compiled) per target, and the share of 128-bit global loads and stores
    in bf16."""
    if os.environ.get("ROTARY_AOT") == "all":
        jobs = [(v, dt, rd, t) for v in VARIANTS for dt in DTYPES for rd in (None, 64) for t in TARGETS]
    else:
        jobs = [(v, "bf16", None, "sm_90") for v in VARIANTS]
        jobs += [(v, dt, rd, t) for v in TRAINING for dt in DTYPES for rd in (None, 64) for t in TARGETS
                 if (dt, rd, t) != ("bf16", None, "sm_90")]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = list(pool.map(_compile, jobs, chunksize=4))
    bad = [(job, r) for job, r in results if r.spills or r.regs > MAX_REGS]
    rows = {}
    for (v, dt, rd, t), r in results:
        row = rows.setdefault(v, {"sm_80": 0, "sm_90": 0, "wide": None})
        row[t] = max(row[t], r.regs)
        if dt == "bf16" and rd is None and t == "sm_90":
            row["wide"] = (r.wide("loads"), r.wide("stores"))
    print(f"\n{len(results)} kernels compiled; registers (max over fp32/bf16/fp16, full/partial rotary):")
    print(f"{'variant':62s} {'sm_80':>5s} {'sm_90':>5s} {'ld128':>6s} {'st128':>6s}")
    for v, row in rows.items():
        print(f"{_name(v):62s} {row['sm_80']:5d} {row['sm_90']:5d} {row['wide'][0]:6.0%} {row['wide'][1]:6.0%}")
    assert not bad, bad[:5]


@pytest.mark.aot
def test_kernel_report_puts_liger_beside_ours():
    """scripts/kernel_report.py, the table docs/speed.md carries: every row compiles, ours without spills and
    within the register budget, Liger-Kernel's rope beside them."""
    pytest.importorskip("liger_kernel")
    path = Path(__file__).resolve().parent.parent / "scripts" / "kernel_report.py"
    spec = importlib.util.spec_from_file_location("kernel_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.table()[2:]]
    ours = [r for r in rows if r[0].startswith("rotary")]
    assert len(ours) == len(report.ROWS) and len(rows) == len(ours) + 2
    for name, regs, spills, *_ in rows:
        assert spills == "none", name
        assert all(int(n) <= MAX_REGS for n in regs.split(" / ")), (name, regs)
