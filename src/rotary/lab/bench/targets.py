"""Every speed target of the project, in one table, and the one function that judges rows against it.

A target names the suite and the ``key`` of the row it judges (a ratio of two medians, see
:mod:`rotary.lab.bench.rows`), the goal and the direction:

- ``"<="`` / ``">="``: the ratio at most / at least ``goal``;
- ``"+-"``: within ``tolerance`` of ``goal`` (a fixed band);
- ``"~"``: within noise of ``goal``: ``|ratio - goal| <= max(tolerance, row.spread)``, the row's spread being the
  larger interquartile range of the two contenders.

The targets were stated for CPU fp32 on a 2-core machine; on other machines the verdicts are informative only.
A suite's row that no target names gets no verdict (context figures).
"""

from __future__ import annotations

from dataclasses import dataclass

from rotary.lab.bench.rows import Row


@dataclass(frozen=True)
class Target:
    name: str  # what it promises, in words
    suite: str
    ratio: str  # the key of the row it judges
    goal: float
    direction: str  # "<=", ">=", "+-", "~"
    tolerance: float = 0.0  # "+-": the band; "~": the least noise allowed

    def describe(self, spread: float | None = None) -> str:
        if self.direction in ("<=", ">="):
            return f"{self.direction} {self.goal:g}"
        band = self.tolerance if self.direction == "+-" else max(self.tolerance, spread or 0.0)
        return f"{self.goal:g} +- {band:.0%}"

    def met(self, value: float, spread: float | None = None) -> bool:
        if self.direction == "<=":
            return value <= self.goal
        if self.direction == ">=":
            return value >= self.goal
        band = self.tolerance if self.direction == "+-" else max(self.tolerance, spread or 0.0)
        return abs(value - self.goal) <= band


TARGETS: list[Target] = [
    # core: the core op and module against the copy floor, rotary-embedding-torch and the original module
    Target("apply_rotary forward / clone", "core", "apply_rotary/clone", 1.2, "<="),
    Target("Rotary(mixing=None) forward+backward / clone", "core", "none/clone", 3, "<="),
    Target("Rotary(mixing=None) / rotary-embedding-torch, forward+backward", "core", "none/rotary-embedding-torch",
           0.1, "<="),
    Target("Rotary(givens) / Rotary(mixing=None), forward+backward", "core", "givens/none", 3, "<="),
    Target("original module / Rotary(givens), forward+backward", "core", "original/givens", 50, ">="),
    # decode: one-token calls against the bare complex multiply, and openai-whisper per token
    Target("Rotary(mixing=None), int offset / bare complex multiply", "decode", "int/bare", 1.5, "<="),
    Target("Rotary(mixing=None), (B,) tensor offset / int offset", "decode", "tensor/int", 1.1, "<="),
    Target("Rotary(mixing='givens') unfolded / bare complex multiply", "decode", "givens/bare", 2.5, "<="),
    Target("openai-whisper per token, installed (givens, unfolded) / stock", "decode", "whisper installed/stock",
           1.06, "<="),
    Target("openai-whisper per token, folded / stock", "decode", "whisper folded/stock", 1.03, "<="),
    # nd: N-D positions against 1-D at the same shape, forward+backward
    Target("N-D axial / 1-D", "nd", "axial/1-D", 1.2, "<="),
    Target("N-D sections / 1-D", "nd", "sections/1-D", 1.2, "<="),
    Target("N-D oblique / 1-D", "nd", "oblique/1-D", 1.2, "<="),
    Target("N-D mixed (learned directions) / 1-D", "nd", "mixed/1-D", 2.0, "<="),
    # decoder: the reference decoder
    Target("training step, attention givens / attention mixing=None", "decoder", "train givens/none", 1.10, "<="),
    Target("incremental decoding, folded givens / plain RoPE", "decoder", "decode folded/plain", 1.0, "~", 0.02),
    Target("rotary time per training step, embedding / attention placement", "decoder", "rotary embedding/attention",
           0.5, "<="),
    # hf: a transformers Llama
    Target("training step, installed / stock", "hf", "train installed/stock", 1.05, "<="),
    Target("generate() tokens/s, folded / stock", "hf", "generate folded/stock", 1.0, "+-", 0.03),
    # lora: LoRA (peft) on the same Llama, rotary installed through PEFT against LoRA alone
    Target("LoRA training step, rotary installed / LoRA alone", "lora", "train installed/lora", 1.05, "<="),
    Target("generate() tokens/s after merge_and_unload, folded / LoRA alone", "lora", "generate folded/merged", 1.0,
           "+-", 0.03),
    # train: the same Llama at hidden 1024 (16 / 8 heads, batch 2 x 512): full fine-tuning and LoRA (paired ratios)
    Target("full fine-tuning step, installed (P on the weights) / stock", "train", "full weights/stock", 1.02, "<="),
    Target("LoRA training step, rotary installed / LoRA alone", "train", "lora installed/lora", 1.03, "<="),
    # hf-whisper: transformers' Whisper
    Target("decoding per token, installed / stock", "hf-whisper", "decode installed/stock", 1.2, "<="),
    Target("training step, installed / stock", "hf-whisper", "train installed/stock", 1.05, "<="),
    # gpu: the Triton kernel on a CUDA device, (8, 4096, 32, 128) bf16 q and k (stated for GPUs, not the CPU)
    Target("Triton forward, bytes moved per second / HBM peak", "gpu", "forward/peak", 0.8, ">="),
    Target("Triton forward+backward / fastest anchor (Liger-Kernel, transformers, flash-attn)", "gpu",
           "fwd+bwd/fastest anchor", 1.1, "<="),
    Target("Triton forward+backward, givens / plain", "gpu", "givens/plain", 1.15, "<="),
    Target("Triton kernel error / tolerance against the float64 reference, every case", "gpu", "error/tolerance",
           1.0, "<="),
]


def find(suite: str, key: str | None) -> Target | None:
    """The target judging row ``key`` of ``suite``, or None."""
    if key is None:
        return None
    return next((t for t in TARGETS if (t.suite, t.ratio) == (suite, key)), None)


def judge(rows: list[Row]) -> list[Row]:
    """Fill ``target`` and ``ok`` of every row a target names (in place; returns the rows)."""
    for row in rows:
        t = find(row.suite, row.key)
        if t is not None and row.value is not None:
            row.target, row.ok = t.describe(row.spread), t.met(row.value, row.spread)
    return rows
