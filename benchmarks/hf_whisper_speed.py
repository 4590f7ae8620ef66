"""Hugging Face Whisper with rotary installed against stock: decode time per token and training step time.

    python benchmarks/hf_whisper_speed.py                      # the issue's setting (4 x 384, 6 heads, 200 tokens)
    python benchmarks/hf_whisper_speed.py --tokens 8 --repeats 1 --layers 1 --d-model 64 --heads 2 \
        --vocab 512 --audio-frames 16 --train-batch 1 --train-tokens 4      # a smoke run

Prints the machine, each contender's median and spread, and the ratios against the targets. The measuring is in
rotary.bench.hf_whisper_speed; this script parses flags, seeds the RNGs and prints.
"""

from __future__ import annotations

import argparse
import platform

import torch

from rotary.lab.bench import hf_whisper_speed
from rotary.lab.bench.timing import median, spread


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200, help="tokens decoded greedily (at most 447)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="decoding batch")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-tokens", type=int, default=64, help="label length of a training step")
    parser.add_argument("--layers", type=int, default=hf_whisper_speed.LAYERS, help="encoder and decoder layers")
    parser.add_argument("--d-model", type=int, default=hf_whisper_speed.D_MODEL)
    parser.add_argument("--heads", type=int, default=hf_whisper_speed.HEADS)
    parser.add_argument("--vocab", type=int, default=hf_whisper_speed.VOCAB)
    parser.add_argument("--audio-frames", type=int, default=hf_whisper_speed.AUDIO_FRAMES)
    parser.add_argument("--sections", nargs="+", choices=("decode", "train"), default=["decode", "train"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.tokens > 447:
        parser.error(f"--tokens must be in [1, 447] (stock Whisper's table has 448 positions), got {args.tokens}")

    torch.manual_seed(args.seed)  # the models' random weights
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    sections = hf_whisper_speed.measure(
        tokens=args.tokens, repeats=args.repeats, batch=args.batch, train_batch=args.train_batch,
        train_tokens=args.train_tokens, layers=args.layers, d_model=args.d_model, heads=args.heads,
        vocab=args.vocab, audio_frames=args.audio_frames, device=args.device, seed=args.seed,
        sections=tuple(args.sections),
    )
    for section in sections:
        print(f"\n{section['title']}")
        for name, times in section["times"].items():
            print(f"  {name:<40} {1e3 * median(times):10.3f} ms  (spread {spread(times):.1%}, {len(times)} runs)")
        for ratio in section["ratios"]:
            verdict = "" if ratio.target is None else f"  target {ratio.target}: {'ok' if ratio.ok else 'MISSED'}"
            print(f"  {ratio.label}: {ratio.value:.3f}{verdict}")


if __name__ == "__main__":
    main()
