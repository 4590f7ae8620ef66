"""Decode-time cost: the rotary per call at one-token shapes, and openai-whisper's per-token decoding time.

Two measurements, both returning plain numbers (the CLI prints them):

- :func:`per_call`: one new token, 12 heads x 64, at position ``offset``, under ``torch.inference_mode()``, for
  batch 1 and 16: a bare complex multiply by a precomputed ``freqs_cis`` row (Meta's reference implementation,
  the floor for any RoPE), ``Rotary(mixing=None)`` with an int offset and with a ``(B,)`` tensor offset,
  unfolded Givens mixing, and ``rotate_qk`` of one query against 100 keys (which rotates all 100 keys).
- :func:`whisper_decode`: greedy decoding with openai-whisper's own KV-cache hooks on a model shaped like
  ``tiny`` with 4 text layers of width 384 (6 heads, 1500 audio frames, vocabulary 51865), random weights, per
  token: stock, ``rotary.whisper.install(placement="attention")`` with trained-looking Givens angles, and the
  same after ``rotary.fold``, at several transcript lengths.

Every contender runs round-robin in one process (:func:`rotary.bench.timing.time_interleaved`), so ratios are
measured side by side. Inputs come from a ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import copy

import torch

from rotary import Rotary
from rotary.lab.bench.timing import median, spread, time_interleaved

HEADS, HEAD_DIM = 12, 64


def per_call(*, batches=(1, 16), offset: int = 4096, calls: int = 200, repeats: int = 15, seed: int = 0) -> list[dict]:
    """Microseconds per call at decode shapes; one dict per (batch, contender) with median, spread, ratio."""
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    plain = Rotary(HEADS * HEAD_DIM, HEADS, mixing=None)
    givens = Rotary(HEADS * HEAD_DIM, HEADS, mixing="givens")
    with torch.no_grad():
        givens.mixing.angles.uniform_(-3.0, 3.0, generator=generator)
    for m in (plain, givens):
        m(torch.zeros(1, 1, HEADS, HEAD_DIM), offset=offset + 128)  # grow the tables outside the timed region
    freqs_cis = plain.cis_cached  # (rows, 32) complex64: Meta's precomputed table
    out = []
    for B in batches:
        x = torch.randn(B, 1, HEADS, HEAD_DIM, generator=generator)
        keys = torch.randn(B, HEADS, 100, HEAD_DIM, generator=generator)
        offsets = torch.full((B,), offset)

        def bare():  # llama's apply_rotary_emb at one position
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * freqs_cis[offset : offset + 1].view(1, 1, 1, -1)).flatten(3).type_as(x)

        fns = {
            "bare complex multiply (Meta's freqs_cis)": bare,
            "Rotary(mixing=None), int offset": lambda: plain(x, offset=offset),
            "Rotary(mixing=None), (B,) tensor offset": lambda: plain(x, offset=offsets),
            "Rotary(mixing='givens'), unfolded": lambda: givens(x, offset=offset),
            "rotate_qk, 1 query and 100 keys": lambda: plain.rotate_qk(x.transpose(1, 2), keys, offset=offset),
        }
        timed = {name: _repeat(fn, calls) for name, fn in fns.items()}
        with torch.inference_mode():
            times = time_interleaved(timed, device=device, repeats=repeats, warmup=2)
        floor = median(times["bare complex multiply (Meta's freqs_cis)"])
        int_offset = median(times["Rotary(mixing=None), int offset"])
        for name, ts in times.items():
            out.append({"batch": B, "contender": name, "us": median(ts) / calls * 1e6, "spread": spread(ts),
                        "x_bare": median(ts) / floor, "x_int_offset": median(ts) / int_offset})
    return out


def _repeat(fn, n: int):
    def run():
        for _ in range(n):
            fn()

    return run


def whisper_model(generator: torch.Generator):
    """The benchmark's openai-whisper model (random weights, learned table initialised like GPT-2's)."""
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                           n_vocab=51865, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)
    model = Whisper(dims).eval()
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(std=0.01, generator=generator)
    return model


def greedy(model, audio_features: torch.Tensor, tokens: int) -> torch.Tensor:
    """``tokens`` greedy steps after a one-token prompt, through whisper's KV-cache hooks; returns the tokens."""
    cache, hooks = model.install_kv_cache_hooks()
    try:
        seq = torch.zeros(audio_features.shape[0], 1, dtype=torch.long)
        step = seq
        for _ in range(tokens):
            logits = model.decoder(step, audio_features, kv_cache=cache)
            step = logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, step], dim=1)
        return seq
    finally:
        for h in hooks:
            h.remove()


def whisper_decode(*, lengths=(50, 200, 440), repeats: int = 5, seed: int = 0) -> list[dict]:
    """Milliseconds per generated token, stock / installed (givens, unfolded) / folded, per transcript length."""
    import rotary.integrations.whisper

    generator = torch.Generator().manual_seed(seed)
    stock = whisper_model(generator)
    installed = rotary.whisper.install(copy.deepcopy(stock), placement="attention", mixing="givens")
    with torch.no_grad():
        installed.decoder.rotary.mixing.angles.uniform_(-3.0, 3.0, generator=generator)
    folded = rotary.fold(copy.deepcopy(installed))
    models = {"stock": stock, "installed (givens, unfolded)": installed, "folded": folded}
    mel = torch.randn(1, 80, 3000, generator=generator)
    out = []
    with torch.inference_mode():
        features = stock.encoder(mel)  # the same audio features for all: only the decoder is compared
        for tokens in lengths:
            fns = {name: (lambda m=m, n=tokens: greedy(m, features, n)) for name, m in models.items()}
            times = time_interleaved(fns, device=torch.device("cpu"), repeats=repeats, warmup=1)
            base = median(times["stock"])
            for name, ts in times.items():
                out.append({"tokens": tokens, "model": name, "ms_per_token": median(ts) / tokens * 1e3,
                            "spread": spread(ts), "x_stock": median(ts) / base})
    return out
