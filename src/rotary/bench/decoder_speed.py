"""The decoder issue's speed targets, measured in the reference decoder.

    python -m rotary.bench.decoder_speed [--repeats N] [--vocab V]

Model: 4 layers, 256 wide, 4 heads, batch 8, sequence 512, fp32 (the issue's setting; the vocabulary is not
given there, so it is a flag and printed). Three ratios, each the median of interleaved repeats:

1. training step (forward, backward, AdamW step): "rotary-attention" with givens mixing / the same with
   mixing=None. Target <= 1.10.
2. incremental decoding with a KV cache (a 16-token prompt, then 64 tokens one at a time, no grad): a givens model
   after ``rotary.fold`` / a plain-RoPE model. Target: 1 within noise.
3. rotary time per training step, forward and backward of exactly the rotary work each placement does in the
   reference decoder, with givens mixing: "rotary-embedding" rotates one (B, T, C) tensor with P on it;
   "rotary-attention" builds P once, applies it to the q and k weights of every layer and rotates q and k of
   every layer with plain RoPE. Ratio embedding / attention, target <= 0.5. For context: the same attention
   rotations with P on the activations instead (what a Rotary with mixing does when dropped into attention, e.g.
   rotary.whisper), and the whole-step times of both placements and of positional="none".
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

import rotary
from rotary.bench.timing import median, spread, time_interleaved
from rotary.decoder import Decoder, DecoderConfig, KVCache, _mix_rows

LAYERS, DIMS, HEADS, BATCH, SEQ = 4, 256, 4, 8, 512


def _model(vocab: int, device, positional: str, mixing: str | None) -> Decoder:
    cfg = DecoderConfig(vocab=vocab, ctx=SEQ, dims=DIMS, heads=HEADS, layers=LAYERS, positional=positional,
                        mixing=mixing)
    model = Decoder(cfg).to(device)
    mixing = model.mixing or (model.rotary.mixing if model.rotary is not None else None)
    if mixing is not None:
        with torch.no_grad():  # trained-looking parameters; the cost does not depend on them
            for p in mixing.parameters():
                p.normal_(std=0.1)
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


def rotations(rot: rotary.Rotary, shapes: list[tuple[int, ...]], device):
    """Forward and backward of rotations of tensors of the given shapes, with a random upstream gradient."""
    xs = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    params = list(rot.parameters())

    def run():
        ys = [rot(x) for x in xs]
        torch.autograd.grad(ys, xs + params, grads)

    return run


def attention_rotary_work(model: Decoder, batch: int, seq: int, device):
    """The attention placement's rotary work in one training step of ``model``, forward and backward: RoPE on q
    and k of every layer and, when the model has learned mixing, P built once and mixed into each layer's q
    weight, q bias and k weight."""
    heads, head_dim = model.config.heads, model.config.head_dim
    xs = [torch.randn(batch, seq, heads, head_dim, device=device, requires_grad=True)
          for _ in range(2 * model.config.layers)]
    weights = [] if model.mixing is None else [
        w for b in model.blocks for w in (b.attn.query.weight, b.attn.query.bias, b.attn.key.weight)
    ]
    grads = [torch.randn_like(t) for t in xs + weights]
    params = [] if model.mixing is None else list(model.mixing.parameters()) + weights

    def run():
        outs = [model.rotary(x) for x in xs]
        if model.mixing is not None:
            P = model.mixing.matrix(torch.float32)
            outs += [_mix_rows(w, P) for w in weights]
        torch.autograd.grad(outs, xs + params, grads)

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats of each contender (median reported)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size of the benchmark model")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}")
    print(f"decoder: {LAYERS} layers, {DIMS} wide, {HEADS} heads, vocab {args.vocab}; batch {BATCH}, seq {SEQ}, fp32")

    def report(res):
        t = {k: median(v) for k, v in res.items()}
        for name, v in t.items():
            print(f"  {name:40s} {v * 1e3:9.2f} ms  (IQR {spread(res[name]):.0%})")
        return t

    def ratio(label, r, target, ok):
        print(f"{label:62s} {r:6.3f}  target {target:10s} {'ok' if ok else 'MISSED'}\n")

    # 1. training steps
    tokens = torch.randint(0, args.vocab, (BATCH, SEQ + 1), device=device)
    fns = {
        "train rotary-attention givens": train_step(_model(args.vocab, device, "rotary-attention", "givens"), tokens),
        "train rotary-attention mixing=None": train_step(_model(args.vocab, device, "rotary-attention", None), tokens),
        "train rotary-embedding givens": train_step(_model(args.vocab, device, "rotary-embedding", "givens"), tokens),
        "train positional=none": train_step(_model(args.vocab, device, "none", None), tokens),
    }
    t = report(time_interleaved(fns, device=device, repeats=args.repeats, warmup=2))
    r = t["train rotary-attention givens"] / t["train rotary-attention mixing=None"]
    ratio("training step: attention givens / attention mixing=None", r, "<= 1.10", r <= 1.10)

    # 2. incremental decoding after fold
    prompt = torch.randint(0, args.vocab, (BATCH, 16), device=device)
    givens = _model(args.vocab, device, "rotary-attention", "givens").eval()
    folded = rotary.fold(_model(args.vocab, device, "rotary-attention", "givens").eval())
    plain = _model(args.vocab, device, "rotary-attention", None).eval()
    fns = {"decode folded givens": decode(folded, prompt, 64), "decode plain RoPE": decode(plain, prompt, 64),
           "decode unfolded givens": decode(givens, prompt, 64)}
    res = time_interleaved(fns, device=device, repeats=3 * args.repeats)
    t = report(res)
    r = t["decode folded givens"] / t["decode plain RoPE"]
    noise = max(spread(res["decode folded givens"]), spread(res["decode plain RoPE"]), 0.02)
    ratio("decoding (16 + 64 tokens): folded givens / plain RoPE", r, f"1 +- {noise:.0%}", abs(r - 1) <= noise)

    # 3. rotary time per training step, by placement
    embedding = _model(args.vocab, device, "rotary-embedding", "givens")  # its Rotary carries P
    attention = _model(args.vocab, device, "rotary-attention", "givens")  # P on the weights, plain RoPE
    fns = {
        "rotary work, embedding placement": rotations(embedding.rotary, [(BATCH, SEQ, DIMS)], device),
        "rotary work, attention placement": attention_rotary_work(attention, BATCH, SEQ, device),
        "(attention, P on activations instead)": rotations(
            embedding.rotary, [(BATCH, SEQ, HEADS, DIMS // HEADS)] * (2 * LAYERS), device
        ),
    }
    t = report(time_interleaved(fns, device=device, repeats=3 * args.repeats))
    r = t["rotary work, embedding placement"] / t["rotary work, attention placement"]
    ratio("rotary time per training step: embedding / attention", r, "<= 0.5", r <= 0.5)
    r = t["rotary work, embedding placement"] / t["(attention, P on activations instead)"]
    print(f"{'(context) same, were P on the activations in both placements':62s} {r:6.3f}")


if __name__ == "__main__":
    main()
