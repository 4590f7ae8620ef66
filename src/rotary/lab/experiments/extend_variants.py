"""The variants of `rotary compare --tasks extend`: what each one trains on the pretrained decoder, how (plain
fine-tuning, a share of 1x L windows, PoSE's skipped positions, or LongRoPE's gradient-free search), and the small
adapters some of them add (LoRA, a key bias).

The rotary-only variants train the log frequency scales (one per rotated pair; the decoder shares one Rotary by all
its layers), whole or in part: all of them; only the pairs whose wavelength is at least L (the shorter ones, which
turn at least once inside the pretraining window, stay as pretrained: YaRN's observation); or a YaRN-style ramp of
three learned numbers. Every one of them is one set of per-pair factors, which a stock ``longrope`` config holds
with equal short and long factors (:func:`export_rope_parameters`). ``freq-layer-*`` (a scale per pair and layer)
is the reference that no stock config holds; ``givens-*`` add P, which a stock config holds only folded into W_q
and W_k.

Shapes: C width, r LoRA rank, r/2 rotated pairs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from rotary.core.module import Rotary
from rotary.integrations.decoder import Decoder
from rotary.lab.experiments.schemes import eval_scaling

__all__ = ["DEFAULT_VARIANTS", "GROUPS", "VARIANTS", "Adapted", "Variant", "YarnRamp", "build_variant",
           "export_rope_parameters", "frequencies_of", "rotary_parameters"]

GROUPS = ("zero-shot", "search", "rotary only", "baseline")


@dataclass(frozen=True)
class Variant:
    """What a variant trains (parts, see :func:`build_variant`), how, and the scaling set on its Rotary, if any.

    mix: a share of every fine-tuning batch's tokens (``ExtendConfig.mix_share``) comes as 1x L windows, so that
    the pretraining length keeps counting. pose: the factor x L windows carry PoSE's skipped positions up to the
    longest evaluation length. search: the parts are set by LongRoPE's gradient-free search, not trained."""

    group: str  # one of GROUPS
    trains: tuple[str, ...]
    description: str
    scaling: str | None = None  # "ntk" or "yarn", at factor x L
    mix: bool = False
    pose: bool = False
    search: bool = False

    @property
    def exportable(self) -> bool:
        """Whether the result is one set of per-pair frequency factors (a stock ``longrope`` config)."""
        rotary = {"freq", "freq-low", "freq-ramp"}
        return self.group in ("zero-shot", "search") or (bool(self.trains) and set(self.trains) <= rotary)


_FREQ = "learned frequencies (a log scale per pair)"
VARIANTS: dict[str, Variant] = {
    "plain": Variant("zero-shot", (), "the pretrained model as it is (plain RoPE)"),
    "ntk": Variant("zero-shot", (), "NTK-aware scaling at the factor", "ntk"),
    "yarn": Variant("zero-shot", (), "YaRN at the factor", "yarn"),
    "search": Variant("search", ("freq",), "LongRoPE-style evolutionary search of a factor per pair (monotone, at "
                      "least 1), as many loss evaluations as the others take steps", search=True),
    "freq": Variant("rotary only", ("freq",), _FREQ),
    "freq-low": Variant("rotary only", ("freq-low",), "learned scales of the pairs whose wavelength is at least L; "
                        "the shorter ones fixed"),
    "freq-ramp": Variant("rotary only", ("freq-ramp",), "a YaRN-style ramp, 3 learned numbers: the low-frequency "
                         "factor and where the ramp starts and ends"),
    "freq-mix": Variant("rotary only", ("freq",), _FREQ + ", a share of 1x L windows", mix=True),
    "freq-pose": Variant("rotary only", ("freq",), _FREQ + ", PoSE positions", pose=True),
    "freq-mix-pose": Variant("rotary only", ("freq",), _FREQ + ", 1x L windows and PoSE", mix=True, pose=True),
    "freq-low-mix-pose": Variant("rotary only", ("freq-low",), "the long-wavelength scales, 1x L windows and PoSE",
                                 mix=True, pose=True),
    "freq-ramp-mix-pose": Variant("rotary only", ("freq-ramp",), "the ramp, 1x L windows and PoSE", mix=True,
                                  pose=True),
    "freq-layer-mix-pose": Variant("rotary only", ("freq-layer",), "a scale per pair and layer (no stock config "
                                   "holds it), 1x L windows and PoSE", mix=True, pose=True),
    "givens": Variant("rotary only", ("mixer",), "learned Givens P"),
    "givens-freq": Variant("rotary only", ("mixer", "freq"), "learned P and frequencies"),
    "yarn-givens-freq": Variant("rotary only", ("mixer", "freq"), "learned P and frequencies on top of YaRN",
                                "yarn"),
    "ln-gains": Variant("baseline", ("ln-gains",), "LayerNorm gains"),
    "qk-bias": Variant("baseline", ("qk-bias",), "the query bias and a new key bias (at zero)"),
    "lora": Variant("baseline", ("lora",), "LoRA on W_q and W_k"),
    "lora-mix-pose": Variant("baseline", ("lora",), "LoRA on W_q and W_k, 1x L windows and PoSE", mix=True,
                             pose=True),
    "lora-givens-freq": Variant("baseline", ("lora", "mixer", "freq"), "LoRA with learned P and frequencies"),
    "wqk": Variant("baseline", ("wqk",), "W_q and W_k in full (and the query bias)"),
    "all": Variant("baseline", ("all",), "every weight, P and frequencies"),
}

# what `rotary compare --tasks extend` runs unless told otherwise (--extend-variants): about 12 minutes on 2 cores
DEFAULT_VARIANTS = ("plain", "ntk", "yarn", "search", "freq", "freq-low", "freq-ramp", "freq-mix", "freq-pose",
                    "freq-mix-pose", "freq-low-mix-pose", "freq-ramp-mix-pose", "freq-layer-mix-pose", "qk-bias",
                    "lora", "all")


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


def _wavelength_ratios(rot: Rotary, length: int) -> Tensor:
    """``L / wavelength`` of each pair at its pretrained frequency, ``(r/2,)`` float64: above 1 for the pairs that
    turn at least once inside the pretraining window."""
    return length * rot.angles._base_frequencies(torch.device("cpu")).double() / (2 * math.pi)


class YarnRamp(nn.Module):
    """A parametrization of the log frequency scales by YaRN's ramp (Peng et al., 2023) with its three numbers
    learned: pair i with ``r_i = L / wavelength_i`` turns at ``w_i ((1 - g_i) / s + g_i)``, where
    ``g_i = clamp((log r_i - a) / (b - a), 0, 1)``: interpolated by s below the ramp, untouched above it. YaRN's
    own ramp is linear in r from alpha = 1 to beta = 32; this one is linear in log r (the pairs are spread
    geometrically), starts at YaRN's (s = factor, a = log 1, b = log 32) and learns ``log s``, ``a`` and
    ``log (b - a)`` (which keeps b above a)."""

    def __init__(self, ratios: Tensor, factor: float):
        super().__init__()
        self.register_buffer("log_ratio", ratios.log().float())  # (r/2,)
        self.log_factor = nn.Parameter(torch.tensor(math.log(factor)))
        self.start = nn.Parameter(torch.tensor(0.0))
        self.log_width = nn.Parameter(torch.tensor(math.log(math.log(32.0))))

    def forward(self, _original: Tensor) -> Tensor:
        g = ((self.log_ratio - self.start) / self.log_width.exp()).clamp(0.0, 1.0)  # (r/2,) 0 below, 1 above
        return torch.log((1 - g) * torch.exp(-self.log_factor) + g)  # log of the per-pair scale


def _per_layer_rotary(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a self-attention with its own Rotary (``layer_rotary``): it replaces the shared one."""
    return args, {**kwargs, "rotary": module.layer_rotary}


def build_variant(pretrained: Decoder, name: str, *, factor: int, length: int, lora_rank: int,
                  generator: torch.Generator) -> tuple[Decoder, dict[str, list[nn.Parameter]], int]:
    """A copy of ``pretrained`` set up as variant ``name`` (fine-tuned at ``factor`` x ``length``), all frozen
    except what it trains; returns the model, its trained parameters by learning-rate group (``rotary``: P's
    angles, the log frequency scales or the ramp's numbers; ``adapter``: LayerNorm gains, biases, LoRA;
    ``weights``: weight matrices, for ``all`` every parameter but the rotary ones) and how many numbers it trains
    (fewer than the parameters hold where a gradient mask fixes some). ``generator`` draws LoRA's A, layer by
    layer.

    Parts: ``freq`` the Rotary's log frequency scales; ``freq-low`` those of the pairs whose wavelength is at least
    ``length`` (a gradient mask keeps the others at zero); ``freq-ramp`` a :class:`YarnRamp` of them; ``freq-layer``
    a scale per pair in each layer (a Rotary of its own per self-attention, the shared one left plain); ``mixer``
    its Givens angles; ``ln-gains`` the LayerNorm weights; ``qk-bias`` the query bias and a new key bias; ``lora`` a
    rank-``lora_rank`` update of every W_q and W_k; ``wqk`` every W_q and W_k (the query bias with them); ``all``
    every parameter. P and the learned frequencies are dropped where a variant does not train them (they are at the
    identity, so nothing changes), and its scaling, if any, is set on the Rotary."""
    variant = VARIANTS[name]
    parts = set(variant.trains)
    model = copy.deepcopy(pretrained)
    mixer = bool(parts & {"mixer", "all"})
    freq = bool(parts & {"freq", "freq-low", "freq-ramp", "all"})
    scaling = None if variant.scaling is None else eval_scaling(variant.scaling, factor, length)
    model.rotary = _rebuilt_rotary(model.rotary, mixer=mixer, learned_freq=freq, scaling=scaling)
    model.config = dataclasses.replace(model.config, mixing="givens" if mixer else None, learned_freq=freq)
    model.requires_grad_(False)
    attns = [b.attn for b in model.blocks]
    groups: dict[str, list[nn.Parameter]] = {"rotary": rotary_parameters(model.rotary) if mixer or freq else [],
                                             "adapter": [], "weights": []}
    count = 0
    angles = model.rotary.angles
    if "freq-low" in parts:
        keep = (_wavelength_ratios(model.rotary, length) <= 1).to(angles.log_freq_scale)  # (r/2,) 1 = trained
        count -= int((keep == 0).sum())
    if "freq-ramp" in parts:
        ramp = YarnRamp(_wavelength_ratios(model.rotary, length), factor).to(angles.log_freq_scale.device)
        parametrize.register_parametrization(angles, "log_freq_scale", ramp)
        groups["rotary"] = list(ramp.parameters())
    if "freq-layer" in parts:
        for a in attns:
            a.layer_rotary = _rebuilt_rotary(pretrained.rotary, mixer=False, learned_freq=True, scaling=None)
            a.register_forward_pre_hook(_per_layer_rotary, with_kwargs=True)
            groups["rotary"].append(a.layer_rotary.angles.log_freq_scale)
    if "lora" in parts:
        for a in attns:
            a.query = Adapted(a.query, rank=lora_rank, generator=generator)
            a.key = Adapted(a.key, rank=lora_rank, generator=generator)
    if "qk-bias" in parts:
        for a in attns:
            a.key = Adapted(a.key, bias=True)
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
    if "freq-low" in parts:
        angles.log_freq_scale.register_hook(lambda grad: grad * keep)  # Adam moves nothing whose gradient is 0
    count += sum(p.numel() for ps in groups.values() for p in ps)
    return model, groups, count


def frequencies_of(model: Decoder) -> list[Tensor]:
    """The frequencies ``(r/2,)`` each layer's self-attention turns its pairs at (float64, detached)."""
    return [(getattr(b.attn, "layer_rotary", None) or model.rotary).frequencies().detach().double()
            for b in model.blocks]


def export_rope_parameters(model: Decoder, original: int) -> dict:
    """The stock ``rope_parameters`` (``longrope``, equal short and long factors, as
    :func:`rotary.integrations.hf.stock.stock_rope_parameters` writes them) from which transformers computes the
    frequencies of ``model``'s rotary. ``original``: the pretraining length. ValueError for a variant no stock
    config holds: frequencies per layer, or a learned P (which only a fold into W_q and W_k writes)."""
    from rotary.integrations.hf.stock import stock_rope_parameters

    if any(hasattr(b.attn, "layer_rotary") for b in model.blocks):
        raise ValueError("frequencies per layer: a stock config holds one set of factors for every layer")
    if model.rotary.mixer is not None:
        raise ValueError("a learned P is not a frequency factor: fold it into W_q and W_k (rotary.fold) first")
    return stock_rope_parameters(model.rotary, {}, original)


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
