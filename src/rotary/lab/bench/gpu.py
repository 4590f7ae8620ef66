"""Suite ``gpu``: the Triton kernel against the torch path and the GPU anchors, in GB/s against the device's peak.

Shapes: q and k ``(B, H, T, D)`` each (Hugging Face's layout, what Liger-Kernel and transformers take; flash-attn
gets its own ``(B, T, H, D)``). Training: (8, 4096, 32, 128) bf16, forward and forward+backward, plain RoPE and
Givens mixing; decode: batch 1 and 64, one token at position 8192. Contenders: the Triton kernel (one launch for
q and k, cos/sin gathered from the table inside it), the torch path (:func:`rotary.core.kernels.rotate` on
gathered cos/sin), ``torch.compile`` of it, Liger-Kernel's ``liger_rotary_pos_emb``, transformers'
``apply_rotary_pos_emb`` and flash-attn's Triton ``apply_rotary_emb``, each where importable (one logged line
otherwise).

GB/s counts the bytes a pass must move at least: forward reads q, k and writes them rotated; backward reads their
gradients and writes the inputs' (and reads q, k again where the Givens angles take a gradient). The device's
peak is ``2 x memory clock x bus width`` from the CUDA device properties. A correctness pass first checks the
kernel against the float64 reference on small odd shapes (error / tolerance, at most 1).

Without a CUDA device the suite logs "skipped: no CUDA device" and returns no rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rotary.lab.bench.rows import Row, ratio_row
from rotary.lab.bench.timing import median, spread, time_interleaved

SUITE = "gpu"
ANCHORS = ("Liger-Kernel", "transformers", "flash-attn")
_LOOP = 10  # calls per timed repeat: a ~0.3 ms kernel timed alone would measure the synchronisation


def peak_bytes_per_s(device: torch.device) -> float | None:
    p = torch.cuda.get_device_properties(device)
    clock, width = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)  # kHz, bits
    return 2 * clock * 1e3 * width / 8 if clock and width else None


def _table(rows: int, D: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    from rotary.core.frequencies import inverse_frequencies, rotary_angles

    positions = torch.arange(rows, device=device, dtype=torch.float64)
    angles = rotary_angles(positions, inverse_frequencies(D, 10000.0, device=device, dtype=torch.float64))
    return angles.cos().float(), angles.sin().float()


def _givens(D: int, device, generator):
    from rotary.core.mixing import GivensMixing

    g = GivensMixing(D, [(i, i + D // 2) for i in range(D // 2)]).to(device)  # half layout's RoPE pairs avoided
    with torch.no_grad():
        g.angles.normal_(std=0.1, generator=generator)
    return g


def _contenders(B, H, T, D, offset, dtype, device, generator, mix: bool, log) -> dict[str, tuple[Callable, list]]:
    """name -> (forward returning (q, k) rotated, the tensors backward differentiates)."""
    from rotary.core import kernels

    cos_t, sin_t = _table(offset + T, D, device)

    def qk(layout="bhtd"):
        size = (B, H, T, D) if layout == "bhtd" else (B, T, H, D)
        return [torch.randn(size, dtype=dtype, device=device, generator=generator, requires_grad=True)
                for _ in range(2)]

    g = _givens(D, device, generator) if mix else None
    params = [] if g is None else [g.angles]
    out: dict[str, tuple[Callable, list]] = {}
    q, k = qk()
    out["triton"] = (lambda: kernels.rope(q, cos_t, sin_t, k=k, interleaved=False, layout="BHTD", offset=offset,
                                         givens=None if g is None else g.coefficients()), [q, k, *params])
    cos_b, sin_b = cos_t[offset : offset + T][:, None], sin_t[offset : offset + T][:, None]  # (T, 1, r/2)
    qt, kt = qk("bthd")

    def torch_path():
        c = None if g is None else g.coefficients()
        return (kernels.rotate(qt, cos_b, sin_b, interleaved=False, givens=c, kernel="torch"),
                kernels.rotate(kt, cos_b, sin_b, interleaved=False, givens=c, kernel="torch"))

    out["torch path"] = (torch_path, [qt, kt, *params])
    out["torch.compile(torch path)"] = (torch.compile(torch_path), [qt, kt, *params])
    if mix:  # the anchors apply no learned rotation: they are compared with plain RoPE only
        return out
    full_cos = torch.cat([cos_b[:, 0], cos_b[:, 0]], -1).to(dtype)[None]  # (1, T, D): HF's duplicated halves
    full_sin = torch.cat([sin_b[:, 0], sin_b[:, 0]], -1).to(dtype)[None]
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        ql, kl = qk()
        out["Liger-Kernel"] = (lambda: liger_rotary_pos_emb(ql, kl, full_cos, full_sin), [ql, kl])
    except ImportError:
        log("gpu: skipped Liger-Kernel: not installed (pip install liger-kernel)")
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        qh, kh = qk()
        out["transformers"] = (lambda: apply_rotary_pos_emb(qh, kh, full_cos, full_sin), [qh, kh])
    except ImportError:
        log("gpu: skipped transformers: not installed")
    try:
        from flash_attn.layers.rotary import apply_rotary_emb

        qf, kf = qk("bthd")
        cf, sf = cos_t[offset : offset + T], sin_t[offset : offset + T]
        out["flash-attn"] = (lambda: (apply_rotary_emb(qf, cf, sf), apply_rotary_emb(kf, cf, sf)), [qf, kf])
    except ImportError:
        log("gpu: skipped flash-attn: not installed")
    return out


def _runner(forward: Callable, inputs: list, pass_: str, generator) -> Callable[[], None]:
    if pass_ == "forward":
        def run():
            with torch.no_grad():
                for _ in range(_LOOP):
                    forward()
        return run
    grads = {}

    def run_fb():
        for _ in range(_LOOP):
            q, k = forward()
            if "g" not in grads:
                grads["g"] = [torch.randn(t.shape, dtype=t.dtype, device=t.device, generator=generator) for t in (q, k)]
            torch.autograd.grad([q, k], inputs, grads["g"], allow_unused=True)

    return run_fb


def _speed_rows(name, B, H, T, D, offset, dtype, device, seed, repeats, log, peak) -> tuple[list[Row], dict]:
    rows, all_times = [], {}
    n = 2 * B * H * T * D * torch.finfo(dtype).bits // 8  # bytes of q and k
    for mix in (False, True):
        generator = torch.Generator(device).manual_seed(seed)
        contenders = _contenders(B, H, T, D, offset, dtype, device, generator, mix, log)
        for pass_ in ("forward", "forward+backward"):
            section = f"{name}: q, k (B, H, T, D) = {(B, H, T, D)}, offset {offset}, {pass_}, " + (
                "givens" if mix else "plain")
            fns, errors = {}, {}
            for cname, (forward, inputs) in contenders.items():
                try:
                    fn = _runner(forward, inputs, pass_, generator)
                    fn()  # compiles, and fails here rather than inside the timed loop
                    fns[cname] = fn
                except Exception as e:
                    errors[cname] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            times = time_interleaved(fns, device=device, repeats=repeats)
            times = {c: [t / _LOOP for t in ts] for c, ts in times.items()}
            moved = 2 * n if pass_ == "forward" else (4 * n + (n if mix else 0))
            for cname in contenders:
                info = {"dims": [B, H, T, D], "offset": offset, "dtype": str(dtype), "pass": pass_, "givens": mix}
                row = Row(SUITE, section, cname, None, "us", device=str(device), info=info,
                          extra={"GB/s": None, "of peak": None})
                if cname in times:
                    ts = times[cname]
                    row.value, row.spread = median(ts) * 1e6, spread(ts)
                    gbs = moved / median(ts)
                    row.extra["GB/s"] = round(gbs / 1e9, 1)
                    row.extra["of peak"] = None if peak is None else round(gbs / peak, 3)
                else:
                    row.error = errors.get(cname, "not run")
                rows.append(row)
            all_times[(mix, pass_)] = (section, times, moved)
    return rows, all_times


def _judged(times: dict, peak: float | None, device) -> list[Row]:
    """The rows the targets judge, at the training shape."""
    out = []
    section, t, moved = times[(False, "forward")]
    if "triton" in t and peak is not None:
        out.append(Row(SUITE, section, "triton forward / HBM peak", moved / median(t["triton"]) / peak, "x",
                       spread(t["triton"]), key="forward/peak", device=str(device)))
    section, t, _ = times[(False, "forward+backward")]
    anchors = [a for a in ANCHORS if a in t]
    if "triton" in t and anchors:
        fastest = min(anchors, key=lambda a: median(t[a]))
        out.append(ratio_row(SUITE, section, f"triton / fastest anchor ({fastest})", t, "triton", fastest,
                             device=str(device), key="fwd+bwd/fastest anchor"))
    section_g, tg, _ = times[(True, "forward+backward")]
    if "triton" in t and "triton" in tg:
        both = {"givens": tg["triton"], "plain": t["triton"]}
        out.append(ratio_row(SUITE, section_g, "triton givens / triton plain", both, "givens", "plain",
                             device=str(device), key="givens/plain"))
    return out


def _correctness(device, seed) -> list[Row]:
    """Max |kernel - float64 reference| / tolerance over layouts, dtypes, Givens and a partial rotary dim."""
    from rotary.core import kernels
    from rotary.core.reference import apply_rotary_reference, givens_matrix_reference

    generator = torch.Generator(device).manual_seed(seed)
    rows = []
    B, T, H, D = 3, 37, 5, 72
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)):
        for interleaved in (True, False):
            for mix in (False, True):
                r = D - 8
                x = torch.randn(B, T, H, D, device=device, generator=generator).to(dtype)
                angles = torch.rand(64, r // 2, device=device, generator=generator) * 100
                cos, sin = angles.cos(), angles.sin()
                pairs = [(2 * i, 2 * i + 1) for i in range(r // 2)] if interleaved else [
                    (i, i + r // 2) for i in range(r // 2)]
                from rotary.core.mixing import GivensMixing

                g = GivensMixing(D, pairs).to(device) if mix else None
                if g is not None:
                    with torch.no_grad():
                        g.angles.normal_(generator=generator)
                with torch.no_grad():
                    y = kernels.rope(x.transpose(1, 2), cos, sin, layout="BHTD", interleaved=interleaved, offset=11,
                                    givens=None if g is None else g.coefficients()).transpose(1, 2)
                xd = x.double()
                if g is not None:
                    P = givens_matrix_reference(g.planes.cpu(), g.angles.detach().cpu(), D).to(device)
                    xd = torch.einsum("de,bthe->bthd", P, xd)
                ref = apply_rotary_reference(xd, cos[11 : 11 + T].double(), sin[11 : 11 + T].double(),
                                             interleaved=interleaved)
                err = ((y.double() - ref).abs() / (tol * (1 + ref.abs()))).max().item()
                name = f"{str(dtype).split('.')[-1]}, {'interleaved' if interleaved else 'half'}, " + (
                    "givens" if mix else "plain")
                rows.append(Row(SUITE, f"correctness: {name}", "error / tolerance", err, "x", key="error/tolerance",
                                device=str(device), info={"dtype": str(dtype), "interleaved": interleaved,
                                                          "givens": mix}))
    return rows


def suite(*, quick: bool, device: torch.device, seed: int, repeats: int | None, log, **options) -> list[Row]:
    if device.type != "cuda" or not torch.cuda.is_available():
        log("skipped suite gpu: no CUDA device")
        return []
    import triton  # noqa: F401  (ImportError: the runner logs the missing package)

    repeats = repeats or (2 if quick else 20)
    peak = peak_bytes_per_s(device)
    rows = _correctness(device, seed)
    train = (2, 4, 64, 32) if quick else (8, 32, 4096, 128)
    speed, times = _speed_rows("training", *train, 0, torch.bfloat16, device, seed, repeats, log, peak)
    rows += speed + _judged(times, peak, device)
    for batch in (1, 64):
        speed, _ = _speed_rows(f"decode b{batch}", batch, 4 if quick else 32, 1, 32 if quick else 128, 8192,
                               torch.bfloat16, device, seed, repeats, log, peak)
        rows += speed
    return rows
