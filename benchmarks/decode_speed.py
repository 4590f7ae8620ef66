"""Decode-time cost of the rotary: per call at one-token shapes, and openai-whisper per token (issue 14's targets).

    .venv/bin/python benchmarks/decode_speed.py                  # both parts (whisper: 50, 200, 440 tokens)
    .venv/bin/python benchmarks/decode_speed.py --part calls     # only the per-call timings (seconds)
    .venv/bin/python benchmarks/decode_speed.py --lengths 50 200 --repeats 3

Run it alone on the machine: two torch processes on few cores slow each other unpredictably.
"""

from __future__ import annotations

import argparse
import platform

import torch

from rotary.lab.bench.decode import per_call, whisper_decode

TARGETS = {  # (batch-independent) per-call targets: contender -> (column, bound)
    "Rotary(mixing=None), int offset": ("x_bare", 1.5),
    "Rotary(mixing=None), (B,) tensor offset": ("x_int_offset", 1.1),
    "Rotary(mixing='givens'), unfolded": ("x_bare", 2.5),
}
WHISPER_TARGETS = {"folded": 1.03, "installed (givens, unfolded)": 1.06}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["calls", "whisper", "both"], default="both")
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 440])
    parser.add_argument("--repeats", type=int, default=5, help="whisper decodes per model and length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    if args.part in ("calls", "both"):
        print("\nper call, one token, 12 heads x 64, offset 4096, inference_mode (median of 15 x 200 calls):")
        for r in per_call(seed=args.seed):
            target = TARGETS.get(r["contender"])
            verdict = ""
            if target:
                value = r[target[0]]
                verdict = f"  {target[0]} {value:.2f} (target <= {target[1]}: {'ok' if value <= target[1] else 'MISSED'})"
            print(f"  B={r['batch']:<3d} {r['contender']:42s} {r['us']:8.1f} us  x bare {r['x_bare']:5.2f}"
                  f"  IQR {r['spread']:.0%}{verdict}")
    if args.part in ("whisper", "both"):
        print(f"\nopenai-whisper, 4 text layers x 384, greedy, ms per token (median of {args.repeats}):")
        rows = whisper_decode(lengths=tuple(args.lengths), repeats=args.repeats, seed=args.seed)
        for r in rows:
            bound = WHISPER_TARGETS.get(r["model"])
            verdict = f" (target <= {bound}: {'ok' if r['x_stock'] <= bound else 'MISSED'})" if bound else ""
            print(f"  {r['tokens']:4d} tokens  {r['model']:30s} {r['ms_per_token']:7.2f} ms  x stock "
                  f"{r['x_stock']:.3f}{verdict}  IQR {r['spread']:.0%}")


if __name__ == "__main__":
    main()
