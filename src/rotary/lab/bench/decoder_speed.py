"""The decoder issue's speed targets, measured in the reference decoder (``rotary decoder-speed`` prints them).

Model: 4 layers, 256 wide, 4 heads, batch 8, sequence 512, fp32 (the issue's setting; the vocabulary is not
given there, so it is a flag and printed). Three ratios, each the median of interleaved repeats:

1. training step (forward, backward, AdamW step): "attention" with givens mixing / the same with
   mixing=None. Target <= 1.10.
2. incremental decoding with a KV cache (a 16-token prompt, then 64 tokens one at a time, no grad): a givens model
   after ``rotary.fold`` / a plain-RoPE model. Target: 1 within noise.
3. rotary time per training step, forward and backward of exactly the rotary work each placement does in the
   reference decoder, with givens mixing: "embedding" rotates one (B, T, C) tensor with P on it;
   "attention" builds P once, applies it to the q and k weights of every layer and rotates q and k of
   every layer with plain RoPE. Ratio embedding / attention, target <= 0.5. For context: the same attention
   rotations with P on the activations instead (what a Rotary with mixing does when dropped into attention, e.g.
   rotary.whisper), and the whole-step times of both placements and of positional="none".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import rotary
from rotary.lab.bench.timing import Ratio, median, spread, time_interleaved
from rotary.integrations.decoder import Decoder, DecoderConfig, KVCache
from rotary.core.fold import mix_rows

LAYERS, DIMS, HEADS, BATCH, SEQ = 4, 256, 4, 8, 512


def _model(vocab: int, device, placement: str | None, mixing: str | None, generator: torch.Generator) -> Decoder:
    """The benchmark decoder with a rotary in ``placement`` (None: no position information at all)."""
    where = {"positional": "none"} if placement is None else {"positional": "rotary", "placement": placement}
    cfg = DecoderConfig(vocab=vocab, ctx=SEQ, dims=DIMS, heads=HEADS, layers=LAYERS, mixing=mixing, **where)
    model = Decoder(cfg).to(device)
    mixing = None if model.rotary is None else model.rotary.mixing
    if mixing is not None:
        with torch.no_grad():  # trained-looking parameters; the cost does not depend on them
            for p in mixing.parameters():
                p.normal_(std=0.1, generator=generator)
    return model


def train_step(model: Decoder, tokens: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def decode(model: Decoder, prompt: torch.Tensor, steps: int):
    def run():
        with torch.no_grad():
            cache = KVCache()
            logits = model(prompt, cache=cache)
            for _ in range(steps):
                logits = model(logits[:, -1:].argmax(-1), cache=cache)

    return run


def rotations(rot: rotary.Rotary, shapes: list[tuple[int, ...]], device, generator: torch.Generator):
    """Forward and backward of rotations of tensors of the given shapes, with a random upstream gradient."""
    xs = [torch.randn(s, device=device, generator=generator, requires_grad=True) for s in shapes]
    grads = [torch.randn(s, device=device, generator=generator) for s in shapes]
    params = list(rot.parameters())

    def run():
        ys = [rot(x) for x in xs]
        torch.autograd.grad(ys, xs + params, grads)

    return run


def attention_rotary_work(model: Decoder, batch: int, seq: int, device, generator: torch.Generator):
    """The attention placement's rotary work in one training step of ``model``, forward and backward: RoPE on q
    and k of every layer and, when the model has learned mixing, P built once and mixed into each layer's q
    weight, q bias and k weight."""
    heads, head_dim = model.config.heads, model.config.head_dim
    xs = [torch.randn(batch, seq, heads, head_dim, device=device, generator=generator, requires_grad=True)
          for _ in range(2 * model.config.layers)]
    mixing = model.rotary.mixing
    weights = [] if mixing is None else [
        w for b in model.blocks for w in (b.attn.query.weight, b.attn.query.bias, b.attn.key.weight)
    ]
    grads = [torch.randn(t.shape, device=device, generator=generator) for t in xs + weights]
    params = [] if mixing is None else list(mixing.parameters()) + weights

    def run():
        outs = [model.rotary(x, mix=False) for x in xs]
        if mixing is not None:
            P = mixing.matrix(torch.float32)
            outs += [mix_rows(w, P) for w in weights]
        torch.autograd.grad(outs, xs + params, grads)

    return run


def measure(*, repeats: int = 9, vocab: int = 4096, device: str = "cpu", seed: int = 0) -> list[dict]:
    """The three sections of the module docstring: for each, ``{"title", "times", "ratios"}`` where times maps a
    contender to its repeats in seconds and ratios is a list of :class:`rotary.bench.timing.Ratio`. Tokens,
    inputs and trained-looking mixing parameters come from a ``torch.Generator`` seeded with ``seed``."""
    device = torch.device(device)
    g = torch.Generator(device).manual_seed(seed)
    sections = []

    # 1. training steps
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), device=device, generator=g)
    fns = {
        "train rotary-attention givens": train_step(_model(vocab, device, "attention", "givens", g), tokens),
        "train rotary-attention mixing=None": train_step(_model(vocab, device, "attention", None, g), tokens),
        "train rotary-embedding givens": train_step(_model(vocab, device, "embedding", "givens", g), tokens),
        "train positional=none": train_step(_model(vocab, device, None, None, g), tokens),
    }
    res = time_interleaved(fns, device=device, repeats=repeats, warmup=2)
    r = median(res["train rotary-attention givens"]) / median(res["train rotary-attention mixing=None"])
    sections.append({"title": "training step", "times": res, "ratios": [
        Ratio("training step: attention givens / attention mixing=None", r, "<= 1.10", r <= 1.10)]})

    # 2. incremental decoding after fold
    prompt = torch.randint(0, vocab, (BATCH, 16), device=device, generator=g)
    givens = _model(vocab, device, "attention", "givens", g).eval()
    folded = rotary.fold(_model(vocab, device, "attention", "givens", g).eval())
    plain = _model(vocab, device, "attention", None, g).eval()
    fns = {"decode folded givens": decode(folded, prompt, 64), "decode plain RoPE": decode(plain, prompt, 64),
           "decode unfolded givens": decode(givens, prompt, 64)}
    res = time_interleaved(fns, device=device, repeats=3 * repeats)
    r = median(res["decode folded givens"]) / median(res["decode plain RoPE"])
    noise = max(spread(res["decode folded givens"]), spread(res["decode plain RoPE"]), 0.02)
    sections.append({"title": "incremental decoding", "times": res, "ratios": [
        Ratio("decoding (16 + 64 tokens): folded givens / plain RoPE", r, f"1 +- {noise:.0%}", abs(r - 1) <= noise)]})

    # 3. rotary time per training step, by placement
    embedding = _model(vocab, device, "embedding", "givens", g)  # its Rotary carries P
    attention = _model(vocab, device, "attention", "givens", g)  # P on the weights, plain RoPE
    fns = {
        "rotary work, embedding placement": rotations(embedding.rotary, [(BATCH, SEQ, DIMS)], device, g),
        "rotary work, attention placement": attention_rotary_work(attention, BATCH, SEQ, device, g),
        "(attention, P on activations instead)": rotations(
            embedding.rotary, [(BATCH, SEQ, HEADS, DIMS // HEADS)] * (2 * LAYERS), device, g
        ),
    }
    res = time_interleaved(fns, device=device, repeats=3 * repeats)
    t = {k: median(v) for k, v in res.items()}
    r = t["rotary work, embedding placement"] / t["rotary work, attention placement"]
    context = t["rotary work, embedding placement"] / t["(attention, P on activations instead)"]
    sections.append({"title": "rotary time per training step", "times": res, "ratios": [
        Ratio("rotary time per training step: embedding / attention", r, "<= 0.5", r <= 0.5),
        Ratio("(context) same, were P on the activations in both placements", context, None, None)]})
    return sections
