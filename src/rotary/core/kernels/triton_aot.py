"""Ahead-of-time compilation of a Triton launch for a GPU that need not be there: registers, spills, load widths.

A launch is specialised the way Triton's runtime would specialise it (its own binder: pointer alignment, integers
divisible by 16 or equal to 1), from arguments that may be meta tensors (no memory), then compiled for a
:class:`triton.backends.compiler.GPUTarget` with the ptxas that ships in the triton wheel; ``cuobjdump -res-usage``
reads the registers and local memory (spills) of the cubin, and the PTX gives the width of every global load and
store (stack or local memory above 0 is a spill). :func:`rotary.core.kernels.triton_launch.aot_launch` builds the
launch of any variant; tests/test_triton_aot.py and scripts/kernel_report.py compile them here and print what comes back
(this module never prints). The kernels must be compiled ones (not decorated under ``TRITON_INTERPRET=1``), and
triton's private ``JITFunction._pack_args`` turns the binder's specialisation into compile arguments
(triton 3.x).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

__all__ = ["TARGETS", "Report", "compile_launch"]

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}

# `ld.global.nc.v4.b32 {...}, [...]`: the op, then dotted modifiers, among them the vector count and the type
_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)+)")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SASS = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", flags=re.M)  # /*0e50*/  @!P4 BRA 0x940 ;


@dataclass(frozen=True)
class Report:
    """What one compiled kernel uses. loads/stores: ``{bits per instruction: count}`` over the PTX's global loads
    and stores (a ``v4.b32`` moves 128 bits); sass: instructions in the cubin; loops: instructions in each of its
    loop bodies (a backward branch), in order."""

    regs: int
    stack: int
    local: int
    shared: int
    loads: dict[int, int]
    stores: dict[int, int]
    sass: int
    loops: tuple[int, ...]

    @property
    def spills(self) -> bool:
        return self.local > 0 or self.stack > 0

    def wide(self, kind: str = "loads") -> float:
        """The share of global loads (or stores) that move 128 bits."""
        counts = getattr(self, kind)
        return counts.get(128, 0) / max(sum(counts.values()), 1)


def _bits(modifiers: str) -> int:
    vec, bits = 1, 0
    for m in modifiers.split(".")[1:]:
        if m in ("v2", "v4", "v8"):
            vec = int(m[1:])
        elif re.fullmatch(r"[bfsu](8|16|32|64)", m):
            bits = int(m[1:])
    return vec * bits


def _widths(ptx: str, op: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for o, mods in _ACCESS.findall(ptx):
        if o == op:
            out[_bits(mods)] = out.get(_bits(mods), 0) + 1
    return dict(sorted(out.items()))


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_launch(kernel, args: tuple, constexprs: dict, target: GPUTarget) -> Report:
    """Compile ``kernel[grid](*args, **constexprs)`` for ``target`` as the runtime would, and read its use."""
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise TypeError(f"{kernel!r} is not a compiled Triton kernel (decorated under TRITON_INTERPRET=1?)")
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **constexprs)
    options, signature, consts, attrs = kernel._pack_args(backend, constexprs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, consts, attrs), target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True)
    regs, stack, shared, local = (int(v) for v in _RES.search(res.stdout).groups())
    ptx = compiled.asm["ptx"]
    instructions = [(int(addr, 16), text) for addr, text in _SASS.findall(sass.stdout)]
    loops = []
    for addr, text in instructions:
        branch = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < addr:  # (the self-branch that ends a cubin is no loop)
            loops.append((addr - int(branch.group(1), 16)) // 16 + 1)
    return Report(regs, stack, local, shared, _widths(ptx, "ld"), _widths(ptx, "st"), len(instructions), tuple(loops))
