"""The implementations ``rotary bench`` compares, each behind the same small interface.

A contender builds, for one shape and dtype, a forward closure in its own natural layout and the tensors a
backward pass differentiates; its random inputs (and trained-looking parameters) come from the generator it is
given, a ``torch.Generator`` on the benchmark's device. Anchors that are not installed raise ImportError (the
runner skips them with one line); anything else that fails is reported as n/a with its error, never a crash.

Shapes: B batch, T sequence, H heads, D head_dim; ``offset`` is the position of the first token.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq: int
    heads: int
    head_dim: int
    offset: int = 0

    @property
    def numel(self) -> int:
        return self.batch * self.seq * self.heads * self.head_dim


@dataclass
class Case:
    forward: Callable[[], Tensor]
    inputs: list[Tensor]  # what backward differentiates: the input and any trainable parameters


def _x(shape: Shape, dtype, device, generator: torch.Generator, layout: str = "bthd") -> Tensor:
    B, T, H, D = shape.batch, shape.seq, shape.heads, shape.head_dim
    size = {"bthd": (B, T, H, D), "bhtd": (B, H, T, D), "btc": (B, T, H * D)}[layout]
    return torch.randn(size, dtype=dtype, device=device, generator=generator, requires_grad=True)


def copy_floor(shape, dtype, device, generator) -> Case:
    x = _x(shape, dtype, device, generator)
    return Case(lambda: x.clone(), [x])


def ours_apply_rotary(shape, dtype, device, generator) -> Case:
    from rotary import apply_rotary
    from rotary.core.frequencies import inverse_frequencies, rotary_angles

    x = _x(shape, dtype, device, generator)
    # the float32 (T, D/2) table a caller of apply_rotary keeps: built once, outside the timed region
    positions = torch.arange(shape.offset, shape.offset + shape.seq, device=device)
    angles = rotary_angles(positions, inverse_frequencies(shape.head_dim, 10000.0, device=device))
    cos, sin = angles.cos().float(), angles.sin().float()
    return Case(lambda: apply_rotary(x, cos, sin), [x])


def ours_module(mixing: str | None, interleaved: bool):
    def build(shape, dtype, device, generator) -> Case:
        from rotary import Rotary

        m = Rotary(shape.heads * shape.head_dim, shape.heads, mixing=mixing, interleaved=interleaved).to(device)
        if m.mixer is not None:
            with torch.no_grad():  # a trained-looking P, not the identity
                for p in m.parameters():
                    p.normal_(std=0.1, generator=generator)
        x = _x(shape, dtype, device, generator)
        return Case(lambda: m(x, offset=shape.offset, layout="BTHD"), [x, *m.parameters()])

    return build


def rotary_embedding_torch(shape, dtype, device, generator) -> Case:
    from rotary_embedding_torch import RotaryEmbedding

    emb = RotaryEmbedding(dim=shape.head_dim).to(device)
    x = _x(shape, dtype, device, generator, "bhtd")  # its layout: (B, H, T, D), seq_dim=-2
    return Case(lambda: emb.rotate_queries_or_keys(x, offset=shape.offset), [x])


def hf_transformers(shape, dtype, device, generator) -> Case:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=shape.heads * shape.head_dim,
        num_attention_heads=shape.heads,
        max_position_embeddings=max(2048, shape.offset + shape.seq),
    )
    emb = LlamaRotaryEmbedding(config).to(device)
    q = _x(shape, dtype, device, generator, "bhtd")
    k = q.detach()[:, :1].clone()  # it always rotates q and k together: give it a one-head k (1/H extra work)
    position_ids = torch.arange(shape.offset, shape.offset + shape.seq, device=device).expand(shape.batch, -1)

    def forward():
        cos, sin = emb(q, position_ids)  # the cos/sin construction is part of its cost
        return apply_rotary_pos_emb(q, k, cos, sin)[0]

    return Case(forward, [q])


def _torchtune_rope():
    """torchtune's ``RotaryPositionalEmbeddings``, from its one file (imports torch only), loaded by path.

    torchtune's package ``__init__`` imports torchao (0.6.1: its NF4 tensor, gone from torchao >= 0.12), and peft
    refuses LoRA layers beside a torchao older than 0.16: loading the file alone keeps torchao out of the bench
    environment. ``find_spec`` of a top-level name locates the package without executing its ``__init__``.
    """
    import importlib.util
    import sys

    name = "_rotary_bench_torchtune_position_embeddings"
    if name in sys.modules:
        return sys.modules[name].RotaryPositionalEmbeddings
    package = importlib.util.find_spec("torchtune")
    if package is None or not package.submodule_search_locations:
        raise ImportError("No module named 'torchtune'", name="torchtune")
    path = os.path.join(next(iter(package.submodule_search_locations)), "modules", "position_embeddings.py")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not os.path.exists(path):
        raise ImportError(f"torchtune without modules/position_embeddings.py ({path})", name="torchtune")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module.RotaryPositionalEmbeddings


def torchtune(shape, dtype, device, generator) -> Case:
    RotaryPositionalEmbeddings = _torchtune_rope()
    emb = RotaryPositionalEmbeddings(dim=shape.head_dim, max_seq_len=shape.offset + shape.seq).to(device)
    x = _x(shape, dtype, device, generator)  # its layout: (B, T, H, D)
    input_pos = torch.arange(shape.offset, shape.offset + shape.seq, device=device).expand(shape.batch, -1)
    return Case(lambda: emb(x, input_pos=input_pos), [x])


def meta_complex(shape, dtype, device, generator) -> Case:
    """Meta's llama reference: complex ``freqs_cis`` table, x viewed as complex, multiplied, viewed back."""
    D = shape.head_dim
    freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=device)[: D // 2].float() / D))
    t = torch.arange(shape.offset + shape.seq, device=device, dtype=torch.float32)
    freqs_cis = torch.polar(torch.ones(len(t), D // 2, device=device), torch.outer(t, freqs))
    x = _x(shape, dtype, device, generator)

    def forward():
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        f = freqs_cis[shape.offset : shape.offset + shape.seq].view(1, shape.seq, 1, D // 2)
        return torch.view_as_real(xc * f).flatten(3).type_as(x)

    return Case(forward, [x])


def original(shape, dtype, device, generator) -> Case:
    from rotary.lab.bench.original import OriginalRotary

    m = OriginalRotary(shape.heads * shape.head_dim, shape.heads).to(device)
    x = _x(shape, dtype, device, generator, "btc")

    def forward():
        m.rebuild()  # it cannot backward twice through its cached matrices
        return m(x)

    return Case(forward, [x, m.theta])


CONTENDERS: dict[str, Callable[..., Case]] = {
    "copy (floor)": copy_floor,
    "rotary.apply_rotary": ours_apply_rotary,
    "Rotary none": ours_module(None, True),
    "Rotary none half": ours_module(None, False),
    "Rotary givens": ours_module("givens", True),
    "Rotary givens half": ours_module("givens", False),
    "Rotary orthogonal": ours_module("orthogonal", True),
    "rotary-embedding-torch": rotary_embedding_torch,
    "HF apply_rotary_pos_emb": hf_transformers,
    "torchtune": torchtune,
    "Meta complex": meta_complex,
    "original module": original,
}
