"""The core issue's speed targets, measured side by side in one process.

    python -m rotary.bench.targets [--repeats N]

Prints each ratio with its target. fp32 on whatever device is present (the targets are stated for a 2-core CPU).
"""

from __future__ import annotations

import argparse
import platform

import torch

from rotary import Rotary, apply_rotary
from rotary.bench.seed import SeedRotary
from rotary.bench.timing import median, spread, time_blocked, time_interleaved


def _fwd_bwd(fn, x, params):
    g = torch.randn_like(x)

    def run():
        y = fn(x)
        torch.autograd.grad(y, [x, *params], g)

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}")

    B, T, H, D = 8, 2048, 12, 64
    x = torch.randn(B, T, H, D, device=device)
    plain = Rotary(H * D, H, mixing=None).to(device)
    givens = Rotary(H * D, H).to(device)
    with torch.no_grad():
        givens.mixing.angles.normal_()
    cos, sin = plain.cos_cached[:T], plain.sin_cached[:T]
    xg = x.clone().requires_grad_()
    fns = {
        "clone": lambda: x.clone(),
        "apply_rotary fwd": lambda: apply_rotary(x, cos, sin),
        "Rotary(None) fwd+bwd": _fwd_bwd(plain, xg, []),
        "Rotary(givens) fwd+bwd": _fwd_bwd(givens, xg, list(givens.parameters())),
    }
    try:
        from rotary_embedding_torch import RotaryEmbedding

        ret = RotaryEmbedding(dim=D).to(device)
        xt = x.transpose(1, 2).contiguous().requires_grad_()  # its layout: (B, H, T, D)
        fns["rotary-embedding-torch fwd+bwd"] = _fwd_bwd(ret.rotate_queries_or_keys, xt, [])
    except ImportError:
        print("rotary-embedding-torch not installed: skipped (pip install 'rotary[bench]')")
    res = time_interleaved(fns, device=device, repeats=args.repeats)
    t = {k: median(v) for k, v in res.items()}
    for name, v in t.items():
        print(f"  {name:34s} {v * 1e3:9.2f} ms  (IQR {spread(res[name]):.0%})")

    def ratio(label, a, b, target, le=True):
        r = t[a] / t[b]
        ok = r <= target if le else r >= target
        print(f"{label:58s} {r:7.3f}  target {'<=' if le else '>='} {target:<5}  {'ok' if ok else 'MISSED'}")

    print(f"\n(B, T, H, D) = {(B, T, H, D)}, fp32")
    ratio("apply_rotary fwd / clone", "apply_rotary fwd", "clone", 1.2)
    ratio("Rotary(None) fwd+bwd / clone", "Rotary(None) fwd+bwd", "clone", 3)
    if "rotary-embedding-torch fwd+bwd" in t:
        ratio("Rotary(None) fwd+bwd / rotary-embedding-torch fwd+bwd", "Rotary(None) fwd+bwd",
              "rotary-embedding-torch fwd+bwd", 0.1)
    ratio("Rotary(givens) fwd+bwd / Rotary(None) fwd+bwd", "Rotary(givens) fwd+bwd", "Rotary(None) fwd+bwd", 3)

    B, T, dims, H = 8, 512, 768, 12
    x = torch.randn(B, T, dims, device=device, requires_grad=True)
    ours = Rotary(dims, H).to(device)
    seed = SeedRotary(dims, H).to(device)

    def seed_step():
        seed.rebuild()  # the document's module cannot run backward twice on its cached matrices
        y = seed(x)
        torch.autograd.grad(y, [x, seed.theta], torch.ones_like(y))

    fns = {"seed fwd+bwd": seed_step, "Rotary(givens) fwd+bwd": _fwd_bwd(ours, x, list(ours.parameters()))}
    reps = max(3, args.repeats // 3)
    print(f"\n(B, T, dims, H) = {(B, T, dims, H)}, fp32")
    for label, timer in (("round-robin", time_interleaved), ("each in its own block", time_blocked)):
        res = timer(fns, device=device, repeats=reps)
        t = {k: median(v) for k, v in res.items()}
        for name, v in t.items():
            print(f"  {name:34s} {v * 1e3:9.2f} ms  (IQR {spread(res[name]):.0%})  [{label}]")
        ratio(f"seed fwd+bwd / Rotary(givens) fwd+bwd, {label}", "seed fwd+bwd", "Rotary(givens) fwd+bwd", 50, le=False)


if __name__ == "__main__":
    main()
