"""Suite ``decoder``: the speed targets of the reference decoder, and tokens/s of each positional mode.

Model: 4 layers, 256 wide, 4 heads, batch 8, sequence 512, vocabulary 4096, fp32. Three ratios, each the median
of interleaved repeats (the targets are in ``rotary.lab.bench.targets``):

1. training step (forward, backward, AdamW step): "attention" with givens mixing / the same with
   mixing=None.
2. incremental decoding with a KV cache (a 16-token prompt, then 64 tokens one at a time, no grad): a givens model
   after ``rotary.fold`` / a plain-RoPE model (target: 1 within noise).
3. rotary time per training step, forward and backward of exactly the rotary work each placement does in the
   reference decoder, with givens mixing: "embedding" rotates one (B, T, C) tensor with P on it;
   "attention" builds P once, applies it to the q and k weights of every layer and rotates q and k of
   every layer with plain RoPE. Ratio embedding / attention. For context: the same attention rotations with P
   on the activations instead (what a Rotary with mixing does when dropped into attention, e.g. rotary.whisper).

Then, for every positional mode (none, learned, sinusoidal, and the rotary placements): a training step's time
and tokens/s, decoding tokens/s, and the rotary's share of the training step (its forward and backward work,
timed on its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rotary
from rotary.core.fold import mix_rows
from rotary.integrations.decoder import Decoder, DecoderConfig, KVCache
from rotary.lab.bench.rows import Row, ratio_row, time_rows
from rotary.lab.bench.timing import median, time_interleaved

SUITE = "decoder"


@dataclass(frozen=True)
class Sizes:
    layers: int = 4
    dims: int = 256
    heads: int = 4
    batch: int = 8
    seq: int = 512
    vocab: int = 4096

    def __str__(self) -> str:
        return (f"{self.layers} layers, {self.dims} wide, {self.heads} heads, vocab {self.vocab}; "
                f"batch {self.batch} x {self.seq}, fp32")


FULL, QUICK = Sizes(), Sizes(layers=1, dims=32, heads=2, batch=2, seq=16, vocab=64)
DECODER_MODES = {  # name -> DecoderConfig overrides
    "none": {"positional": "none"},
    "learned": {"positional": "learned"},
    "sinusoidal": {"positional": "sinusoidal"},
    "attention, no mixing": {"positional": "rotary", "placement": "attention", "mixing": None},
    "attention, givens": {"positional": "rotary", "placement": "attention", "mixing": "givens"},
    "embedding, givens": {"positional": "rotary", "placement": "embedding", "mixing": "givens"},
}


def _model(sizes: Sizes, device, placement: str | None, mixing: str | None, generator: torch.Generator,
           ctx: int | None = None) -> Decoder:
    """The benchmark decoder with a rotary in ``placement`` (None: no position information at all)."""
    where = {"positional": "none"} if placement is None else {"positional": "rotary", "placement": placement}
    cfg = DecoderConfig(vocab=sizes.vocab, ctx=ctx or sizes.seq, dims=sizes.dims, heads=sizes.heads,
                        layers=sizes.layers, mixing=mixing, **where)
    model = Decoder(cfg).to(device)
    mixing = None if model.rotary is None else model.rotary.mixer
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
        ys = [rot(x, layout="BTHD") for x in xs]  # (B, T, dims) or (B, T, H, D)
        torch.autograd.grad(ys, xs + params, grads)

    return run


def attention_rotary_work(model: Decoder, batch: int, seq: int, device, generator: torch.Generator):
    """The attention placement's rotary work in one training step of ``model``, forward and backward: RoPE on q
    and k of every layer and, when the model has learned mixing, P built once and mixed into each layer's q
    weight, q bias and k weight."""
    heads, head_dim = model.config.heads, model.config.head_dim
    xs = [torch.randn(batch, seq, heads, head_dim, device=device, generator=generator, requires_grad=True)
          for _ in range(2 * model.config.layers)]
    mixing = model.rotary.mixer
    weights = [] if mixing is None else [
        w for b in model.blocks for w in (b.attn.query.weight, b.attn.query.bias, b.attn.key.weight)
    ]
    grads = [torch.randn(t.shape, device=device, generator=generator) for t in xs + weights]
    params = [] if mixing is None else list(mixing.parameters()) + weights

    def run():
        outs = [model.rotary.rope(x, layout="BTHD") for x in xs]
        if mixing is not None:
            P = mixing.matrix(torch.float32)
            outs += [mix_rows(w, P) for w in weights]
        torch.autograd.grad(outs, xs + params, grads)

    return run


def suite(*, quick: bool, device: torch.device, seed: int, repeats: int | None, log,
          sizes: Sizes | None = None) -> list[Row]:
    """The three sections of the module docstring, then the positional modes. Tokens, inputs and trained-looking
    mixing parameters come from a ``torch.Generator`` seeded with ``seed``."""
    z = sizes or (QUICK if quick else FULL)
    repeats = repeats or (1 if quick else 9)
    g = torch.Generator(device).manual_seed(seed)
    dev = str(device)
    rows: list[Row] = []

    # 1. training steps
    tokens = torch.randint(0, z.vocab, (z.batch, z.seq + 1), device=device, generator=g)
    fns = {
        "train rotary-attention givens": train_step(_model(z, device, "attention", "givens", g), tokens),
        "train rotary-attention mixing=None": train_step(_model(z, device, "attention", None, g), tokens),
        "train rotary-embedding givens": train_step(_model(z, device, "embedding", "givens", g), tokens),
        "train positional=none": train_step(_model(z, device, None, None, g), tokens),
    }
    res = time_interleaved(fns, device=device, repeats=repeats, warmup=2)
    section = f"training step, {z}, median of {repeats}"
    rows += time_rows(SUITE, section, res, device=dev)
    rows.append(ratio_row(SUITE, section, "attention givens / attention mixing=None", res,
                          "train rotary-attention givens", "train rotary-attention mixing=None",
                          key="train givens/none", device=dev))

    # 2. incremental decoding after fold
    prompt = torch.randint(0, z.vocab, (z.batch, 16), device=device, generator=g)
    ctx = max(z.seq, 16 + 64)
    givens = _model(z, device, "attention", "givens", g, ctx).eval()
    folded = rotary.fold(_model(z, device, "attention", "givens", g, ctx).eval())
    plain = _model(z, device, "attention", None, g, ctx).eval()
    fns = {"decode folded givens": decode(folded, prompt, 64), "decode plain RoPE": decode(plain, prompt, 64),
           "decode unfolded givens": decode(givens, prompt, 64)}
    res = time_interleaved(fns, device=device, repeats=3 * repeats)
    section = f"incremental decoding, 16-token prompt + 64 tokens, {z}, median of {3 * repeats}"
    rows += time_rows(SUITE, section, res, device=dev)
    rows.append(ratio_row(SUITE, section, "folded givens / plain RoPE", res, "decode folded givens",
                          "decode plain RoPE", key="decode folded/plain", device=dev))

    # 3. rotary time per training step, by placement
    embedding = _model(z, device, "embedding", "givens", g)  # its Rotary carries P
    attention = _model(z, device, "attention", "givens", g)  # P on the weights, plain RoPE
    fns = {
        "rotary work, embedding placement": rotations(embedding.rotary, [(z.batch, z.seq, z.dims)], device, g),
        "rotary work, attention placement": attention_rotary_work(attention, z.batch, z.seq, device, g),
        "(attention, P on activations instead)": rotations(
            embedding.rotary, [(z.batch, z.seq, z.heads, z.dims // z.heads)] * (2 * z.layers), device, g
        ),
    }
    res = time_interleaved(fns, device=device, repeats=3 * repeats)
    section = f"rotary time per training step (forward+backward), givens, {z}, median of {3 * repeats}"
    rows += time_rows(SUITE, section, res, device=dev)
    rows.append(ratio_row(SUITE, section, "embedding / attention placement", res, "rotary work, embedding placement",
                          "rotary work, attention placement", key="rotary embedding/attention", device=dev))
    rows.append(ratio_row(SUITE, section, "(context) same, were P on the activations in both placements", res,
                          "rotary work, embedding placement", "(attention, P on activations instead)", device=dev))
    return rows + positional_modes(z, device=device, repeats=max(1, repeats * 7 // 9), generator=g)


def positional_modes(z: Sizes, *, device: torch.device, repeats: int, generator: torch.Generator) -> list[Row]:
    """Tokens/s of a training step and of incremental decoding (16-token prompt, 64 tokens) for each positional
    mode of :data:`DECODER_MODES`, and the rotary's share of the training step."""
    tokens = torch.randint(0, z.vocab, (z.batch, z.seq + 1), device=device, generator=generator)
    prompt, steps = tokens[:, :16], 64
    models = {name: Decoder(DecoderConfig(vocab=z.vocab, ctx=z.seq + 16 + steps, dims=z.dims, heads=z.heads,
                                          layers=z.layers, **overrides)).to(device)
              for name, overrides in DECODER_MODES.items()}
    train = time_interleaved({n: train_step(m, tokens) for n, m in models.items()}, device=device, repeats=repeats,
                             warmup=1)
    dec = time_interleaved({n: decode(m, prompt, steps) for n, m in models.items()}, device=device, repeats=repeats,
                           warmup=1)
    work = {}
    for name, m in models.items():
        if m.config.positional == "rotary" and m.config.placement == "embedding":
            work[name] = rotations(m.rotary, [(z.batch, z.seq, z.dims)], device, generator)
        elif m.config.positional == "rotary":
            work[name] = attention_rotary_work(m, z.batch, z.seq, device, generator)
    rot = time_interleaved(work, device=device, repeats=repeats, warmup=1)
    section = f"positional modes, {z}, median of {repeats}"
    rows = time_rows(SUITE, section, {f"train step, {n}": ts for n, ts in train.items()}, device=str(device))
    for row, name in zip(rows, models):
        t = median(train[name])
        row.info["mode"] = name
        row.extra = {"train tokens/s": round(z.batch * z.seq / t), "decode tokens/s": round(z.batch * steps /
                     median(dec[name])), "rotary share": f"{median(rot[name]) / t:.1%}" if name in rot else "0"}
    return rows
