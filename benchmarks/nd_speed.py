"""N-D rotary forward+backward time against 1-D rotary at the same shape (issue 12's speed targets).

    .venv/bin/python benchmarks/nd_speed.py                 # (8, 1024, 12, 64) fp32 on the CPU, 15 repeats
    .venv/bin/python benchmarks/nd_speed.py --axes 3 --repeats 31
"""

from __future__ import annotations

import argparse
import platform

import torch

from rotary.lab.bench.nd_speed import SHAPE, measure
from rotary.lab.bench.timing import median, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=list(SHAPE), metavar=("B", "T", "H", "D"))
    parser.add_argument("--axes", type=int, default=2, choices=[2, 3])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    result = measure(shape=tuple(args.shape), axes=args.axes, repeats=args.repeats, device=args.device, seed=args.seed)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, device {args.device}; x {result['shape']} fp32, forward + backward, median of {args.repeats}")
    for name, ts in result["times"].items():
        print(f"  {name:16s} {median(ts) * 1e3:9.2f} ms  (IQR {spread(ts):.0%})")
    for r in result["ratios"]:
        print(f"{r.label:24s} {r.value:6.3f}  target {r.target:7s} {'ok' if r.ok else 'MISSED'}")


if __name__ == "__main__":
    main()
