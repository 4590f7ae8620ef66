"""The static kernel report: rotary's Triton kernels and Liger-Kernel's RoPE compiled ahead of time for sm_80 and
sm_90 at the training shape (8, 4096, 32, 128) bf16, q and k, side by side: registers, spills, the share of global
loads and stores that move 128 bits, and SASS instructions per element. No GPU needed; any machine with triton
(and, for its rows, liger-kernel) gives the same table. docs/speed.md carries it.

    PYTHONPATH=src python scripts/kernel_report.py [--out table.md]

Instructions per element: the loop body over head tiles divided by the elements one thread handles per pass (the
prologue, amortised over 16 passes, left out); Liger's kernel has no loop: all its instructions over its
elements per thread (every head of q and k of one token per program).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (it warns otherwise)

import torch

from rotary.core.kernels.triton_aot import TARGETS, compile_launch
from rotary.core.kernels.triton_launch import Variant, aot_launch

B, T, H, D = 8, 4096, 32, 128
WARPS = 4  # triton's default, which both launchers keep

ROWS = [  # (name, variant): the training run's kernels (half layout, table, q and k), then the learned variants
    ("plain fwd", Variant(False, False, "table", 0, False, True)),
    ("plain bwd", Variant(True, False, "table", 0, False, True)),
    ("plain fwd, interleaved", Variant(False, True, "table", 0, False, True)),
    ("plain bwd, interleaved", Variant(True, True, "table", 0, False, True)),
    ("givens fwd", Variant(False, False, "table", 0, True, True)),
    ("givens bwd (dc, ds)", Variant(True, False, "table", 0, True, True, True, False)),
    ("learned freq + givens fwd", Variant(False, False, "given", 0, True, True)),
    ("learned freq + givens bwd (dc, ds, dcos, dsin)", Variant(True, False, "given", 0, True, True, True, True)),
    ("per-head (N-D mixed) fwd", Variant(False, False, "per_head", 0, False, True)),
    ("per-head (N-D mixed) bwd (dcos, dsin)", Variant(True, False, "per_head", 0, False, True, False, True)),
    ("per-head + givens fwd", Variant(False, False, "per_head", 0, True, True)),
    ("per-head + givens bwd (dc, ds, dcos, dsin)", Variant(True, False, "per_head", 0, True, True, True, True)),
]

def _liger(backward: bool):
    """Liger-Kernel's ``_triton_rope`` as its ``rope_forward`` launches it (in place on q and k ``(B, T, H, D)``,
    cos/sin ``(1, T, D)`` in the model's dtype), or None when liger-kernel is not installed."""
    try:
        from liger_kernel.ops.rope import _triton_rope
    except ImportError:
        return None
    q = torch.empty(B, T, H, D, dtype=torch.bfloat16, device="meta")
    cos = torch.empty(1, T, D, dtype=torch.bfloat16, device="meta")
    args = (q, q.stride(1), q, q.stride(1), cos, cos.stride(-2), cos, cos.stride(-2), T)
    meta = dict(bs=B, cos_bs=1, n_qh=H, n_kh=H, hd=D, pad_n_qh=H, pad_n_kh=H, pad_hd=D, pad_rd=D, rd=D,
                BLOCK_SIZE=H, BACKWARD_PASS=backward)
    return _triton_rope, args, meta, 2 * H * D // (WARPS * 32)


def _ours(v: Variant):
    kernel, args, meta = aot_launch(v, torch.bfloat16, B=B, T=T, H=H, D=D)
    return kernel, args, meta, meta["BLOCK_T"] * meta["BLOCK_H"] * meta["BLOCK_D"] // (WARPS * 32)


def table() -> list[str]:
    lines = ["| kernel | registers sm_80 / sm_90 | spills | 128-bit loads | 128-bit stores | elements per thread "
             "per pass | SASS instructions per element |", "|---|---|---|---|---|---|---|"]
    rows = [(f"rotary {name}", _ours(v)) for name, v in ROWS]
    rows += [(f"Liger-Kernel rope {d}", _liger(d == "bwd")) for d in ("fwd", "bwd")]
    for name, launch in rows:
        if launch is None:
            lines.append(f"| {name} | (liger-kernel not installed) | | | | | |")
            continue
        kernel, args, meta, per_thread = launch
        r = {t: compile_launch(kernel, args, meta, target) for t, target in TARGETS.items()}
        r90 = r["sm_90"]
        body = sum(r90.loops) / len(r90.loops) if r90.loops else r90.sass
        spills = ", ".join(f"{t}: {x.stack + x.local} B" for t, x in r.items() if x.spills) or "none"
        lines.append(f"| {name} | {r['sm_80'].regs} / {r90.regs} | {spills} | {r90.wide('loads'):.0%} of "
                     f"{sum(r90.loads.values())} | {r90.wide('stores'):.0%} of {sum(r90.stores.values())} | "
                     f"{per_thread} | {body / per_thread:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()
    lines = table()
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
