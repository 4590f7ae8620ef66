"""Suite ``decode``: the rotary per call at one-token shapes, and openai-whisper's per-token decoding time.

Two measurements (:func:`suite` turns them into rows; the targets are in ``rotary.lab.bench.targets``):

- :func:`per_call`: one new token, 12 heads x 64, at position ``offset``, under ``torch.inference_mode()``, for
  batch 1 and 16: a bare complex multiply by a precomputed ``freqs_cis`` row (Meta's reference implementation,
  the floor for any RoPE), ``Rotary(mixing=None)`` with an int offset and with a ``(B,)`` tensor offset,
  unfolded Givens mixing, and ``rotate_qk`` of one query against 100 keys (which rotates all 100 keys).
- :func:`whisper_decode`: greedy decoding with openai-whisper's own KV-cache hooks on a model shaped like
  ``tiny`` with 4 text layers of width 384 (6 heads, 1500 audio frames, vocabulary 51865), random weights, per
  token: stock, ``rotary.whisper.install(placement="attention")`` with trained-looking Givens angles, and the
  same after ``rotary.fold``, at several transcript lengths.

Every contender runs round-robin in one process (:func:`rotary.lab.bench.timing.time_interleaved`), so ratios are
measured side by side. Inputs come from a ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import copy

import torch

from rotary import Rotary
from rotary.lab.bench.rows import Row, ratio_row, time_rows
from rotary.lab.bench.timing import time_interleaved

SUITE = "decode"
HEADS, HEAD_DIM = 12, 64
BARE = "bare complex multiply (Meta's freqs_cis)"
INT = "Rotary(mixing=None), int offset"
TENSOR = "Rotary(mixing=None), (B,) tensor offset"
GIVENS = "Rotary(mixing='givens'), unfolded"
LENGTHS = (50, 200, 440)


def per_call(*, batches=(1, 16), offset: int = 4096, calls: int = 200, repeats: int = 15,
             seed: int = 0) -> dict[int, dict[str, list[float]]]:
    """Seconds per ``calls`` calls at decode shapes, for each batch: contender -> the repeats."""
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    plain = Rotary(HEADS * HEAD_DIM, HEADS, mixing=None)
    givens = Rotary(HEADS * HEAD_DIM, HEADS, mixing="givens")
    with torch.no_grad():
        givens.mixer.angles.uniform_(-3.0, 3.0, generator=generator)
    for m in (plain, givens):
        # grow the tables outside the timed region
        m(torch.zeros(1, 1, HEADS, HEAD_DIM), offset=offset + 128, layout="BTHD")
    freqs_cis = plain.angles.cis_table  # (rows, 32) complex64: Meta's precomputed table
    out = {}
    for B in batches:
        x = torch.randn(B, 1, HEADS, HEAD_DIM, generator=generator)
        keys = torch.randn(B, HEADS, 100, HEAD_DIM, generator=generator)
        offsets = torch.full((B,), offset)

        def bare(x=x):  # llama's apply_rotary_emb at one position
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * freqs_cis[offset : offset + 1].view(1, 1, 1, -1)).flatten(3).type_as(x)

        fns = {
            BARE: bare,
            INT: lambda x=x: plain(x, offset=offset, layout="BTHD"),
            TENSOR: lambda x=x, offsets=offsets: plain(x, offset=offsets, layout="BTHD"),
            GIVENS: lambda x=x: givens(x, offset=offset, layout="BTHD"),
            "rotate_qk, 1 query and 100 keys": lambda x=x, k=keys: plain.rotate_qk(x.transpose(1, 2), k, offset=offset),
        }
        timed = {name: _repeat(fn, calls) for name, fn in fns.items()}
        with torch.inference_mode():
            out[B] = time_interleaved(timed, device=device, repeats=repeats, warmup=2)
    return out


def _repeat(fn, n: int):
    def run():
        for _ in range(n):
            fn()

    return run


def whisper_model(generator: torch.Generator, *, tiny: bool = False):
    """The benchmark's openai-whisper model (random weights, learned table initialised like GPT-2's); ``tiny``: a
    one-layer model 64 wide for smoke runs."""
    from whisper.model import ModelDimensions, Whisper

    if tiny:
        dims = ModelDimensions(n_mels=80, n_audio_ctx=8, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                               n_vocab=512, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)
    else:
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


def whisper_decode(*, lengths=LENGTHS, repeats: int = 5, seed: int = 0,
                   tiny: bool = False) -> dict[int, dict[str, list[float]]]:
    """Seconds per greedy decode of each transcript length: model (stock, installed (givens, unfolded), folded) ->
    the repeats."""
    import rotary.integrations.whisper

    generator = torch.Generator().manual_seed(seed)
    stock = whisper_model(generator, tiny=tiny)
    installed = rotary.whisper.install(copy.deepcopy(stock), placement="attention", mixing="givens")
    with torch.no_grad():
        installed.decoder.rotary.mixer.angles.uniform_(-3.0, 3.0, generator=generator)
    folded = rotary.fold(copy.deepcopy(installed))
    models = {"stock": stock, "installed (givens, unfolded)": installed, "folded": folded}
    mel = torch.randn(1, 80, 2 * stock.dims.n_audio_ctx, generator=generator)
    out = {}
    with torch.inference_mode():
        features = stock.encoder(mel)  # the same audio features for all: only the decoder is compared
        for tokens in lengths:
            fns = {name: (lambda m=m, n=tokens: greedy(m, features, n)) for name, m in models.items()}
            out[tokens] = time_interleaved(fns, device=torch.device("cpu"), repeats=repeats, warmup=1)
    return out


def suite(*, quick: bool, device: torch.device, seed: int, repeats: int | None, log) -> list[Row]:
    """Per call (us) at batch 1 and 16 with the ratios the targets judge; openai-whisper ms per token at each
    length with installed / stock and folded / stock (skipped with a logged line without openai-whisper)."""
    calls, reps = (10, repeats or 2) if quick else (200, repeats or 15)
    rows: list[Row] = []
    for B, times in per_call(batches=(1,) if quick else (1, 16), calls=calls, repeats=reps, seed=seed).items():
        section = f"per call, one token, batch {B}, {HEADS} heads x {HEAD_DIM}, offset 4096, inference_mode, " \
                  f"median of {reps} x {calls} calls"
        rows += time_rows(SUITE, section, times, device="cpu", unit="us/call", per=calls, batch=B)
        for name, a, b, key in (("int offset / bare", INT, BARE, "int/bare"),
                                ("(B,) tensor offset / int offset", TENSOR, INT, "tensor/int"),
                                ("givens unfolded / bare", GIVENS, BARE, "givens/bare"),
                                ("rotate_qk (100 keys) / bare", "rotate_qk, 1 query and 100 keys", BARE, None)):
            rows.append(ratio_row(SUITE, section, name, times, a, b, key=key, device="cpu", batch=B))
    try:
        import whisper  # noqa: F401
    except ImportError:
        log("decode: openai-whisper not installed, its part skipped; pip install 'rotary[whisper]'")
        return rows
    reps = repeats or (1 if quick else 9)
    lengths = (3,) if quick else LENGTHS
    model = "1 layer x 64 (smoke run)" if quick else "4 text layers x 384"
    for tokens, times in whisper_decode(lengths=lengths, repeats=reps, seed=seed, tiny=quick).items():
        section = f"openai-whisper, {model}, greedy decoding of {tokens} tokens, median of {reps}"
        rows += time_rows(SUITE, section, times, device="cpu", unit="ms/token", per=tokens, tokens=tokens)
        rows += [ratio_row(SUITE, section, f"{name} / stock", times, name, "stock", key=f"whisper {key}/stock",
                           device="cpu", tokens=tokens)
                 for name, key in (("installed (givens, unfolded)", "installed"), ("folded", "folded"))]
    return rows
