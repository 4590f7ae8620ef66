"""``rotary bench``: the contenders side by side, against the copy floor, with real peak memory.

Each (shape, dtype, pass) group times all contenders round-robin in one process, so that machine drift hits all
alike; warm-up runs outside the timed region; devices are synchronised; medians and the interquartile spread
are reported, and every median also as a multiple of a same-size tensor copy.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from rotary.lab.bench.contenders import CONTENDERS, Case, Shape
from rotary.lab.bench.memory import peak_bytes
from rotary.lab.bench.timing import median, spread, sync, time_interleaved

FLOOR = "copy (floor)"
log = logging.getLogger(__name__)


@dataclass
class Record:
    contender: str
    shape: str
    dims: tuple[int, int, int, int]
    offset: int
    dtype: str
    pass_: str
    median_s: float | None
    spread: float | None
    ratio_to_copy: float | None
    peak_bytes: int | None
    error: str | None = None


def shapes(quick: bool) -> list[Shape]:
    if quick:
        return [Shape("decode b1", 1, 1, 12, 64, 4096), Shape("train", 4, 512, 12, 64)]
    return [
        Shape("decode b1", 1, 1, 12, 64, 4096),
        Shape("decode b16", 16, 1, 12, 64, 4096),
        Shape("train", 8, 2048, 12, 64),
    ]


def _runner(case: Case, pass_: str, generator: torch.Generator):
    if pass_ == "forward":
        def run():
            with torch.no_grad():
                case.forward()
        return run
    grads = {}

    def run_fb():
        y = case.forward()
        if "g" not in grads:
            grads["g"] = torch.randn(y.shape, dtype=y.dtype, device=y.device, generator=generator)
        torch.autograd.grad(y, case.inputs, grads["g"], allow_unused=True)

    return run_fb


def run(
    *,
    quick: bool = False,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    contenders: list[str] | None = None,
    device: str | None = None,
    compile: bool = False,
    repeats: int | None = None,
    shape_list: list[Shape] | None = None,
    progress=None,
    log: Callable[[str], None] | None = None,
    seed: int = 0,
) -> list[Record]:
    """Run the benchmark; returns one Record per (contender, shape, dtype, pass).

    Each contender's inputs come from a ``torch.Generator`` seeded with ``seed``; ``log`` receives one line per
    contender skipped because its package is missing (default: a warning through ``logging``).
    """
    log = log or log_warning
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = contenders or list(CONTENDERS)
    if FLOOR not in names:
        names = [FLOOR, *names]
    repeats = repeats or (5 if quick else 15)
    groups = [(s, d, p) for s in (shape_list or shapes(quick)) for d in dtypes for p in ("forward", "forward+backward")]
    records: list[Record] = []
    skipped: set[str] = set()
    floor_times: dict = {}  # (shape, dtype) -> copy times from every group: one floor for both passes
    bar = progress(total=len(groups) * len(names)) if progress else None
    for shape, dtype_name, pass_ in groups:
        dtype = getattr(torch, dtype_name)
        cases, errors = {}, {}
        for name in names:
            if name in skipped:
                continue
            generator = torch.Generator(dev).manual_seed(seed)  # every contender sees the same inputs
            try:
                case = CONTENDERS[name](shape, dtype, dev, generator)
                if compile and name != FLOOR:
                    case = Case(torch.compile(case.forward), case.inputs)
                fn = _runner(case, "forward" if name == FLOOR else pass_, generator)  # the floor: one plain copy
                fn()  # fails here rather than inside the timed loop
                cases[name] = fn
            except ImportError as e:
                skipped.add(name)
                log(f"skipped {name}: not installed ({e.name or e}); pip install 'rotary[bench]'")
            except Exception as e:  # a contender that cannot run this case is reported, not fatal
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        # a contender far slower than the rest (the seed) gets fewer repeats, timed separately
        slow = {n for n, fn in cases.items() if _once(fn, dev) > 0.5}
        times = time_interleaved({n: f for n, f in cases.items() if n not in slow}, device=dev, repeats=repeats)
        if slow:
            times.update(time_interleaved({n: cases[n] for n in slow}, device=dev, repeats=3, warmup=1))
        if FLOOR in times:
            floor_times.setdefault((shape, dtype_name), []).extend(times[FLOOR])
        for name in names:
            if name in skipped:
                continue
            base = dict(contender=name, shape=shape.name, dims=(shape.batch, shape.seq, shape.heads, shape.head_dim),
                        offset=shape.offset, dtype=dtype_name, pass_=pass_)
            if name in errors or name not in times:
                records.append(Record(**base, median_s=None, spread=None, ratio_to_copy=None, peak_bytes=None,
                                      error=errors.get(name, "not run")))
            else:
                m = median(times[name])
                peak = peak_bytes(cases[name], dev) if pass_ == "forward+backward" and name != FLOOR else None
                records.append(Record(**base, median_s=m, spread=spread(times[name]), ratio_to_copy=None,
                                      peak_bytes=peak))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    for r in records:
        pooled = next((t for (sh, dt), t in floor_times.items() if sh.name == r.shape and dt == r.dtype), None)
        if pooled and r.median_s is not None:
            r.ratio_to_copy = r.median_s / median(pooled)
    return records


def log_warning(line: str) -> None:
    log.warning("%s", line)


def _once(fn, device) -> float:
    import time

    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def environment(device: str | None = None) -> dict:
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
    }
    for pkg in ("rotary_embedding_torch", "transformers", "torchtune"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg.replace("_", "-"))
        except Exception:
            env[pkg] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(records: list[Record]) -> str:
    """Markdown, one table per shape: a row per contender and dtype, both passes side by side."""
    out = []
    for shape in dict.fromkeys(r.shape for r in records):
        rows = [r for r in records if r.shape == shape]
        B, T, H, D = rows[0].dims
        out.append(f"**{shape}**: (B, T, H, D) = ({B}, {T}, {H}, {D}), offset {rows[0].offset}\n")
        out.append("| contender | dtype | forward ms | x copy | fwd+bwd ms | x copy | fwd+bwd peak MiB |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        for key in dict.fromkeys((r.contender, r.dtype) for r in rows):
            cells = []
            for pass_ in ("forward", "forward+backward"):
                r = next((r for r in rows if (r.contender, r.dtype, r.pass_) == (*key, pass_)), None)
                if r is None or r.error:
                    cells += [f"n/a ({r.error})" if r else "-", ""]
                else:
                    ratio = f"{r.ratio_to_copy:.2f}" if r.ratio_to_copy is not None else "-"
                    cells += [f"{r.median_s * 1e3:.3f} ±{r.spread:.0%}", ratio]
            r = next((r for r in rows if (r.contender, r.dtype, r.pass_) == (*key, "forward+backward")), None)
            peak = "-" if r is None or r.peak_bytes is None else f"{r.peak_bytes / 2**20:.{1 if r.peak_bytes > 2**20 else 3}f}"
            out.append(f"| {key[0]} | {key[1]} | {' | '.join(cells)} | {peak} |")
        out.append("")
    return "\n".join(out)


def to_json(records: list[Record], path: str, env: dict, decoder: list[dict] | None = None) -> None:
    payload = {"environment": env, "records": [{**asdict(r), "pass": r.pass_} for r in records],
               "decoder": decoder or []}
    for rec in payload["records"]:
        del rec["pass_"]
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def plot(records: list[Record], path: str) -> None:
    """One panel per (shape, pass): bars of the multiple of the copy floor, per contender and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.shape, r.pass_) for r in records}, key=lambda k: (k[0], k[1]))
    dtypes = sorted({r.dtype for r in records})
    names = list(dict.fromkeys(r.contender for r in records))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for ax, (shape, pass_) in zip(axes[:, 0], panels):
        width = 0.8 / len(dtypes)
        for k, dt in enumerate(dtypes):
            vals = []
            for n in names:
                r = next((r for r in records if (r.shape, r.pass_, r.dtype, r.contender) == (shape, pass_, dt, n)), None)
                vals.append(r.ratio_to_copy if r and r.ratio_to_copy else 0.0)
            ax.bar([i + k * width for i in range(len(names))], vals, width, label=dt)
        ax.set_yscale("log")
        ax.set_ylabel("x copy time")
        ax.set_title(f"{shape}, {pass_}", fontsize=9)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DECODER_MODES = {  # name -> DecoderConfig overrides
    "none": {"positional": "none"},
    "learned": {"positional": "learned"},
    "sinusoidal": {"positional": "sinusoidal"},
    "attention, no mixing": {"positional": "rotary", "placement": "attention", "mixing": None},
    "attention, givens": {"positional": "rotary", "placement": "attention", "mixing": "givens"},
    "embedding, givens": {"positional": "rotary", "placement": "embedding", "mixing": "givens"},
}


def decoder_level(*, quick: bool = False, device: str | None = None, repeats: int | None = None,
                  progress=None, seed: int = 0) -> list[dict]:
    """Tokens/s of a training step and of incremental decoding in the reference decoder for each positional
    mode, and the rotary's share of the training step (its forward and backward work, timed on its own).
    Tokens and inputs come from a ``torch.Generator`` seeded with ``seed``."""
    from rotary.lab.bench import decoder_speed as ds
    from rotary.integrations.decoder import Decoder, DecoderConfig

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers, dims, heads, batch, seq, vocab = (2, 128, 4, 4, 128, 1024) if quick else (4, 256, 4, 8, 512, 4096)
    repeats = repeats or (3 if quick else 7)
    generator = torch.Generator(dev).manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=dev, generator=generator)
    prompt, steps = tokens[:, :16], 64
    models = {
        name: Decoder(DecoderConfig(vocab=vocab, ctx=seq + 16 + steps, dims=dims, heads=heads, layers=layers,
                                    **overrides)).to(dev)
        for name, overrides in DECODER_MODES.items()
    }
    bar = progress(total=3) if progress else None
    train = time_interleaved({n: ds.train_step(m, tokens) for n, m in models.items()}, device=dev, repeats=repeats,
                             warmup=1)
    if bar:
        bar.update(1)
    decode = time_interleaved({n: ds.decode(m, prompt, steps) for n, m in models.items()}, device=dev,
                              repeats=repeats, warmup=1)
    if bar:
        bar.update(1)
    work = {}
    for name, m in models.items():
        if m.config.positional == "rotary" and m.config.placement == "embedding":
            work[name] = ds.rotations(m.rotary, [(batch, seq, dims)], dev, generator)
        elif m.config.positional == "rotary":
            work[name] = ds.attention_rotary_work(m, batch, seq, dev, generator)
    rot = time_interleaved({n: f for n, f in work.items()}, device=dev, repeats=repeats, warmup=1)
    if bar:
        bar.update(1)
        bar.close()
    out = []
    for name in models:
        t_train, t_dec = median(train[name]), median(decode[name])
        out.append({
            "mode": name, "layers": layers, "dims": dims, "heads": heads, "batch": batch, "seq": seq,
            "train_step_s": t_train, "train_spread": spread(train[name]),
            "train_tokens_per_s": batch * seq / t_train,
            "decode_s": t_dec, "decode_tokens_per_s": batch * steps / t_dec,
            "rotary_share_of_train_step": (median(rot[name]) / t_train) if name in rot else 0.0,
        })
    return out


def decoder_table(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"**reference decoder**: {r0['layers']} layers, width {r0['dims']}, {r0['heads']} heads; training "
             f"batch {r0['batch']} x {r0['seq']} tokens; decoding a 16-token prompt then 64 tokens\n",
             "| positional mode | train step ms | train tokens/s | decode tokens/s | rotary share of train step |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['train_step_s'] * 1e3:.1f} ±{r['train_spread']:.0%} | "
                     f"{r['train_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.0f} | "
                     f"{r['rotary_share_of_train_step']:.1%} |")
    return "\n".join(lines)
