"""Suite ``hf-whisper``: Hugging Face Whisper with a rotary installed against stock (targets in
``rotary.lab.bench.targets``).

Model: transformers' ``WhisperForConditionalGeneration`` shaped like ``tiny`` with 4 decoder layers 384 wide
(6 heads, 4 encoder layers, 80 mel bins, 1500 audio frames, vocabulary 51865), random weights, fp32. Contenders
share one set of weights. Two sections, each the median of interleaved repeats:

1. greedy decoding of ``tokens`` tokens with HF's ``EncoderDecoderCache`` (the encoder runs once, outside the
   timed region; each token is one decoder forward and an argmax), time per token: ``rotary.hf.install(model)``
   (attention placement, givens, unfolded) / stock. For context: after ``rotary.fold`` / stock.
2. training step (forward with ``labels``, backward, AdamW step) on a batch of log-mel features: installed /
   stock.
"""

from __future__ import annotations

import copy

import torch

import rotary
from rotary.lab.bench.rows import Row, ratio_row, time_rows
from rotary.lab.bench.timing import time_interleaved

SUITE = "hf-whisper"
LAYERS, D_MODEL, HEADS, VOCAB, AUDIO_FRAMES, MELS = 4, 384, 6, 51865, 1500, 80
QUICK = {"tokens": 4, "train_batch": 1, "train_tokens": 4, "layers": 1, "d_model": 64, "heads": 2, "vocab": 512,
         "audio_frames": 16}


def whisper(*, layers: int = LAYERS, d_model: int = D_MODEL, heads: int = HEADS, vocab: int = VOCAB,
            audio_frames: int = AUDIO_FRAMES, device="cpu"):
    """A random ``WhisperForConditionalGeneration`` of the benchmark's shape (weights from the global RNG)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=vocab, num_mel_bins=MELS, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model, max_source_positions=audio_frames, max_target_positions=448,
        pad_token_id=vocab - 1, bos_token_id=vocab - 2, eos_token_id=vocab - 2, decoder_start_token_id=vocab - 3,
    )
    return WhisperForConditionalGeneration(config).to(device)


def install(stock, generator: torch.Generator, **options):
    """A copy of ``stock`` with a rotary installed and trained-looking mixing parameters."""
    model = rotary.hf.install(copy.deepcopy(stock), **options)
    with torch.no_grad():  # the cost does not depend on the values
        for p in model.model.decoder.rotary.mixer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, device=p.device) * 0.1)
    return model


def decode(model, encoded, start: torch.Tensor, tokens: int):
    """Greedy decoding of ``tokens`` tokens after ``start`` ``(B, 1)``, with transformers' cache; no grad."""

    def run():
        with torch.no_grad():
            out = model(encoder_outputs=encoded, decoder_input_ids=start, use_cache=True)
            for _ in range(tokens - 1):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
                out = model(encoder_outputs=encoded, decoder_input_ids=nxt, cache=out.cache, use_cache=True)
        return out

    return run


def train_step(model, features: torch.Tensor, labels: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = model(features, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def suite(*, quick: bool, device: torch.device, seed: int, repeats: int | None, log, tokens: int = 200,
          batch: int = 1, train_batch: int = 4, train_tokens: int = 64, layers: int = LAYERS, d_model: int = D_MODEL,
          heads: int = HEADS, vocab: int = VOCAB, audio_frames: int = AUDIO_FRAMES,
          sections: tuple[str, ...] = ("decode", "train")) -> list[Row]:
    """The sections of the module docstring as rows: each model's median (ms per token for decoding, ms per step
    for training) and the ratios to stock. Inputs and mixing parameters come from a ``torch.Generator`` seeded
    with ``seed``; the models' random weights from the global RNG (the CLI seeds it)."""
    import transformers  # noqa: F401  (missing: the runner skips the suite)

    if quick:
        tokens, train_batch, train_tokens = QUICK["tokens"], QUICK["train_batch"], QUICK["train_tokens"]
        layers, d_model, heads, vocab, audio_frames = (QUICK[k] for k in ("layers", "d_model", "heads", "vocab",
                                                                          "audio_frames"))
    if not 1 <= tokens <= 447:
        raise ValueError(f"tokens must be in [1, 447] (stock Whisper's 448 positions hold the start token too), "
                         f"got {tokens}")
    repeats = repeats or (1 if quick else 5)
    g = torch.Generator(device).manual_seed(seed)
    dev = str(device)
    stock = whisper(layers=layers, d_model=d_model, heads=heads, vocab=vocab, audio_frames=audio_frames,
                    device=device)
    model = f"Whisper {layers} + {layers} layers, d_model {d_model}, {heads} heads, vocab {vocab}, " \
            f"{audio_frames} frames, fp32, median of {repeats}"
    rows: list[Row] = []
    if "decode" in sections:
        models = {
            "decode stock": stock.eval(),
            "decode installed (attention, givens)": install(stock, g).eval(),
            "decode folded": rotary.fold(install(stock, g)).eval(),
        }
        features = torch.randn(batch, MELS, 2 * audio_frames, generator=g, device=device)
        start = torch.full((batch, 1), stock.config.decoder_start_token_id, device=device)
        with torch.no_grad():
            encoded = (stock.model.encoder(features).last_hidden_state,)  # the same audio for every contender
        fns = {name: decode(m, encoded, start, tokens) for name, m in models.items()}
        res = time_interleaved(fns, device=device, repeats=repeats, warmup=1)
        section = f"greedy decoding of {tokens} tokens, batch {batch}, time per token, {model}"
        rows += time_rows(SUITE, section, res, device=dev, unit="ms/token", per=tokens)
        rows.append(ratio_row(SUITE, section, "per token, installed / stock", res,
                              "decode installed (attention, givens)", "decode stock", key="decode installed/stock",
                              device=dev))
        rows.append(ratio_row(SUITE, section, "(context) per token, folded / stock", res, "decode folded",
                              "decode stock", device=dev))
    if "train" in sections:
        features = torch.randn(train_batch, MELS, 2 * audio_frames, generator=g, device=device)
        labels = torch.randint(0, vocab - 3, (train_batch, train_tokens), generator=g, device=device)
        installed_model = install(stock, g).train()
        fns = {"train stock": train_step(stock.train(), features, labels),
               "train installed (attention, givens)": train_step(installed_model, features, labels)}
        res = time_interleaved(fns, device=device, repeats=repeats, warmup=1)
        section = f"training step, batch {train_batch} x {train_tokens} tokens, {model}"
        rows += time_rows(SUITE, section, res, device=dev)
        rows.append(ratio_row(SUITE, section, "installed / stock", res, "train installed (attention, givens)",
                              "train stock", key="train installed/stock", device=dev))
    return rows
