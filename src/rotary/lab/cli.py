"""The ``rotary`` command. Owns printing, seeding and argv; the library itself does none of that."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch


def _demo(args: argparse.Namespace) -> int:
    """Checks the promises on generated data, then times Rotary against the original module."""
    from rotary.lab import demo

    torch.manual_seed(args.seed)
    m = demo.trained_looking(args.dims, args.heads)
    print(f"{m}\n")
    x = torch.randn(args.batch, args.seq, args.dims)
    found = demo.checks(m, x, args.offset)
    print(f"max |fast - float64 reference|       {found['reference']:.2e}")
    print(f"score change when both shift by 1000 {found['shift']:.2e}   (relative positions only)")
    print(f"max |token-by-token - full|          {found['incremental']:.2e}   (KV-cache decoding is exact)")
    print(f"bf16 at position {demo.FAR:,}: median relative error {found['bf16']:.1e} (bf16 rounding is 2^-9 = "
          f"{2**-9:.1e})")
    times = demo.timings(m, x, args.repeats)
    print(f"\nforward+backward, x {tuple(x.shape)} fp32, {torch.get_num_threads()} threads, median of {args.repeats}:")
    for name, t in times.items():
        print(f"  {name:22s} {t * 1e3:8.2f} ms   ({t / times['Rotary(givens)']:.2f} x the time of Rotary(givens))")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from rotary.lab.bench import report, suites
    from rotary.lab.bench.contenders import CONTENDERS

    if args.source:
        with open(args.source) as f:
            print(report.rendered(json.load(f), args.suites or None))
        return 0
    try:
        names = suites.expand(args.suites)
    except KeyError as e:
        print(f"rotary bench: {e.args[0]}", file=sys.stderr)
        return 2
    unknown = [c for c in args.contenders or [] if c not in CONTENDERS]
    if unknown:
        print(f"rotary bench: unknown contender(s) {unknown}; choose from {list(CONTENDERS)}", file=sys.stderr)
        return 2
    try:
        from tqdm import tqdm

        def progress(total):
            return tqdm(total=total, desc="kernels", unit="case", leave=False)
    except ImportError:
        progress = None

    def log(line: str) -> None:
        print(f"rotary bench: {line}", file=sys.stderr)

    env = suites.environment(args.device)
    print(", ".join(f"{k} {v}" for k, v in env.items() if v is not None) + "\n")
    rows, seconds = [], {}
    for name in names:
        torch.manual_seed(args.seed)  # for what draws from the global RNG at construction (the original module)
        options = {}
        if name == "kernels":
            options = {"dtypes": tuple(args.dtypes), "contenders": args.contenders, "compile": args.compile,
                       "progress": progress}
        log(f"{name} ...")
        start = time.perf_counter()
        got = suites.run_suite(name, quick=args.quick, device=args.device, seed=args.seed, repeats=args.repeats,
                               log=log, **options)
        seconds[name] = round(time.perf_counter() - start, 1)
        log(f"{name}: {seconds[name]:.0f} s")
        if got:
            print(report.table(got))
        rows += got
    summary = report.verdicts(rows)
    if summary:
        print(summary + ("\n(--quick: a smoke run at tiny shapes; its figures and verdicts mean nothing)"
                         if args.quick else ""))
    if args.json:
        doc = suites.to_json(rows, {**env, "suite_seconds": seconds}, "rotary " + " ".join(args.argv))
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        from rotary.lab.bench.kernels import plot

        if not any(r.suite == "kernels" for r in rows):
            print("rotary bench: --plot draws the kernels suite, which did not run", file=sys.stderr)
            return 2
        try:
            plot(rows, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("--plot needs matplotlib: pip install 'rotary[plot]'", file=sys.stderr)
            return 2
    return 0


def _compare(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import torch.distributed as dist

    from rotary.lab.experiments.compare import QUICK, QUICK_2D, QUICK_EXTEND, CompareError, run_comparison
    from rotary.lab.experiments.data import DataError
    from rotary.lab.experiments.extend import SIZES, ExtendConfig
    from rotary.lab.experiments.train import TrainConfig
    from rotary.lab.experiments.vision import GridConfig

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
    extend_overrides = dict(SIZES[args.extend_size]) if args.extend_size else {}
    extend_overrides.update({k: getattr(args, f"extend_{k}") for k in ("length", "factor", "steps")
                             if getattr(args, f"extend_{k}") is not None})
    if args.extend_rotary_lr is not None:
        extend_overrides["rotary_lr"] = args.extend_rotary_lr
    if args.extend_variants:
        extend_overrides["variants"] = tuple(v for part in args.extend_variants for v in part.split(",") if v)
    if args.seeds is not None:
        extend_overrides["seeds"] = args.seeds
    cfg_extend = ExtendConfig(**{**(QUICK_EXTEND if args.quick else ExtendConfig()).__dict__, **extend_overrides})
    try:
        result = run_comparison(tasks=args.tasks, schemes=args.schemes, seeds=seeds, cfg=cfg, out=Path(args.out),
                                data=args.data, resume=args.resume, device=device, progress=progress,
                                schemes_2d=args.schemes_2d, seeds_2d=seeds_2d,
                                cfg_2d=GridConfig(**{**(QUICK_2D if args.quick else GridConfig()).__dict__,
                                                     **({"steps": args.steps_2d} if args.steps_2d else {})}),
                                cfg_extend=cfg_extend)
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


def _support(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    try:
        import peft  # noqa: F401  (the LoRA checks)
        import transformers
    except ImportError:
        print("rotary support needs transformers and peft: pip install 'rotary[peft]'", file=sys.stderr)
        return 2
    from rotary.lab import support

    known = support.architectures()
    only = [name for part in args.only for name in part.split(",") if name] if args.only else None
    unknown = [name for name in only or [] if name not in known]
    if unknown:
        print(f"rotary support: {unknown} not among transformers {transformers.__version__}'s causal LMs and the "
              f"vision-language models and Whisper it checks; choose from "
              f"{' '.join(known)}", file=sys.stderr)
        return 2
    # tiny models: one thread is several times faster than two (and does not fight other processes for cores)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # every tiny model's load report, unused-weight notes, ...
    transformers.utils.logging.disable_progress_bar()
    names = only or known
    bar = None
    try:
        from tqdm import tqdm

        rows = len(names) + len([n for n in names if n in support.MULTIMODAL and n in support.causal_lms()])
        bar = tqdm(total=rows, unit="model", leave=False, dynamic_ncols=True)
    except ImportError:
        pass

    def progress(row) -> None:
        verdicts = " ".join(f"{mode}={v.status}" for mode, v in row.verdicts.items())
        line = f"{row.label}: {row.state} {verdicts} ({row.seconds:.1f} s)"
        if bar is not None:
            bar.update(1)
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    report = support.sweep(names, seed=args.seed, time_limit=args.time_limit or None, progress=progress)
    if bar is not None:
        bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(support.render(report, command="rotary " + " ".join(args.argv)))
    s = report.summary()
    print(f"{s['architectures']} architectures: {s['built']} build, {s['rope']} RoPE, works end to end: "
          f"default {len(s['works']['default'])}, learned_freq {len(s['works']['learned_freq'])}, "
          f"LoRA {len(s['works']['lora'])}, fold to stock {len(s['fold_works'])}")
    m = s["multimodal"]
    print(f"vision-language models and Whisper: {len(m['works']['default'])} of {m['swept']} work by default, "
          f"learned_freq {len(m['works']['learned_freq'])} ({len(m['refused']['learned_freq'])} refused), "
          f"LoRA {len(m['works']['lora'])}")
    for key in ("p_inert", "freq_inert", "wrong_checkpoint", "refusal_changed_model", "crash", "other_failures",
                "timeout"):
        print(f"{key.replace('_', ' ')}: {', '.join(s[key]) or 'none'}")
    print(f"wrote {out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(support.to_json(report), f, indent=1)
        print(f"wrote {args.json}")
    return 0


# what --quick takes with all other flags at their defaults, measured on a 2-core AMD EPYC VM (torch 2.13 CPU),
# 2026-12-02, nothing else running: `rotary compare --quick` 25 s wall clock (tasks text grid digits; 43-45 s in
# earlier runs with other jobs sharing the machine), `rotary bench --quick` 32 s (every suite, torchtune not
# installed; 19 s before the gpu suite and the suites folded in from benchmarks/)
COMPARE_QUICK = "about 25-45 s on 2 CPU cores"
# `rotary compare --tasks extend --out runs/extend` (16 variants x 3 seeds, small size), same machine, 2026-12-07,
# nothing else running: 216 s wall clock (docs/results.md)
EXTEND_TIME = "--tasks extend alone takes about 4 minutes on 2 CPU cores"
BENCH_QUICK = "about 30 s on 2 CPU cores"
# `rotary support` (200 causal LMs of transformers 5.25 and 5 multimodal models, one thread), same machine,
# 2026-12-07, nothing else running: 189 s for the sweep, 200 s wall clock with the imports
SUPPORT_TIME = "about 3-4 minutes on 2 CPU cores"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rotary", description="Rotary position embeddings with learned rotations.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="check exactness and relative positions on generated data, and time it",
                          description="Check a Rotary with random Givens angles against the float64 reference "
                          "(exactness, relative positions, token-by-token decoding, bf16 far out), then time "
                          "forward+backward against the original module.")
    demo.add_argument("--dims", type=int, default=768, help="model width, heads x head_dim (default: 768)")
    demo.add_argument("--heads", type=int, default=12, help="attention heads (default: 12)")
    demo.add_argument("--batch", type=int, default=8, help="batch size of the generated input (default: 8)")
    demo.add_argument("--seq", type=int, default=128, help="tokens of the generated input (default: 128)")
    demo.add_argument("--offset", type=int, default=37, help="position of the first token (default: 37)")
    demo.add_argument("--repeats", type=int, default=15, help="timed repeats per contender (default: 15)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the global RNG (inputs, the original "
                      "module's planes) (default: 0)")
    demo.set_defaults(func=_demo)
    from rotary.lab.bench.suites import SUITES

    bench = sub.add_parser(
        "bench", help="benchmark suites: speed (and memory) against other implementations, stock models, targets",
        description="Run benchmark suites and judge their ratios against the project's targets "
        "(rotary.lab.bench.targets). Suites: " + "; ".join(f"{k}: {v.help}" for k, v in SUITES.items())
        + "; all: every suite (the default).")
    bench.add_argument("suites", nargs="*", metavar="SUITE", help=f"one or more of: all {' '.join(SUITES)}")
    bench.add_argument("--quick", action="store_true", help=f"smoke run: tiny shapes, few repeats ({BENCH_QUICK})")
    bench.add_argument("--json", metavar="PATH", help="write every row and the environment as JSON")
    bench.add_argument("--from", dest="source", metavar="PATH",
                       help="print a saved --json run (its SUITEs only, if given) instead of running; docs/speed.md's "
                            "tables are this output")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG chart of the kernels suite (needs matplotlib)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; CPU-only suites "
                       "run on the CPU)")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (default: each suite's)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the generators the random inputs come from")
    kernels = bench.add_argument_group("kernels suite")
    kernels.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                         choices=["float32", "bfloat16", "float16"])
    kernels.add_argument("--contenders", nargs="+", default=None, metavar="NAME", help="subset of contenders to run")
    kernels.add_argument("--compile", action="store_true", help="torch.compile every contender's forward")
    bench.set_defaults(func=_bench)
    from rotary.lab.experiments.compare import DEFAULT_TASKS
    from rotary.lab.experiments.data import TASKS
    from rotary.lab.experiments.extend import SIZES, ExtendConfig
    from rotary.lab.experiments.extend_variants import DEFAULT_VARIANTS, VARIANTS
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
    cmp.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=(*TASKS, *TASKS_2D, "extend"),
                     help=f"default: {' '.join(DEFAULT_TASKS)} (under 15 minutes on 2 CPU cores); the full 1-D "
                     f"comparison is --tasks {' '.join(TASKS)}; extend (a pretrained model's context extended by "
                     f"training only its rotary, against zero-shot scaling and LoRA) is not in the default: "
                     f"{EXTEND_TIME}")
    cmp.add_argument("--seeds", type=int, default=None,
                     help="seeds per scheme (default 3 for 1-D tasks and extend, 5 for 2-D ones; 1 with --quick)")
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
    cmp.add_argument("--extend-length", type=int, default=None,
                     help=f"extend: the pretraining length L (default {ExtendConfig.length}; {EXTEND_TIME})")
    cmp.add_argument("--extend-size", choices=list(SIZES), default=None,
                     help="extend: the model and its L: " + "; ".join(
                         f"{k} {v['layers']} layers x {v['dims']} at L = {v['length']}" for k, v in SIZES.items())
                     + " (default small; --extend-length overrides its L)")
    cmp.add_argument("--extend-variants", action="append", metavar="VARIANT[,...]",
                     help=f"extend: the variants to run (repeatable; default {' '.join(DEFAULT_VARIANTS)}; all: "
                     f"{' '.join(VARIANTS)}). A folder grows by more variants or --seeds under --resume")
    cmp.add_argument("--extend-factor", type=int, default=None,
                     help=f"extend: fine-tune at this factor x L, evaluate at 1x, 2x, ... 4 factor x L (default "
                     f"{ExtendConfig.factor})")
    cmp.add_argument("--extend-rotary-lr", type=float, default=None,
                     help=f"extend: peak learning rate of the rotary numbers (default {ExtendConfig.rotary_lr:g})")
    cmp.add_argument("--extend-steps", type=int, default=None,
                     help=f"extend: fine-tuning steps of every trained variant (default {ExtendConfig.steps})")
    cmp.set_defaults(func=_compare)
    sup = sub.add_parser(
        "support", help="check rotary.hf.install on every causal-LM architecture of the installed transformers "
        "(and the vision-language models and Whisper)",
        description="Build every architecture of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (and Qwen2-VL, "
        "Qwen2.5-VL, Qwen3-VL, Gemma 3 multimodal, Whisper) at a tiny size and "
        "check the default install, learned_freq=True, LoRA and the fold to a stock checkpoint end to end; write "
        f"the verdicts as markdown ({SUPPORT_TIME}).")
    sup.add_argument("--only", action="append", metavar="MODEL_TYPE[,...]",
                     help="sweep only these model types (comma-separated; repeatable)")
    sup.add_argument("--out", default="docs/support.md", help="the markdown page to write (default docs/support.md)")
    sup.add_argument("--json", metavar="PATH", help="also write every row and check as JSON")
    sup.add_argument("--time-limit", type=float, default=60.0,
                     help="seconds per architecture, then it is reported as a timeout (0: no limit)")
    sup.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for tiny models)")
    sup.add_argument("--seed", type=int, default=0, help="seed of the weights, tokens and random P")
    sup.set_defaults(func=_support)
    hfx = sub.add_parser(
        "hf-extend", help="extend a Hugging Face Llama's context by training only its rotary frequencies (Trainer, "
        "fold, stock from_pretrained), against zero-shot YaRN",
        description="Pretrain a small byte-level LlamaForCausalLM at L on the text corpus, train only the learned "
        "frequencies at 4L with transformers' Trainer (every pair, and only the pairs whose wavelength is at "
        "least L), fold them to a stock longrope config, reload with a plain from_pretrained, and write the loss "
        "at 1-16 x L against zero-shot YaRN (docs/hf.md; about 5 CPU-minutes).")
    hfx.add_argument("--out", required=True, help="folder for results.json, table.md and models/")
    hfx.add_argument("--quick", action="store_true", help="a smoke run at tiny sizes (its numbers mean nothing)")
    hfx.add_argument("--seed", type=int, default=0, help="seed of the weights, the windows and Trainer")
    hfx.add_argument("--steps", type=int, default=None, help="rotary training steps")
    hfx.add_argument("--lr", type=float, default=None, help="peak learning rate of the log frequency scales")
    hfx.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps at L")
    hfx.set_defaults(func=_hf_extend)
    return parser


def _hf_extend(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from rotary.lab.experiments import hf_extend

    cfg = replace(hf_extend.QUICK if args.quick else hf_extend.HFExtendConfig(), seed=args.seed)
    changed = {"steps": args.steps, "lr": args.lr, "pretrain_steps": args.pretrain_steps}
    cfg = replace(cfg, **{k: v for k, v in changed.items() if v is not None})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = hf_extend.run(cfg, Path(args.out))
    print(hf_extend.table(results))
    print("\nmax |logit| difference per length, stock-reloaded vs installed (cos/sin, folded vs installed):")
    for name, row in results["rows"].items():
        if "max_logit_diff" in row:
            print(f"  {name}: " + ", ".join(f"{n} {d:.1e}" for n, d in row["max_logit_diff"].items())
                  + f" ({row['max_cos_sin_diff']:.1e})")
    print("  stock vs installed untrained (float32 against float64 angles): "
          + ", ".join(f"{n} {d:.1e}" for n, d in results["angle_rounding"].items())
          + f" ({results['angle_rounding_cos_sin']:.1e})")
    print(f"{results['seconds']:.0f} s, torch {results['torch']}, {results['threads']} threads")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("dims", "heads", "batch", "seq", "repeats", "seeds", "steps", "length", "layers", "vocab",
                 "steps_2d", "extend_length", "extend_factor", "extend_steps", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if getattr(args, "extend_rotary_lr", None) is not None and not args.extend_rotary_lr > 0:
        parser.error("--extend-rotary-lr must be positive")
    if getattr(args, "time_limit", None) is not None and args.time_limit < 0:
        parser.error("--time-limit must be 0 (no limit) or positive")
    start = time.perf_counter()
    code = args.func(args)
    if code == 0:
        print(f"\ndone in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
