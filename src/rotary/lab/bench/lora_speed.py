"""Suite ``lora``: LoRA fine-tuning of a transformers Llama with rotary installed through PEFT against LoRA alone:
a training step, and generate() after ``merge_and_unload()`` (and, with rotary, fold).

:func:`measure` returns numbers (seconds per call, medians, spreads, ratios), :func:`suite` rows; the targets are
in ``rotary.lab.bench.targets``. The models and the adapters' weights are drawn from a ``torch.Generator`` (peft's
own initialisation draws from the global RNG, then is overwritten).
"""

from __future__ import annotations

import copy

import torch

import rotary
from rotary.lab.bench.hf_speed import QUICK as HF_QUICK
from rotary.lab.bench.hf_speed import generate_call, summary, tiny_llama, train_step
from rotary.lab.bench.rows import Row, ratio_row, time_rows
from rotary.lab.bench.timing import median, spread, time_interleaved

__all__ = ["measure", "suite"]
SUITE = "lora"
QUICK = {**HF_QUICK, "batch": 1, "seq": 8, "r": 2}
TARGET_MODULES = ("q_proj", "k_proj", "v_proj")


def _lora_models(stock, *, r: int, mixing: str, generator: torch.Generator):
    """Two PEFT models of copies of ``stock`` with the same LoRA weights (drawn from ``generator``, B away from
    zero): LoRA alone, and LoRA with rotary installed (``rotary.hf.install(peft_model)``, P away from the
    identity, trained with the adapter)."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(TARGET_MODULES))
    alone = peft.get_peft_model(copy.deepcopy(stock), config)
    with torch.no_grad():
        for name, p in alone.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.02, generator=generator)
    installed = rotary.hf.install(peft.get_peft_model(copy.deepcopy(stock), copy.deepcopy(config)), mixing=mixing)
    lora = dict(alone.named_parameters())
    with torch.no_grad():
        for name, p in installed.named_parameters():
            if "lora_" in name:
                p.copy_(lora[name])
            elif ".rotary." in name and p.requires_grad:  # the adapter's copy of P, the one trained and in use
                p.normal_(0.0, 0.5, generator=generator)
    return alone, installed


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def measure(
    *,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 4096,
    batch: int = 4,
    seq: int = 128,
    prompt: int = 16,
    new_tokens: int = 64,
    r: int = 8,
    mixing: str = "givens",
    repeats: int = 15,
    warmup: int = 2,
    seed: int = 0,
) -> dict:
    """Time LoRA alone against LoRA with rotary installed (training step), and their merged models (generate),
    CPU float32.

    Training step: forward with labels, backward, AdamW step over the trainable parameters (the LoRA weights; with
    rotary also P), on ``(batch, seq)`` tokens. Generation: greedy ``generate()`` of exactly ``new_tokens`` tokens
    after a ``prompt``-token prompt, batch 1, default cache, of ``merge_and_unload()`` of LoRA alone and of
    ``rotary.fold(merge_and_unload())`` of the installed one (both stock ``LlamaForCausalLM``s). Each pair runs
    round-robin (:func:`rotary.lab.bench.timing.time_interleaved`).

    Returns a dict: ``setup`` (sizes, trainable parameter counts, machine), ``seconds`` (name -> list of seconds
    per call), ``median``, ``spread`` (interquartile range / median), ``tokens_per_s`` and ``ratios``:
    ``train_installed_over_lora`` (time) and ``generate_folded_over_merged`` (tokens/s).
    """
    generator = torch.Generator().manual_seed(seed)
    device = torch.device("cpu")
    stock = tiny_llama(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab, generator=generator)
    alone, installed = _lora_models(stock, r=r, mixing=mixing, generator=generator)
    tokens = torch.randint(3, vocab, (batch, seq), generator=generator)
    prompt_ids = torch.randint(3, vocab, (1, prompt), generator=generator)
    trainable = {"lora": sum(p.numel() for p in _trainable(alone)),
                 "installed": sum(p.numel() for p in _trainable(installed))}

    # merged copies first: the training steps below change the weights, not the cost of a step
    merged = copy.deepcopy(alone).merge_and_unload()
    folded = rotary.fold(copy.deepcopy(installed).merge_and_unload())
    train = {}
    for name, model in (("train_lora", alone), ("train_installed", installed)):
        model.train()
        train[name] = train_step(model, torch.optim.AdamW(_trainable(model), lr=1e-4), tokens)
    seconds = time_interleaved(train, device=device, repeats=repeats, warmup=warmup)
    generate = {name: generate_call(model.eval(), prompt_ids, new_tokens)
                for name, model in (("generate_merged", merged), ("generate_folded", folded))}
    seconds.update(time_interleaved(generate, device=device, repeats=repeats, warmup=warmup))

    setup = {
        "layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "vocab": vocab, "batch": batch,
        "seq": seq, "prompt": prompt, "new_tokens": new_tokens, "r": r, "target_modules": list(TARGET_MODULES),
        "mixing": mixing, "repeats": repeats, "warmup": warmup, "dtype": "float32", "attn_implementation": "sdpa",
        "trainable": trainable,
    }
    result = summary(setup, seconds, generate, new_tokens)
    medians, tokens_per_s = result["median"], result["tokens_per_s"]
    result["ratios"] = {
        "train_installed_over_lora": medians["train_installed"] / medians["train_lora"],
        "generate_folded_over_merged": tokens_per_s["generate_folded"] / tokens_per_s["generate_merged"],
    }
    return result


def suite(*, quick: bool, device: torch.device, seed: int, repeats: int | None, log) -> list[Row]:
    """Rows of :func:`measure` (CPU fp32): the training step (ms) and generate() (tokens/s) of each model, and
    the ratios the targets judge."""
    import peft  # noqa: F401  (missing: the runner skips the suite)
    import transformers  # noqa: F401

    sizes = QUICK if quick else {}
    repeats = repeats or (1 if quick else 15)
    r = measure(repeats=repeats, warmup=0 if quick else 2, seed=seed, **sizes)
    z = r["setup"]
    setting = (f"Llama {z['layers']} layers, hidden {z['hidden']}, {z['heads']} heads, {z['kv_heads']} key/value "
               f"heads, vocab {z['vocab']}, LoRA r={z['r']} on {'/'.join(z['target_modules'])}, fp32, sdpa, "
               f"{z['mixing']}, median of {repeats}, interleaved")
    s = {name.replace("_", " "): ts for name, ts in r["seconds"].items()}
    train = (f"training step (AdamW over {z['trainable']['lora']:,} LoRA parameters; with rotary "
             f"{z['trainable']['installed']:,}), batch {z['batch']} x {z['seq']}, {setting}")
    rows = time_rows(SUITE, train, {k: v for k, v in s.items() if k.startswith("train ")}, device="cpu")
    rows.append(ratio_row(SUITE, train, "rotary installed / LoRA alone", s, "train installed", "train lora",
                          key="train installed/lora", device="cpu"))
    gen = (f"generate(), batch 1, {z['prompt']}-token prompt + {z['new_tokens']} new tokens, after "
           f"merge_and_unload() (rotary: and fold), {setting}")
    rows += [Row(SUITE, gen, name, z["new_tokens"] / median(s[name]), "tokens/s", spread(s[name]))
             for name in s if name.startswith("generate ")]
    rows.append(ratio_row(SUITE, gen, "tokens/s, folded / merged LoRA alone", s, "generate folded",
                          "generate merged", key="generate folded/merged", device="cpu", invert=True))
    return rows
