"""The variants of `rotary compare --tasks extend`: what each one trains on the pretrained decoder, and the small
adapters some of them add (LoRA, a key bias).

Shapes: C width, r LoRA rank.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rotary.core.module import Rotary
from rotary.integrations.decoder import Decoder
from rotary.lab.experiments.schemes import eval_scaling

__all__ = ["GROUPS", "VARIANTS", "Adapted", "Variant", "build_variant", "rotary_parameters"]

GROUPS = ("zero-shot", "rotary only", "baseline")


@dataclass(frozen=True)
class Variant:
    """What a variant trains (parts, see :func:`build_variant`) and the scaling set on its Rotary, if any."""

    group: str  # one of GROUPS
    trains: tuple[str, ...]
    description: str
    scaling: str | None = None  # "ntk" or "yarn", at factor x L


VARIANTS: dict[str, Variant] = {
    "plain": Variant("zero-shot", (), "the pretrained model as it is (plain RoPE)"),
    "ntk": Variant("zero-shot", (), "NTK-aware scaling at the factor", "ntk"),
    "yarn": Variant("zero-shot", (), "YaRN at the factor", "yarn"),
    "freq": Variant("rotary only", ("freq",), "learned frequencies (a log scale per pair)"),
    "givens": Variant("rotary only", ("mixer",), "learned Givens P"),
    "givens-freq": Variant("rotary only", ("mixer", "freq"), "learned P and frequencies"),
    "yarn-givens-freq": Variant("rotary only", ("mixer", "freq"), "learned P and frequencies on top of YaRN",
                                "yarn"),
    "ln-gains": Variant("baseline", ("ln-gains",), "LayerNorm gains"),
    "qk-bias": Variant("baseline", ("qk-bias",), "the query bias and a new key bias (at zero)"),
    "lora": Variant("baseline", ("lora",), "LoRA on W_q and W_k"),
    "lora-givens-freq": Variant("baseline", ("lora", "mixer", "freq"), "LoRA with learned P and frequencies"),
    "wqk": Variant("baseline", ("wqk",), "W_q and W_k in full (and the query bias)"),
    "all": Variant("baseline", ("all",), "every weight, P and frequencies"),
}


def rotary_parameters(rot: Rotary) -> list[nn.Parameter]:
    """P's angles and the log frequency scales, those the Rotary has."""
    mixer = rot.mixer
    return [p for p in (*(mixer.parameters() if mixer is not None else ()), rot.angles.log_freq_scale)
            if p is not None]


def _rebuilt_rotary(source: Rotary, *, mixer: bool, learned_freq: bool, scaling: dict | None) -> Rotary:
    """``source``'s options with P and learned frequencies kept or dropped and ``scaling`` set, its parameters
    copied where kept. Dropping them while they are at the identity is exact, and plain RoPE's table is faster."""
    rot = Rotary.from_options(dataclasses.replace(source.options, mixing="givens" if mixer else None,
                                                  learned_freq=learned_freq, scaling=scaling))
    own = rot.state_dict()
    rot.load_state_dict({k: v for k, v in source.state_dict().items() if k in own})  # strict: nothing missing
    return rot.to(next(source.buffers()).device)


class Adapted(nn.Module):
    """A frozen linear layer plus what a variant trains on it: a rank-r update ``B A`` (LoRA; A drawn as
    ``nn.Linear`` draws weights, B at zero, scale 1) and/or a new bias at zero.

    ``weight`` and ``bias`` are properties, not parameters: with P the decoder mixes the q/k weights by reading
    ``query.weight`` directly, and so sees the update too (peft's LoRA layer adds its update in ``forward`` alone,
    which that path never calls). ``forward`` is ``F.linear`` with them, in the input's dtype like the decoder's.
    """

    def __init__(self, base: nn.Linear, *, rank: int = 0, bias: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.lora_a = self.lora_b = self.new_bias = None
        device = base.weight.device
        if rank:
            bound = 1 / math.sqrt(base.in_features)  # nn.Linear's (and peft's) kaiming_uniform_(a=sqrt(5))
            a = torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator)
            self.lora_a = nn.Parameter(a.to(device))  # (r, C_in)
            self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))  # (C_out, r)
        if bias:
            self.new_bias = nn.Parameter(torch.zeros(base.out_features, device=device))

    @property
    def weight(self) -> Tensor:
        w = self.base.weight
        return w if self.lora_a is None else w + self.lora_b @ self.lora_a  # (C_out, C_in)

    @property
    def bias(self) -> Tensor | None:
        b = self.base.bias
        if self.new_bias is None:
            return b
        return self.new_bias if b is None else b + self.new_bias

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias
        return F.linear(x, self.weight.to(x.dtype), None if b is None else b.to(x.dtype))


def build_variant(pretrained: Decoder, name: str, *, factor: int, length: int, lora_rank: int,
                  generator: torch.Generator) -> tuple[Decoder, dict[str, list[nn.Parameter]]]:
    """A copy of ``pretrained`` set up as variant ``name`` (fine-tuned at ``factor`` x ``length``), all frozen
    except what it trains; returns the model and its trained parameters by learning-rate group: ``rotary`` (P's
    angles, the log frequency scales), ``adapter`` (LayerNorm gains, biases, LoRA) and ``weights`` (weight
    matrices; for ``all``, every parameter but the rotary ones). ``generator`` draws LoRA's A, layer by layer.

    Parts: ``freq`` the Rotary's log frequency scales; ``mixer`` its Givens angles; ``ln-gains`` the LayerNorm
    weights; ``qk-bias`` the query bias and a new key bias; ``lora`` a rank-``lora_rank`` update of every W_q and
    W_k; ``wqk`` every W_q and W_k (the query bias with them); ``all`` every parameter. P and the learned
    frequencies are dropped where a variant does not train them (they are at the identity, so nothing changes),
    and its scaling, if any, is set on the Rotary."""
    variant = VARIANTS[name]
    parts = set(variant.trains)
    model = copy.deepcopy(pretrained)
    mixer, freq = bool(parts & {"mixer", "all"}), bool(parts & {"freq", "all"})
    scaling = None if variant.scaling is None else eval_scaling(variant.scaling, factor, length)
    model.rotary = _rebuilt_rotary(model.rotary, mixer=mixer, learned_freq=freq, scaling=scaling)
    model.config = dataclasses.replace(model.config, mixing="givens" if mixer else None, learned_freq=freq)
    model.requires_grad_(False)
    attns = [b.attn for b in model.blocks]
    if "lora" in parts:
        for a in attns:
            a.query = Adapted(a.query, rank=lora_rank, generator=generator)
            a.key = Adapted(a.key, rank=lora_rank, generator=generator)
    if "qk-bias" in parts:
        for a in attns:
            a.key = Adapted(a.key, bias=True)
    groups: dict[str, list[nn.Parameter]] = {"rotary": rotary_parameters(model.rotary) if mixer or freq else [],
                                             "adapter": [], "weights": []}
    if "all" in parts:
        groups["weights"] = [p for p in model.parameters() if all(p is not q for q in groups["rotary"])]
    if "ln-gains" in parts:
        groups["adapter"] += [m.weight for m in model.modules() if isinstance(m, nn.LayerNorm)]
    if "qk-bias" in parts:
        groups["adapter"] += [p for a in attns for p in (a.query.bias, a.key.new_bias)]
    if "lora" in parts:
        groups["adapter"] += [p for a in attns for lin in (a.query, a.key) for p in (lin.lora_a, lin.lora_b)]
    if "wqk" in parts:
        groups["weights"] += [lin.weight for a in attns for lin in (a.query, a.key)]
        groups["adapter"] += [a.query.bias for a in attns]
    for p in (p for ps in groups.values() for p in ps):
        p.requires_grad_(True)
    return model, groups
