"""Suite ``train``: what learned P costs in a training step at a realistic width: a transformers Llama (hidden 1024,
16 heads / 8 key-value heads, 4 layers, vocabulary 8192, batch 2 x 512, AdamW, CPU fp32), full fine-tuning and
LoRA, with P on the weights and on the activations.

Full fine-tuning: stock against ``rotary.hf.install(model, mix_on="weights")`` (the default: P on W_q, W_k, whose
gradients are computed anyway) and ``mix_on="activations"`` (P on the projections' outputs). LoRA r=8 on q/k/v:
LoRA alone against ``rotary.hf.install(peft_model)`` (P on the adapted projections' outputs, the library's way),
and, for the comparison the cheaper-looking alternative asks for, P on the frozen base weight and on ``lora_B``
(``P (W + s B A) = (P W) + s (P B) A``, built here by hand; the loss equals the installed model's). Each group runs
round-robin; a ratio is the median of the per-round ratios, its spread their interquartile range / median.

:func:`measure` returns numbers, :func:`suite` rows; the targets are in ``rotary.lab.bench.targets``. Weights and P
are drawn from a ``torch.Generator``.
"""

from __future__ import annotations

import copy
import statistics

import torch

import rotary
from rotary.integrations.install.mix import MixedWeights
from rotary.lab.bench.hf_speed import summary, tiny_llama, train_step
from rotary.lab.bench.lora_speed import TARGET_MODULES, _lora_models
from rotary.lab.bench.rows import Row, time_rows
from rotary.lab.bench.timing import time_interleaved

__all__ = ["measure", "paired", "suite"]
SUITE = "train"
QUICK = {"layers": 1, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 64, "batch": 1, "seq": 8, "r": 2}


def _turn(model, generator: torch.Generator):
    """P away from the identity: every trainable rotary parameter drawn from ``generator``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".rotary." in name and p.requires_grad:
                p.normal_(0.0, 0.5, generator=generator)
    return model


def _lora_p_on_weights(lora, installed):
    """A copy of the LoRA model ``lora`` whose q/k projections compute ``(P W) x + s (P B) A x``, with copies of
    the P the ``installed`` PEFT model trains (one shared by every layer, or one per layer)."""
    model = copy.deepcopy(lora)
    trained = [m for n, m in installed.named_modules() if n.endswith("rotary.modules_to_save.default")]
    layers = model.get_base_model().model.layers
    if len(trained) not in (1, len(layers)):
        raise RuntimeError(f"expected one trained Rotary, or one per layer; found {len(trained)}")
    model.rotaries = torch.nn.ModuleList(copy.deepcopy(trained))  # registered: the optimizer and .to() see P
    for i, layer in enumerate(layers):
        rot = model.rotaries[i % len(trained)]
        for name in ("q_proj", "k_proj"):
            wrapped = getattr(layer.self_attn, name)
            for linear in (wrapped.get_base_layer(), *wrapped.lora_B.values()):
                linear.forward = MixedWeights(linear, lambda rot=rot: rot)
    return model


def _p_alone(rot, *, layers: int, shapes: dict[str, tuple], weights: dict[str, tuple], generator):
    """Calls timing P by itself as one training step applies it: forward and backward of ``rot``'s P on every
    layer's q and k projection outputs (``shapes``), and on their weight rows (``weights``)."""
    D = rot.head_dim
    outputs = {k: torch.randn(s, generator=generator).requires_grad_(True) for k, s in shapes.items()}
    rows = {k: torch.randn(s, generator=generator).requires_grad_(True) for k, s in weights.items()}
    grads = {id(t): torch.randn(t.shape, generator=generator) for t in (*outputs.values(), *rows.values())}

    def on_activations():
        for _ in range(layers):
            for y in outputs.values():
                rot.mixer.rotate(y.unflatten(-1, (-1, D))).flatten(-2).backward(grads[id(y)])

    def on_weights():
        for _ in range(layers):
            for w in rows.values():
                rot.mixer.rotate(w.unflatten(0, (-1, D)), dim=1).flatten(0, 1).backward(grads[id(w)])

    return {"p_activations": on_activations, "p_weights": on_weights}


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def measure(
    *,
    layers: int = 4,
    hidden: int = 1024,
    heads: int = 16,
    kv_heads: int = 8,
    vocab: int = 8192,
    batch: int = 2,
    seq: int = 512,
    r: int = 8,
    mixing: str = "givens",
    repeats: int = 11,
    warmup: int = 2,
    seed: int = 0,
) -> dict:
    """Time training steps (forward with labels, backward, AdamW over the trainable parameters), CPU float32.

    Returns a dict: ``setup`` (sizes, trainable parameter counts, machine), ``seconds`` (name -> list of seconds
    per step), ``median``, ``spread`` and ``ratios`` (name -> ``{"median", "spread"}`` of the per-round ratios):
    ``full_weights_over_stock``, ``full_activations_over_stock``, ``lora_installed_over_lora`` and
    ``lora_weights_over_lora``; ``shares``: P's own forward and backward per step (``p_weights``,
    ``p_activations`` in ``seconds``, timed alone) over the stock full step and the LoRA step.
    """
    import peft  # noqa: F401  (the LoRA half)

    generator = torch.Generator().manual_seed(seed)
    stock = tiny_llama(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab, generator=generator)
    tokens = torch.randint(3, vocab, (batch, seq), generator=generator)
    full = {"full_stock": copy.deepcopy(stock)}
    for where in ("weights", "activations"):
        model = rotary.hf.install(copy.deepcopy(stock), mixing=mixing, mix_on=where)
        full[f"full_{where}"] = _turn(model, torch.Generator().manual_seed(seed + 1))  # the same P in both
    lora, installed = _lora_models(stock, r=r, mixing=mixing, generator=generator)  # the lora suite's pair
    adapters = {"lora": lora, "lora_installed": installed, "lora_weights": _lora_p_on_weights(lora, installed)}

    seconds = {}
    for group in (full, adapters):
        steps = {}
        for name, model in group.items():
            model.train()
            steps[name] = train_step(model, torch.optim.AdamW(_trainable(model), lr=1e-4), tokens)
        seconds.update(time_interleaved(steps, device=torch.device("cpu"), repeats=repeats, warmup=warmup))

    # P by itself, as a step applies it (what the step ratios cannot resolve within this machine's noise)
    rot = full["full_weights"].model.rotary
    q, k = heads * rot.head_dim, kv_heads * rot.head_dim
    alone = _p_alone(rot, layers=layers, shapes={"q": (batch, seq, q), "k": (batch, seq, k)},
                     weights={"q": (q, hidden), "k": (k, hidden)}, generator=generator)
    seconds.update(time_interleaved(alone, device=torch.device("cpu"), repeats=3 * repeats, warmup=warmup))

    trainable = {name: sum(p.numel() for p in _trainable(m)) for name, m in {**full, **adapters}.items()}
    setup = {
        "layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "vocab": vocab, "batch": batch,
        "seq": seq, "r": r, "target_modules": list(TARGET_MODULES), "mixing": mixing, "repeats": repeats,
        "warmup": warmup, "dtype": "float32", "attn_implementation": "sdpa", "trainable": trainable,
    }
    result = summary(setup, seconds, {}, 1)
    result["ratios"] = {
        "full_weights_over_stock": paired(seconds["full_weights"], seconds["full_stock"]),
        "full_activations_over_stock": paired(seconds["full_activations"], seconds["full_stock"]),
        "lora_installed_over_lora": paired(seconds["lora_installed"], seconds["lora"]),
        "lora_weights_over_lora": paired(seconds["lora_weights"], seconds["lora"]),
    }
    medians = result["median"]
    result["shares"] = {  # P's own time per step / the step it adds to
        "p_weights_over_full_stock": medians["p_weights"] / medians["full_stock"],
        "p_activations_over_lora": medians["p_activations"] / medians["lora"],
    }
    return result


def paired(a: list[float], b: list[float]) -> dict:
    """The median of the per-round ratios ``a[i] / b[i]`` and their spread (interquartile range / median, 0 for
    fewer than two rounds): round-robin rounds share the machine's drift, which the per-round ratio cancels."""
    ratios = [x / y for x, y in zip(a, b)]
    mid = statistics.median(ratios)
    if len(ratios) < 2:
        return {"median": mid, "spread": 0.0}
    q = statistics.quantiles(ratios, n=4)
    return {"median": mid, "spread": (q[2] - q[0]) / mid}


def suite(*, quick: bool, device: torch.device, seed: int, repeats: int | None, log) -> list[Row]:
    """Rows of :func:`measure`: each model's training step (ms) and the four paired ratios."""
    import peft  # noqa: F401  (missing: the runner skips the suite)
    import transformers  # noqa: F401

    sizes = QUICK if quick else {}
    repeats = repeats or (1 if quick else 11)
    result = measure(repeats=repeats, warmup=0 if quick else 2, seed=seed, **sizes)
    z = result["setup"]
    setting = (f"Llama {z['layers']} layers, hidden {z['hidden']}, {z['heads']} heads, {z['kv_heads']} key/value "
               f"heads, vocab {z['vocab']}, batch {z['batch']} x {z['seq']}, AdamW, fp32, sdpa, {z['mixing']}, "
               f"median of {repeats}, interleaved")
    rows = []
    sections = {
        "full": (f"full fine-tuning step, {setting}", [
            ("full_weights_over_stock", "installed, P on the weights / stock", "full weights/stock"),
            ("full_activations_over_stock", "installed, P on the activations / stock", "full activations/stock")]),
        "lora": (f"LoRA r={z['r']} on {'/'.join(z['target_modules'])} training step, {setting}", [
            ("lora_installed_over_lora", "rotary installed (P on the outputs) / LoRA alone", "lora installed/lora"),
            ("lora_weights_over_lora", "(comparison) P on the base weight and lora_B / LoRA alone", None)]),
    }
    shares = result["shares"]
    for prefix, (section, ratios) in sections.items():
        times = {name.replace("_", " "): ts for name, ts in result["seconds"].items() if name.startswith(prefix)}
        rows += time_rows(SUITE, section, times, device="cpu")
        for ratio, name, key in ratios:
            r = result["ratios"][ratio]
            rows.append(Row(SUITE, section, name, r["median"], "x", r["spread"], key=key, device="cpu",
                            info={"paired": True}))
    section = (f"P by itself, forward and backward, as one step applies it ({z['layers']} layers, q and k), "
               f"median of {3 * repeats}")
    rows += time_rows(SUITE, section, {"P on the weights": result["seconds"]["p_weights"],
                                       "P on the activations": result["seconds"]["p_activations"]}, device="cpu")
    rows.append(Row(SUITE, section, "P on the weights / full fine-tuning step (stock)",
                    shares["p_weights_over_full_stock"], "x", device="cpu"))
    rows.append(Row(SUITE, section, "P on the activations / LoRA step (alone)", shares["p_activations_over_lora"],
                    "x", device="cpu"))
    return rows
