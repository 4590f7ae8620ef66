"""rotary.hf speed against stock transformers (Llama, CPU float32): prints a table; numbers from rotary.bench.hf_speed.

    python benchmarks/hf_speed.py              # the issue's setting: 4 layers, hidden 256, 4 heads, 2 kv heads, 8 x 512
    python benchmarks/hf_speed.py --quick      # a seconds-long smoke run (sizes too small to mean anything)

Targets: a training step with givens installed <= 1.05x stock; generate() tokens/s after fold 0.97-1.03x stock.
Run it on a quiet machine: the contenders differ by a few percent.
"""

import argparse
import json

import torch

from rotary.lab.bench.hf_speed import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (checks that it runs)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per contender (default 9, quick 3)")
    parser.add_argument("--mixing", default="givens", choices=["givens", "orthogonal"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON instead of a table")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    quick = dict(layers=2, hidden=64, heads=4, kv_heads=2, vocab=512, batch=2, seq=64, new_tokens=16)
    sizes = quick if args.quick else {}
    repeats = args.repeats or (3 if args.quick else 9)
    result = measure(mixing=args.mixing, repeats=repeats, warmup=1 if args.quick else 2, seed=args.seed, **sizes)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    setup = result["setup"]
    print(f"rotary.hf speed: {json.dumps({k: v for k, v in setup.items() if k != 'machine'})}")
    print(f"machine: {setup['machine']}")
    print(f"{'contender':<22}{'median ms':>12}{'spread':>9}{'tokens/s':>11}")
    for name, ms in result["median"].items():
        tps = result["tokens_per_s"].get(name)
        print(f"{name:<22}{ms * 1e3:>12.2f}{result['spread'][name]:>9.1%}{'' if tps is None else f'{tps:.1f}':>11}")
    targets = {"train_installed_over_stock": "<= 1.05", "generate_folded_over_stock": "0.97-1.03"}
    for name, value in result["ratios"].items():
        print(f"{name:<32}{value:>7.3f}  target {targets.get(name, '(context)')}")


if __name__ == "__main__":
    main()
