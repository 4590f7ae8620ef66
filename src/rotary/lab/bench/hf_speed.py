"""Suite ``hf``: rotary.hf in a transformers Llama against stock: a training step with P installed, generate()
after fold.

:func:`measure` returns numbers (seconds per call, medians, spreads, ratios), :func:`suite` rows; the targets are
in ``rotary.lab.bench.targets``. The models are initialised from a ``torch.Generator`` (the global RNG is neither
seeded nor used).
"""

from __future__ import annotations

import copy
import os
import platform

import torch
from torch import nn

import rotary
from rotary.lab.bench.rows import Row, ratio_row, time_rows
from rotary.lab.bench.timing import median, spread, time_blocked, time_interleaved

__all__ = ["measure", "suite", "tiny_llama"]
SUITE = "hf"
QUICK = {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "vocab": 64, "batch": 1, "seq": 8, "prompt": 4,
         "new_tokens": 3}


def tiny_llama(
    *, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, generator: torch.Generator, attn: str = "sdpa"
):
    """A random ``LlamaForCausalLM`` (intermediate size 8/3 hidden, as Llama), weights drawn from ``generator``."""
    import transformers

    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=(8 * hidden // 3 + 7) // 8 * 8, vocab_size=vocab, max_position_embeddings=4096,
        attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02, generator=generator)
    return model


def train_step(model, optimizer, tokens):
    """One timed call: forward with labels, backward, ``optimizer`` step."""
    def step():
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def generate_call(model, prompt, new_tokens):
    """One timed call: greedy ``generate()`` of exactly ``new_tokens`` tokens after ``prompt``."""
    def run():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)

    return run


def measure(
    *,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 4096,
    batch: int = 8,
    seq: int = 512,
    prompt: int = 16,
    new_tokens: int = 128,
    mixing: str = "givens",
    repeats: int = 9,
    warmup: int = 2,
    seed: int = 0,
) -> dict:
    """Time stock against installed (training step) and stock against folded (generate), CPU float32.

    Training step: forward with labels, backward, AdamW step, on ``(batch, seq)`` tokens; stock and installed
    (P away from the identity) run round-robin. Generation: greedy ``generate()`` of exactly ``new_tokens``
    tokens after a ``prompt``-token prompt, batch 1, default cache; stock, folded (install, random P, fold) and,
    for context, installed unfolded, each timed in its own block.

    Returns a dict: ``setup`` (sizes, machine), ``seconds`` (name -> list of seconds per call), ``median``,
    ``spread`` (interquartile range / median), ``tokens_per_s`` and ``ratios``: ``train_installed_over_stock``,
    ``generate_folded_over_stock`` and ``generate_installed_over_stock`` (tokens/s).
    """
    generator = torch.Generator().manual_seed(seed)
    device = torch.device("cpu")
    stock = tiny_llama(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab, generator=generator)
    installed = rotary.hf.install(copy.deepcopy(stock), mixing=mixing)
    with torch.no_grad():
        for name, p in installed.named_parameters():
            if ".rotary." in name:
                p.normal_(0.0, 0.5, generator=generator)
    folded = rotary.fold(copy.deepcopy(installed))
    tokens = torch.randint(3, vocab, (batch, seq), generator=generator)
    prompt_ids = torch.randint(3, vocab, (1, prompt), generator=generator)

    train = {}
    for name, model in (("train_stock", copy.deepcopy(stock)), ("train_installed", copy.deepcopy(installed))):
        model.train()
        train[name] = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), tokens)
    seconds = time_interleaved(train, device=device, repeats=repeats, warmup=warmup)
    generate = {
        name: generate_call(model.eval(), prompt_ids, new_tokens)
        for name, model in (("generate_stock", stock), ("generate_folded", folded), ("generate_installed", installed))
    }
    seconds.update(time_blocked(generate, device=device, repeats=repeats, warmup=warmup))

    setup = {
        "layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "vocab": vocab, "batch": batch,
        "seq": seq, "prompt": prompt, "new_tokens": new_tokens, "mixing": mixing, "repeats": repeats,
        "warmup": warmup, "dtype": "float32", "attn_implementation": "sdpa",
    }
    r = summary(setup, seconds, generate, new_tokens)
    medians, tokens_per_s = r["median"], r["tokens_per_s"]
    r["ratios"] = {
        "train_installed_over_stock": medians["train_installed"] / medians["train_stock"],
        "generate_folded_over_stock": tokens_per_s["generate_folded"] / tokens_per_s["generate_stock"],
        "generate_installed_over_stock": tokens_per_s["generate_installed"] / tokens_per_s["generate_stock"],
    }
    return r


def summary(setup: dict, seconds: dict, generate, new_tokens: int) -> dict:
    """What a measure() of training steps and generate() calls returns: ``setup`` (with the machine),
    ``seconds`` (name -> list of seconds per call), ``median``, ``spread`` (interquartile range / median) and
    ``tokens_per_s`` of the ``generate`` names; the caller adds its ``ratios``."""
    medians = {name: median(ts) for name, ts in seconds.items()}
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    return {
        "setup": {**setup, "machine": machine},
        "seconds": seconds,
        "median": medians,
        "spread": {name: spread(ts) for name, ts in seconds.items()},
        "tokens_per_s": {name: new_tokens / medians[name] for name in generate},
    }


def suite(*, quick: bool, device: torch.device, seed: int, repeats: int | None, log) -> list[Row]:
    """Rows of :func:`measure` (CPU fp32): the training step (ms) and generate() (tokens/s) of each model, and
    the ratios the targets judge."""
    import transformers  # noqa: F401  (missing: the runner skips the suite)

    sizes = QUICK if quick else {}
    repeats = repeats or (1 if quick else 21)
    r = measure(repeats=repeats, warmup=0 if quick else 2, seed=seed, **sizes)
    z = r["setup"]
    setting = (f"Llama {z['layers']} layers, hidden {z['hidden']}, {z['heads']} heads, {z['kv_heads']} key/value "
               f"heads, vocab {z['vocab']}, fp32, sdpa, median of {repeats}")
    s = {name.replace("_", " "): ts for name, ts in r["seconds"].items()}
    train = f"training step, batch {z['batch']} x {z['seq']}, {setting}"
    rows = time_rows(SUITE, train, {k: v for k, v in s.items() if k.startswith("train ")}, device="cpu")
    rows.append(ratio_row(SUITE, train, "installed / stock", s, "train installed", "train stock",
                          key="train installed/stock", device="cpu"))
    gen = (f"generate(), batch 1, {z['prompt']}-token prompt + {z['new_tokens']} new tokens, each model in its own "
           f"block, {setting}")
    rows += [Row(SUITE, gen, name, z["new_tokens"] / median(s[name]), "tokens/s", spread(s[name]))
             for name in s if name.startswith("generate ")]
    rows.append(ratio_row(SUITE, gen, "tokens/s, folded / stock", s, "generate folded", "generate stock",
                          key="generate folded/stock", device="cpu", invert=True))
    rows.append(ratio_row(SUITE, gen, "(context) tokens/s, installed unfolded / stock", s, "generate installed",
                          "generate stock", device="cpu", invert=True))
    return rows
