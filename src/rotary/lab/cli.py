"""The ``rotary`` command. Owns printing, seeding and argv; the library itself does none of that."""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time

import torch


def _demo(args: argparse.Namespace) -> int:
    """Checks the promises on generated data, then times Rotary against the original module."""
    from rotary import Rotary, rotary_reference
    from rotary.lab.bench.seed import SeedRotary
    from rotary.lab.bench.timing import median, time_interleaved

    torch.manual_seed(args.seed)
    dims, heads = args.dims, args.heads
    m = Rotary(dims, heads)  # givens mixing, the default
    with torch.no_grad():  # pretend it was trained: non-trivial angles
        m.mixing.angles.uniform_(-3.14, 3.14)
    head_dim = dims // heads
    print(f"{m}\n")

    torch.set_grad_enabled(False)
    x = torch.randn(args.batch, args.seq, dims)
    y = m(x, offset=args.offset)
    ref = rotary_reference(
        x.view(args.batch, args.seq, heads, head_dim),
        torch.arange(args.offset, args.offset + args.seq),
        mixing=m.mixing_matrix(torch.float64),
    ).view_as(x)
    print(f"max |fast - float64 reference|       {float((y.double() - ref).abs().max()):.2e}")

    q, k = torch.randn(2, 1, heads, head_dim), torch.randn(2, 1, heads, head_dim)
    s0 = (m(q, offset=5) * m(k, offset=9)).sum(-1)
    s1 = (m(q, offset=5 + 1000) * m(k, offset=9 + 1000)).sum(-1)
    print(f"score change when both shift by 1000 {float((s0 - s1).abs().max()):.2e}   (relative positions only)")

    steps = torch.cat([m(x[:, t : t + 1], offset=args.offset + t) for t in range(args.seq)], dim=1)
    print(f"max |token-by-token - full|          {float((steps - y).abs().max()):.2e}   (KV-cache decoding is exact)")

    xb = x.to(torch.bfloat16)
    yb = m.to(torch.bfloat16)(xb, offset=100_000)
    refb = rotary_reference(
        xb.view(args.batch, args.seq, heads, head_dim),
        torch.arange(100_000, 100_000 + args.seq),
        mixing=m.mixing_matrix(torch.float64),
    ).view_as(x)
    rel = float(((yb.double() - refb).abs() / refb.abs().clamp_min(1e-3)).median())
    print(f"bf16 at position 100 000: median relative error {rel:.1e} (bf16 rounding is 2^-9 = {2**-9:.1e})")
    m.float()
    torch.set_grad_enabled(True)

    xg = x.clone().requires_grad_()
    seed = SeedRotary(dims, heads)
    plain = Rotary(dims, heads, mixing=None)

    def step(mod, rebuild=False):
        def run():
            if rebuild:
                mod.rebuild()  # the original module cannot backward twice through its cached matrices
            out = mod(xg)
            torch.autograd.grad(out, [xg, *mod.parameters()], torch.ones_like(out))

        return run

    fns = {"Rotary(mixing=None)": step(plain), "Rotary(givens)": step(m), "original module": step(seed, True)}
    times = {k: median(v) for k, v in time_interleaved(fns, device=torch.device("cpu"), repeats=args.repeats).items()}
    print(f"\nforward+backward, x {tuple(x.shape)} fp32, {torch.get_num_threads()} threads, median of {args.repeats}:")
    for name, t in times.items():
        print(f"  {name:22s} {t * 1e3:8.2f} ms   ({t / times['Rotary(givens)']:.2f} x the time of Rotary(givens))")
    return 0


def _machine(device: str) -> str:
    return (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, device {device}")


def _print_sections(sections: list[dict]) -> None:
    """Print what ``rotary.bench.targets.measure`` / ``decoder_speed.measure`` return."""
    from rotary.lab.bench.timing import median, spread

    for section in sections:
        print(f"\n{section['title']}")
        for note in section.get("notes", []):
            print(f"  {note}")
        for name, ts in section["times"].items():
            print(f"  {name:40s} {median(ts) * 1e3:9.2f} ms  (IQR {spread(ts):.0%})")
        for r in section["ratios"]:
            verdict = "" if r.ok is None else f"target {r.target:10s} {'ok' if r.ok else 'MISSED'}"
            print(f"{r.label:62s} {r.value:7.3f}  {verdict}")


def _targets(args: argparse.Namespace) -> int:
    from rotary.lab.bench import targets

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(_machine(device))
    _print_sections(targets.measure(repeats=args.repeats, device=device, seed=args.seed))
    return 0


def _decoder_speed(args: argparse.Namespace) -> int:
    from rotary.lab.bench import decoder_speed as ds

    print(_machine(args.device))
    print(f"decoder: {ds.LAYERS} layers, {ds.DIMS} wide, {ds.HEADS} heads, vocab {args.vocab}; batch {ds.BATCH}, "
          f"seq {ds.SEQ}, fp32")
    _print_sections(ds.measure(repeats=args.repeats, vocab=args.vocab, device=args.device, seed=args.seed))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from rotary.lab.bench import run as bench
    from rotary.lab.bench.contenders import CONTENDERS

    unknown = [c for c in args.contenders or [] if c not in CONTENDERS]
    if unknown:
        print(f"rotary bench: unknown contender(s) {unknown}; choose from {list(CONTENDERS)}", file=sys.stderr)
        return 2
    try:
        from tqdm import tqdm

        def progress(total):
            return tqdm(total=total, desc="bench", unit="case", leave=False)
    except ImportError:
        progress = None
    env = bench.environment(args.device)
    print(", ".join(f"{k} {v}" for k, v in env.items() if v is not None))
    records = bench.run(quick=args.quick, dtypes=tuple(args.dtypes), contenders=args.contenders, device=args.device,
                        compile=args.compile, repeats=args.repeats, progress=progress, seed=args.seed,
                        log=lambda line: print(line, file=sys.stderr))
    print(bench.table(records))
    print("median ± interquartile range / median; 'x copy' = time of a same-size tensor copy (the memory floor)")
    decoder = None
    if not args.no_decoder:
        decoder = bench.decoder_level(quick=args.quick, device=args.device, repeats=args.repeats, progress=progress,
                                      seed=args.seed)
        print("\n" + bench.decoder_table(decoder))
    if args.json:
        bench.to_json(records, args.json, env, decoder)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            bench.plot(records, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("--plot needs matplotlib: pip install 'rotary[plot]'", file=sys.stderr)
            return 2
    return 0


def _compare(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import torch.distributed as dist

    from rotary.lab.experiments.compare import QUICK, QUICK_2D, CompareError, run_comparison
    from rotary.lab.experiments.vision import GridConfig
    from rotary.lab.experiments.data import DataError
    from rotary.lab.experiments.train import TrainConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    rank = dist.get_rank() if world > 1 else 0
    # the library reports unreadable checkpoints through logging: one line each, like the other messages
    logging.basicConfig(format="rotary compare: %(message)s", level=logging.WARNING)
    base = QUICK if args.quick else TrainConfig()
    overrides = {k: getattr(args, k) for k in ("steps", "batch", "length", "dims", "layers") if getattr(args, k)}
    cfg = TrainConfig(**{**base.__dict__, **overrides})
    progress = None
    if rank == 0:
        try:
            from tqdm import tqdm

            def progress(total):
                return tqdm(total=total, unit="step", leave=False, dynamic_ncols=True, mininterval=1.0)
        except ImportError:
            pass
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    seeds_2d = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    try:
        result = run_comparison(tasks=args.tasks, schemes=args.schemes, seeds=seeds, cfg=cfg, out=Path(args.out),
                                data=args.data, resume=args.resume, device=device, progress=progress,
                                schemes_2d=args.schemes_2d, seeds_2d=seeds_2d,
                                cfg_2d=GridConfig(**{**(QUICK_2D if args.quick else GridConfig()).__dict__,
                                                     **({"steps": args.steps_2d} if args.steps_2d else {})}))
    except (CompareError, DataError) as e:
        print(f"rotary compare: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0 and result is not None:
        print(result["markdown"])
        print("\nwrote " + ", ".join(str(f) for f in result["files"]))
        if not any(str(f).endswith(".png") for f in result["files"]):
            print("plots need matplotlib: pip install 'rotary[plot]'", file=sys.stderr)
    return 0


# what --quick takes with all other flags at their defaults, measured on a 2-core AMD EPYC VM (torch 2.13 CPU, other
# jobs sharing it): `rotary compare --quick` 43 s wall clock (tasks text grid digits; 45 s for text lookback copy),
# `rotary bench --quick` 19 s (torchtune not installed)
COMPARE_QUICK = "about 45 s on 2 CPU cores"
BENCH_QUICK = "about 20 s on 2 CPU cores"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rotary", description="Rotary position embeddings with learned rotations.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="check exactness and relative positions on generated data, and time it")
    demo.add_argument("--dims", type=int, default=768)
    demo.add_argument("--heads", type=int, default=12)
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--seq", type=int, default=128)
    demo.add_argument("--offset", type=int, default=37)
    demo.add_argument("--repeats", type=int, default=15)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="speed and peak memory against other RoPE implementations")
    bench.add_argument("--quick", action="store_true", help=f"fewer shapes and repeats ({BENCH_QUICK})")
    bench.add_argument("--json", metavar="PATH", help="write machine-readable results")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--contenders", nargs="+", default=None, metavar="NAME", help="subset of contenders to run")
    bench.add_argument("--compile", action="store_true", help="torch.compile every contender's forward")
    bench.add_argument("--repeats", type=int, default=None)
    bench.add_argument("--no-decoder", action="store_true", help="skip the decoder-level tokens/s section")
    bench.add_argument("--seed", type=int, default=0, help="seed of the generator the random inputs come from")
    bench.set_defaults(func=_bench)
    from rotary.lab.experiments.compare import DEFAULT_TASKS
    from rotary.lab.experiments.data import TASKS
    from rotary.lab.experiments.grid import TASKS_2D
    from rotary.lab.experiments.schemes import SCHEMES, SCHEMES_2D

    cmp = sub.add_parser(
        "compare", help="train small decoders with each positional scheme and compare them",
        description="Train small decoders with each positional scheme and compare them. The --out folder belongs "
        "to one comparison: a start whose settings differ from those it holds is refused (use another --out, or "
        "the same settings with --resume), as is a second process while one runs on it. A checkpoint that "
        "cannot be read (truncated, corrupt) is reported by name and its run restarts from step 0.")
    cmp.add_argument("--schemes", nargs="+", default=list(SCHEMES), metavar="SCHEME",
                     help=f"schemes of the 1-D tasks; default: all of {', '.join(SCHEMES)}")
    cmp.add_argument("--schemes-2d", nargs="+", default=list(SCHEMES_2D), metavar="SCHEME",
                     help=f"schemes of the 2-D tasks (grid, digits); default: all of {', '.join(SCHEMES_2D)}")
    cmp.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=TASKS + TASKS_2D,
                     help=f"default: {' '.join(DEFAULT_TASKS)} (under 15 minutes on 2 CPU cores); the full 1-D "
                     f"comparison is --tasks {' '.join(TASKS)}")
    cmp.add_argument("--seeds", type=int, default=None,
                     help="seeds per scheme (default 3 for 1-D tasks and 5 for 2-D ones; 1 with --quick)")
    cmp.add_argument("--data", default=None, help="a text file or folder for the text task (default: Python's stdlib)")
    cmp.add_argument("--out", default="runs/compare", help="output folder: report.md, results.json, PNGs")
    cmp.add_argument("--resume", action="store_true",
                     help="continue the runs in --out (same settings as the start that made it)")
    cmp.add_argument("--quick", action="store_true", help=f"tiny model, few steps ({COMPARE_QUICK})")
    cmp.add_argument("--device", default=None)
    for name in ("steps", "batch", "length", "dims", "layers"):
        cmp.add_argument(f"--{name}", type=int, default=None, help="override the 1-D tasks' budget")
    cmp.add_argument("--steps-2d", type=int, default=None,
                     help="training steps of the 2-D grid task (digits trains twice as many; default 200)")
    cmp.set_defaults(func=_compare)
    tg = sub.add_parser("targets", help="the core speed targets, measured side by side")
    tg.add_argument("--repeats", type=int, default=15)
    tg.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    tg.add_argument("--seed", type=int, default=0, help="seed of the generator the random inputs come from")
    tg.set_defaults(func=_targets)
    ds = sub.add_parser("decoder-speed", help="the decoder speed targets, measured in the reference decoder")
    ds.add_argument("--repeats", type=int, default=9, help="timed repeats of each contender (median reported)")
    ds.add_argument("--vocab", type=int, default=4096, help="vocabulary size of the benchmark model")
    ds.add_argument("--device", default="cpu")
    ds.add_argument("--seed", type=int, default=0, help="seed of the generator the random inputs come from")
    ds.set_defaults(func=_decoder_speed)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("dims", "heads", "batch", "seq", "repeats", "seeds", "steps", "length", "layers", "vocab",
                 "steps_2d"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    start = time.perf_counter()
    code = args.func(args)
    if code == 0:
        print(f"\ndone in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
