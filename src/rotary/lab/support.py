"""``rotary support``: which causal-LM architectures of the installed transformers ``rotary.hf.install`` supports.

Every entry of transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is built from its default config shrunk to a
tiny size (:func:`tiny_config`), then checked end to end (:func:`check_architecture`) in four ways:

- ``default``: ``rotary.hf.install(model)``;
- ``learned_freq``: ``rotary.hf.install(model, learned_freq=True)``;
- ``lora``: PEFT's ``get_peft_model`` with a LoRA on the attention's q/k/v projections, then
  ``rotary.hf.install(peft_model)``, ``merge_and_unload()``, ``rotary.fold`` and a stock reload;
- ``fold``: the default install's fold to a stock checkpoint (its ``fold`` and ``reload`` checks).

The vision-language models and Whisper (:data:`MULTIMODAL`: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3 multimodal,
``WhisperForConditionalGeneration``) are built from tiny configs of their own (:func:`build_multimodal`) and checked
the same three ways (:func:`check_multimodal`) on each of their inputs: text and an image, or Whisper's audio.
Whisper has no RoPE of its own: rotary adds it (``placement="attention"``), so its identity reference is that
install with ``mixing=None``, its fold keeps the RoPE installed and its reload is ``rotary.hf.from_pretrained``.

Each check records the number it measured (:class:`Check`), so that a verdict says how far off a failure is. An
install that rotary refuses (a ``TypeError``/``ValueError``/``RuntimeError`` raised by rotary's own code) is a
verdict of its own, provided the model still computes what it computed before. Each architecture runs under
``try``/``except`` and a time limit (SIGALRM, in the main thread), so that one failure never stops the sweep.
Weights are drawn from a forked, seeded global RNG (the caller's RNG state is left as it was), tokens and random
P from ``torch.Generator``s. Nothing here prints: the CLI does (``rotary support``), and :func:`render` turns a
:class:`Report` into the markdown of ``docs/support.md``.

Thresholds (float32 logits, max abs difference): identity install and uninstall ``<= 1e-5``; P acting ``> 1e-4``;
cached decoding, fold and reload ``<= 1e-4``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import inspect
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

Inputs = torch.Tensor | dict[str, torch.Tensor]  # token ids, or a forward's keyword arguments (images, audio)
IDENTITY_TOL = 1e-5  # an identity install (P = I) and an uninstall must give the stock logits
ACTS_TOL = 1e-4  # a random P must change the logits by more than this
EXACT_TOL = 1e-4  # cached decoding, fold and stock reload must keep the logits within this
P_STD = 0.3  # the random learned parameters: normal, this std
BATCH, LENGTH, DECODE_STEPS = 2, 12, 3
TIME_LIMIT = 60.0  # seconds per architecture
MODES = ("default", "learned_freq", "lora")
_ROTARY_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # src/rotary: where refusals come from

# the tiny sizes, by transformers' attribute name; applied to every (sub-)config that has the key
SIZES = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128,
    "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "num_attention_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "head_dim": 16, "vocab_size": 256,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "moe_topk": 2,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "ssm_state_size": 16, "state_size": 16,
    "mamba_n_groups": 1, "index_n_heads": 2, "index_num_heads": 2, "index_head_dim": 16,
    "encoder_layers": 2, "decoder_layers": 2, "depth": 2,
    "rotary_dim": 8, "d_head": 16, "mamba_d_ssm": 128, "mamba_headdim": 16, "n_mamba_heads": 8, "adapter_rank": 8,
    "num_kv_shared_layers": 0,
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 256, "laurel_rank": 8,
    "adapter_in_dim": 64, "adapter_input_size": 64, "adapter_out_dim": 64,
    "encoder_hash_byte_group_vocab": 256,  # BLT's hash embeddings
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
}
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "n_shared_experts")
# None in some default configs (the checkpoint sets it): filled in; expert counts only where the model has experts
FILL = {"head_dim": 16, "num_key_value_heads": 2, "num_experts_per_tok": 2, "n_shared_experts": 1,
        **dict.fromkeys(_EXPERT_COUNTS, 4)}
_LAYER_COUNT = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "unk_token_id",
              "decoder_start_token_id")
# leaf names of query/key/value projections, for LoRA's target_modules
QKV_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "W_pack", "Wqkv", "c_attn", "qkv",
             "query", "key", "value", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "wq", "wk", "wv",
             "q", "k", "v")


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Check:
    """One check: ``ok`` True (passed), False (failed) or None (does not apply: ``detail`` says why); ``value`` the
    number it measured (a max abs logit difference, a gradient's L1 norm), None where it raised: then ``detail`` is
    ``crash: <type>: <message>``, or ``refused: ...`` for an error rotary raises on purpose (a fold it refuses)."""

    name: str
    ok: bool | None
    value: float | None = None
    detail: str = ""

    @property
    def crashed(self) -> bool:
        return self.ok is False and self.detail.startswith("crash")

    @property
    def refused(self) -> bool:
        return self.ok is False and self.detail.startswith("refused")

    def text(self) -> str:
        number = "" if self.value is None else f" {self.value:.1e}"
        return f"{self.name}{number}" + (f" ({self.detail})" if self.detail else "")


def _mode(key: str) -> str:
    """The way of installing (one of :data:`MODES`) of a verdict's key: ``"default"``, or ``"default/image"`` for
    a row of several inputs (:data:`MULTIMODAL`)."""
    return key.split("/")[0]


@dataclass
class Verdict:
    """What one way of installing gave. ``status``: ``works`` (every check passed), ``fails`` (see ``failed``),
    ``refused`` (rotary refused the install: ``reason``; the check ``refusal keeps model`` follows), ``skipped``
    (``reason``), ``timeout``."""

    mode: str
    status: str = "works"
    reason: str = ""
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def text(self) -> str:
        """One table cell: ``works``, the refusal, or the failed checks with their numbers."""
        if self.status == "works":
            return "works"
        groups: dict = {}  # checks that crashed the same way: named once, with the exception
        for c in self.failed:
            groups.setdefault(c.detail if c.value is None and c.detail else id(c), []).append(c)
        parts = ([self.reason] if self.reason else []) + [
            g[0].text() if len(g) == 1 else f"{', '.join(c.name for c in g)} ({g[0].detail})" for g in groups.values()]
        if self.status == "fails":  # the failed checks say it
            return "; ".join(parts) or "fails"
        return f"{self.status}: " + "; ".join(parts) if parts else self.status


@dataclass
class Row:
    """One architecture. ``state``: ``rope`` (built, uses RoPE: ``verdicts`` by mode), ``no_rope`` (built, no
    rotary position embedding: ``reason``; ``verdicts["default"]`` says what install did), ``no_build``
    (``reason``), ``timeout``, or ``crash`` (an exception outside the guarded checks).

    ``kind``: ``causal`` (the causal-LM sweep) or ``multimodal`` (a vision-language model or Whisper, see
    :data:`MULTIMODAL`: checked on each of its ``inputs``, its verdicts keyed ``<mode>/<input>``, e.g.
    ``default/image``; Whisper, which has no RoPE of its own, is a ``rope`` row: rotary adds the RoPE)."""

    model_type: str
    model_class: str
    kind: str = "causal"
    state: str = "rope"
    reason: str = ""
    attention: str = ""  # the first text attention module's class
    projections: list[str] = field(default_factory=list)  # its q/k/v projection leaf names (LoRA's targets)
    attn_implementation: str = ""
    rope: str = ""  # why it counts as a RoPE model (a config field or a module), "" if nothing says so
    layers: int = 0
    seconds: float = 0.0
    inputs: list[str] = field(default_factory=list)  # a multimodal row's inputs: text, image; audio
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # by mode (see MODES), or by mode/input
    baseline: list[Check] = field(default_factory=list)  # the stock model's cached decoding and reload

    @property
    def label(self) -> str:
        """The model type, marked ``(multimodal)`` for a multimodal row (gemma3 and whisper are causal rows too)."""
        return self.model_type if self.kind == "causal" else f"{self.model_type} (multimodal)"

    def status(self, mode: str) -> str | None:
        """The status of ``mode`` (see :data:`MODES`) over all its verdicts (one per input of a multimodal row):
        theirs where they agree, else ``mixed``; None where ``mode`` did not run."""
        found = {v.status for key, v in self.verdicts.items() if _mode(key) == mode}
        return None if not found else found.pop() if len(found) == 1 else "mixed"

    @property
    def fold(self) -> Verdict | None:
        """The default install's fold to a stock checkpoint: its ``fold`` and ``reload`` checks."""
        return self.fold_of("default")

    def fold_of(self, key: str) -> Verdict | None:
        """The fold of verdict ``key`` (``default``, ``default/image``, ...): its ``fold`` and ``reload`` checks."""
        v = self.verdicts.get(key)
        if v is None or v.status in ("skipped", "timeout"):
            return v
        if v.status == "refused":
            return Verdict("fold", "refused", "at install")
        checks = [c for c in v.checks if c.name in ("fold", "reload")]
        if not checks:
            return Verdict("fold", "fails", "not reached")
        return Verdict("fold", "works" if all(c.ok is not False for c in checks) else "fails", "", checks)


FAILURES = ("p_inert", "freq_inert", "wrong_checkpoint", "refusal_changed_model", "crash", "other_failures",
            "timeout")


def _failures(rows: list[Row]) -> dict[str, list[str]]:
    """The model types of ``rows`` with each kind of failure (see :meth:`Report.summary`), by :data:`FAILURES`."""
    rope = [r for r in rows if r.state == "rope"]

    def having(predicate):
        return [r.model_type for r in rope if any(predicate(c) for v in r.verdicts.values() for c in v.checks)]

    def measured(names):
        return lambda c: c.name in names and c.ok is False and c.value is not None

    return {
        "p_inert": having(measured(("P acts",))),
        "freq_inert": having(measured(("freq acts",))),
        "wrong_checkpoint": having(measured(("fold", "reload", "merge"))),
        "refusal_changed_model": having(lambda c: c.name == "refusal keeps model" and c.ok is False),
        "crash": [r.model_type for r in rows if r.state == "crash"] + having(lambda c: c.crashed),
        "other_failures": having(lambda c: c.ok is False and c.value is not None and c.name not in (
            "P acts", "freq acts", "fold", "reload", "merge", "refusal keeps model")),
        "timeout": [r.model_type for r in rows if r.state == "timeout"] + [
            r.model_type for r in rope if any(v.status == "timeout" for v in r.verdicts.values())],
    }


@dataclass
class Report:
    rows: list[Row]  # the causal LMs
    environment: dict
    seconds: float = 0.0
    multimodal: list[Row] = field(default_factory=list)  # the vision-language models and Whisper (MULTIMODAL)

    def summary(self) -> dict:
        """Counts and lists of model types: what builds, what works end to end per mode, and each kind of failure
        (``p_inert`` and ``freq_inert``: a random P or learned frequencies leave the logits unchanged;
        ``wrong_checkpoint``: fold, merge or stock reload measured different logits or keys). The failure lists
        (:data:`FAILURES`) cover the multimodal rows too, marked ``(multimodal)``; ``multimodal`` holds those
        rows' own counts: ``works`` and ``refused`` by mode (every input's verdict works, or is refused)."""
        rope = [r for r in self.rows if r.state == "rope"]

        def status(rows, mode, value):
            return [r.model_type for r in rows if r.status(mode) == value]

        causal, multimodal = _failures(self.rows), _failures(self.multimodal)
        built = [r for r in self.multimodal if r.state == "rope"]
        return {
            "architectures": len(self.rows),
            "built": len([r for r in self.rows if r.state in ("rope", "no_rope")]),
            "rope": len(rope),
            "no_rope": len([r for r in self.rows if r.state == "no_rope"]),
            "no_build": [r.model_type for r in self.rows if r.state == "no_build"],
            "no_build_rope": [r.model_type for r in self.rows if r.state == "no_build" and r.rope],
            "works": {mode: status(rope, mode, "works") for mode in MODES},
            "fold_works": [r.model_type for r in rope if r.fold is not None and r.fold.status == "works"],
            "refused": {mode: status(rope, mode, "refused") for mode in MODES},
            "fold_refused": {mode: [r.model_type for r in rope if r.verdicts.get(mode) and any(
                c.name == "fold" and c.refused for c in r.verdicts[mode].checks)] for mode in MODES},
            **{key: causal[key] + [f"{t} (multimodal)" for t in multimodal[key]] for key in FAILURES},
            "multimodal": {
                "swept": len(self.multimodal),
                "built": len(built),
                "no_build": [r.model_type for r in self.multimodal if r.state == "no_build"],
                "works": {mode: status(built, mode, "works") for mode in MODES},
                "refused": {mode: status(built, mode, "refused") for mode in MODES},
                **multimodal,
            },
        }


class TimeLimit(BaseException):
    """Raised inside an architecture's checks when its time is up (a BaseException, so that the per-check guards,
    which catch Exception, let it through)."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """SIGALRM after ``seconds`` raises :class:`TimeLimit` (main thread of a POSIX process only; elsewhere, or for
    None, no limit). Python code is interrupted at its next bytecode; a long C call finishes first."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise TimeLimit

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:  # even if the alarm went off just before it was disarmed
            signal.signal(signal.SIGALRM, previous)


def _message(e: BaseException, limit: int = 150) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _raised_by_rotary(e: BaseException) -> bool:
    """A refusal: a TypeError/ValueError/RuntimeError whose innermost frame is rotary's own code."""
    if not isinstance(e, (TypeError, ValueError, RuntimeError)):
        return False
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_ROTARY_DIR)


# ------------------------------------------------------------------------------------------------ configs
def _is_attention(kind) -> bool:
    """A layer kind that is softmax attention (``full_attention``, ``sliding_attention``, ``attention``, ...), not a
    linear-attention, state-space or MLP kind."""
    kind = str(kind).lower()
    return ("attention" in kind or kind in ("attn", "full", "global", "local", "sliding")) and not any(
        s in kind for s in ("linear", "mamba", "recurrent", "ssm", "conv"))


def _layer_indices(d: dict, n: int) -> list[int]:
    """Which of the ``n`` layers to keep: the first of each attention type (``layer_types`` and the like), then the
    first of each other per-layer kind, at most 3 in all, at least 2; and the first attention layer that a list of
    attention layer indices names."""
    kinds = {k: v for k, v in d.items() if isinstance(v, list) and len(v) == n and v and
             all(isinstance(x, str) for x in v)}
    primary = [k for k in kinds if "attn" in k or "attention" in k or k in ("layer_types", "layers_block_type")]
    keep: list[int] = []
    for key, value in d.items():
        if ("attn" in key or "attention" in key) and ("idx" in key or "indices" in key) and isinstance(value, list) \
                and value and all(isinstance(x, int) and 0 <= x < n for x in value):
            keep.append(value[0])
    for keys in (primary, list(kinds)):
        seen = set()
        for i in range(n):
            kind = tuple(kinds[k][i] for k in keys)
            if keys and kind not in seen:
                seen.add(kind)
                if i not in keep and len(keep) < 3:
                    keep.append(i)
    for i in range(n):
        if len(keep) >= min(2, n):
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _remap_layers(d: dict, count_key: str) -> None:
    """Keep 2 (or 3) of ``d[count_key]`` layers, in place, and every per-layer list and layer index consistent."""
    n = d[count_key]
    keep = _layer_indices(d, n)
    position = {i: p for p, i in enumerate(keep)}
    for key, value in list(d.items()):
        if key == count_key:
            continue
        if "layer" in key and isinstance(value, dict) and value and all(str(k).isdigit() and int(k) < n
                                                                         for k in value):
            # per-layer overrides keyed by layer index (Gemma 4's per_layer_config): kept layers, renumbered
            d[key] = {type(k)(position[int(k)]): (_shrink(v, {}) if isinstance(v, dict) else v)
                      for k, v in value.items() if int(k) in position}
            continue
        if not isinstance(value, list):
            continue
        ints = bool(value) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
        layer_key = "layer" in key or "idx" in key or "indices" in key
        if ints and "source" in key and len(value) == n:  # a layer -> layer map (shared KV): renumbered
            d[key] = [position.get(value[i], p) for p, i in enumerate(keep)]
        elif ints and layer_key and len(set(value)) == len(value) and max(value) < n and (
                len(value) != n or value == sorted(value)):
            d[key] = [position[i] for i in value if i in position]  # a set of layer indices
        elif len(value) == n:  # per-layer values
            d[key] = [value[i] for i in keep]
            if ints and "heads" in key:
                d[key] = [SIZES["num_attention_heads"]] * len(keep)
    d[count_key] = len(keep)
    kinds = [k for k in ("layer_types", "layers_block_type") if isinstance(d.get(k), list) and
             len(d[k]) == len(keep)]
    for key in kinds:  # an attention-free default (GraniteMoeHybrid: all linear attention): one attention layer
        if len(set(d[key])) == 1 and not _is_attention(d[key][0]) and "linear" in str(d[key][0]):
            d[key] = d[key][:-1] + ["full_attention"]


def _shrink(d: dict, attribute_map: dict) -> dict:
    """A config dict at the tiny sizes (see :data:`SIZES`), with its per-layer lists kept consistent."""
    original, d = d, dict(d)
    names = {attribute_map.get(k, k): k for k in SIZES}  # the dict's own key -> the size's name
    heads = d.get(attribute_map.get("num_attention_heads", "num_attention_heads"))
    for key, size_name in names.items():
        if key in d and isinstance(d[key], int) and not isinstance(d[key], bool) and d[key] > 0:
            d[key] = SIZES[size_name]
    for key, size in FILL.items():  # defaults that transformers leaves to the checkpoint (None)
        key = attribute_map.get(key, key)
        if key in d and d[key] is None and (key not in _EXPERT_COUNTS or d.get("moe_intermediate_size")):
            d[key] = size
    hidden = original.get(attribute_map.get("hidden_size", "hidden_size"))
    if isinstance(d.get("attention_hidden_size"), int) and isinstance(hidden, int):  # a multiple of hidden_size
        d["attention_hidden_size"] = SIZES["hidden_size"] * max(1, round(d["attention_hidden_size"] / hidden))
        for key in ("attention_head_dim", "kv_channels"):  # Zamba 2: attention_hidden_size / heads
            if isinstance(d.get(key), int):
                d[key] = d["attention_hidden_size"] // SIZES["num_attention_heads"] // (2 if key == "kv_channels"
                                                                                       else 1)
    if isinstance(original.get("num_experts_per_tok"), int):  # some models route to exactly one expert
        d["num_experts_per_tok"] = min(original["num_experts_per_tok"], SIZES["num_experts_per_tok"])
    if isinstance(original.get("qk_rope_head_dim"), int) and original.get("head_dim") == original["qk_rope_head_dim"]:
        d["head_dim"] = d["qk_rope_head_dim"]  # MLA: rotary_emb's dim is the RoPE slice
    kv_key = attribute_map.get("num_key_value_heads", "num_key_value_heads")
    if isinstance(d.get(kv_key), int) and isinstance(heads, int):
        d[kv_key] = 2 if d[kv_key] < heads else SIZES["num_attention_heads"]  # grouped stays grouped, MHA stays MHA
    if isinstance(d.get("max_position_embeddings"), int) and d["max_position_embeddings"] < 256:
        d["max_position_embeddings"] = 256
    for key in ("initializer_range", "init_std"):  # logits of order one, so that P visibly acts
        if isinstance(d.get(key), float):
            d[key] = 0.1
    vocab = d.get(attribute_map.get("vocab_size", "vocab_size"))
    if isinstance(vocab, int):
        for key in _TOKEN_IDS:
            value = d.get(key)
            if isinstance(value, int) and value >= vocab:
                d[key] = value % vocab
            elif isinstance(value, list):
                d[key] = [v % vocab if isinstance(v, int) else v for v in value]
    count_key = next((attribute_map.get(k, k) for k in _LAYER_COUNT if isinstance(d.get(attribute_map.get(k, k)),
                                                                                   int)), None)
    if count_key is not None and isinstance(d.get("num_layers_per_stack"), int):
        d["num_layers_per_stack"], d[count_key] = None, 1  # HRM: the config inflates it to stacks x cycles
    elif count_key is not None and d[count_key] > 2:
        _remap_layers(d, count_key)
        pattern = d.get("block_types")  # a repeating pattern (RecurrentGemma): reach its first attention
        if isinstance(pattern, list) and not any(_is_attention(x) for x in pattern[: d[count_key]]):
            first = next((i for i, x in enumerate(pattern) if _is_attention(x)), None)
            if first is not None and first < 3:
                d[count_key] = first + 1
        if d.get("attn_layer_indices", 0) is None:  # Bamba's default is attention-free
            d["attn_layer_indices"] = [d[count_key] - 1]
    for key, value in d.items():  # sub-configs (text_config, vision_config, ...)
        if isinstance(value, dict) and "model_type" in value:
            d[key] = _shrink(value, _attribute_map(value.get("model_type")))
    return d


def _attribute_map(model_type: str | None) -> dict:
    import transformers

    try:
        return dict(getattr(transformers.CONFIG_MAPPING[model_type], "attribute_map", {}) or {})
    except Exception:
        return {}


def tiny_config(model_type: str):
    """transformers' default config of ``model_type`` at tiny sizes: 2 layers (3 where it has three layer types,
    one of each kept), hidden 64, 4 heads of 16 (2 key/value heads where grouped), MLP 128, vocab 256, 4 experts
    (2 per token), small MLA ranks, initializer_range 0.1."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    d = _shrink(config.to_dict(), dict(getattr(config, "attribute_map", {}) or {}))
    d.pop("transformers_version", None)
    return type(config).from_dict(d)


# ------------------------------------------------------------------------------------------------ models
def _text_attention(model: nn.Module) -> nn.Module | None:
    """The first attention module of the text decoder (skipping vision and audio towers): the first that holds q/k/v
    projections itself (BERT-style ``attention.self``), else the first one."""
    skip = ("vision", "visual", "audio", "image", "speech", "mm_", "multi_modal")
    found = [module for name, module in model.named_modules() if not any(s in name.lower() for s in skip)
             and type(module).__name__.endswith(("Attention", "Attention2")) and any(True for _ in module.children())]
    return next((m for m in found if _projections(m)), found[0] if found else None)


def _projections(attention: nn.Module | None) -> list[str]:
    if attention is None:
        return []
    return [name for name, child in attention.named_children() if name in QKV_NAMES and isinstance(child, nn.Linear)]


def _config_rope(config) -> str:
    """Why ``config`` describes a RoPE model ("" if nothing does): its (or a sub-config's) rope fields."""
    configs = [config] + [getattr(config, k, None) for k in getattr(config, "sub_configs", {}) or {}]
    for cfg in configs:
        for key in ("rope_parameters", "rotary_dim", "rotary_pct", "rope_theta", "rotary_emb_base"):
            if cfg is not None and getattr(cfg, key, None) not in (None, {}, 0):
                return f"config.{key}"
        if cfg is not None and hasattr(cfg, "rotary_value"):  # RoFormer: rotary on q/k always, on v optionally
            return "config.rotary_value"
    return ""


def _rope_evidence(model: nn.Module) -> str:
    """Why ``model`` counts as a RoPE model ("" if it does not): its config's rope fields or a rotary module."""
    found = _config_rope(model.config)
    if found:
        return found
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") or "Rotary" in type(module).__name__:
            return f"module {name}"
    return ""


def _no_rope_reason(model: nn.Module) -> str:
    cfg = model.config
    names = [n for n, _ in model.named_modules()]
    if getattr(cfg, "alibi", False) or "alibi" in str(getattr(cfg, "attn_config", "")) or getattr(
            cfg, "model_type", "") == "bloom":
        kind = "ALiBi"
    elif any(n.endswith(("wpe", "embed_positions", "position_embeddings", "pos_emb")) for n in names):
        kind = "learned or sinusoidal absolute positions"
    elif _text_attention(model) is None:
        kind = "no attention found"
    else:
        kind = "no positional rotation found"
    source = sys.modules.get(type(model).__module__)
    try:
        text = inspect.getsource(source) if source is not None else ""
    except (OSError, TypeError):
        text = ""
    mentions = [w for w in ("rotate_half", "apply_rotary_pos_emb", "RotaryEmbedding") if w in text]
    return f"{kind} (no rope_parameters, rotary_dim or rotary_emb" + (
        f"; its modeling file defines {', '.join(mentions)}, which the built model does not use)" if mentions else ")")


def _ids(vocab: int, special: Iterable, seed: int, shape: tuple[int, int] = (BATCH, LENGTH)) -> torch.Tensor:
    """Random token ids, (BATCH, LENGTH) unless ``shape`` says otherwise, none of them a special token."""
    allowed = torch.tensor([i for i in range(vocab) if i not in set(special)])
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), shape, generator=g)]


def _special_ids(config) -> set[int]:
    found = set()
    for cfg in [config] + [getattr(config, k, None) for k in getattr(config, "sub_configs", {}) or {}]:
        if cfg is None:
            continue
        for key, value in cfg.to_dict().items():
            if key.endswith(("token_id", "token_index", "token_ids")):
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, int):
                        found.add(v)
    return found


def _vocab(model: nn.Module) -> int:
    emb = model.get_input_embeddings()
    return int(getattr(emb, "num_embeddings", None) or emb.weight.shape[0])


def _logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The float32 logits of token ids (with an attention mask of ones) or of a dict of keyword arguments."""
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs).logits.float()
        return model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits.float()


def _loss(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The language-modelling loss on the inputs' own tokens (the decoder's, for an encoder-decoder)."""
    if isinstance(inputs, dict):
        return model(**inputs, labels=inputs.get("decoder_input_ids", inputs.get("input_ids"))).loss
    return model(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=inputs).loss


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"logits of shape {tuple(a.shape)} against {tuple(b.shape)}")
    return float((a - b).abs().max())


def _cached(model: nn.Module, ids: Inputs) -> torch.Tensor:
    """Logits of a prefill of all but the last DECODE_STEPS tokens, then one token at a time with the KV cache
    (the decoder's tokens, for an encoder-decoder's inputs: see :func:`_cached_decoder`)."""
    if isinstance(ids, dict):
        return _cached_decoder(model, ids)
    start = ids.shape[1] - DECODE_STEPS
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = model(input_ids=ids[:, :start], attention_mask=mask[:, :start], use_cache=True)
        parts, past = [out.logits.float()], out.past_key_values
        for t in range(start, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=past,
                        use_cache=True)
            parts.append(out.logits.float())
            past = out.past_key_values
    return torch.cat(parts, dim=1)


def _cached_decoder(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`_cached` for an encoder-decoder (Whisper): the encoder once, the decoder's prompt, then one decoder
    token at a time with the cache and the encoder's output."""
    ids = inputs["decoder_input_ids"]
    encoder = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    start = ids.shape[1] - DECODE_STEPS
    with torch.no_grad():
        out = model(**encoder, decoder_input_ids=ids[:, :start], use_cache=True)
        parts, cache, encoded = [out.logits.float()], out.cache, (out.encoder_last_hidden_state,)
        for t in range(start, ids.shape[1]):
            out = model(encoder_outputs=encoded, decoder_input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            parts.append(out.logits.float())
            cache = out.cache
    return torch.cat(parts, dim=1)


def _reload(model: nn.Module, ids: Inputs, attn: str, auto: str = "AutoModelForCausalLM"
            ) -> tuple[torch.Tensor, list[str]]:
    """Stock transformers' reload of ``model.save_pretrained`` (``transformers.<auto>.from_pretrained``): its
    logits, and the keys it reports missing or unexpected."""
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded, info = getattr(transformers, auto).from_pretrained(
            folder, output_loading_info=True, attn_implementation=attn, dtype=torch.float32)
    loaded.eval()
    keys = [f"missing {k}" for k in info.get("missing_keys", ())] + [
        f"unexpected {k}" for k in info.get("unexpected_keys", ())] + [
        f"mismatched {k}" for k in info.get("mismatched_keys", ())]
    return _logits(loaded, ids), keys


def build(model_type: str, *, seed: int = 0) -> tuple[nn.Module, str]:
    """The tiny model of ``model_type`` in eval mode, float32: sdpa attention (transformers' default), or eager
    where that fails to build or to run. Returns the model and its attention implementation."""
    import transformers

    errors = []
    for attn in (None, "eager"):
        try:
            config = tiny_config(model_type)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                kwargs = {} if attn is None else {"attn_implementation": attn}
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs).eval()
            ids = _ids(_vocab(model), _special_ids(model.config), seed)
            _logits(model, ids)
            return model, model.config._attn_implementation or "eager"
        except Exception as e:
            errors.append(e)
    raise errors[-1]


# ------------------------------------------------------------------------------------------------ checks
def _rotaries(model: nn.Module) -> list:
    import rotary.hf

    record = rotary.hf.installed(model)
    return [] if record is None else [placed.current() for placed in record.rotaries]


def _set_random(parameters: Iterable[nn.Parameter], g: torch.Generator) -> None:
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * P_STD)


def _mixer_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for r in _rotaries(model) if r.mixer is not None for p in r.mixer.parameters()]


def _angle_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for r in _rotaries(model) for p in r.angles.parameters()]


def _guard(checks: list[Check], name: str, run: Callable[[], Check], *, refusals: bool = False) -> Check:
    """Run one check and append it; an exception fails it as ``crash: <type>: <message>`` (or, with ``refusals``,
    an error rotary raises on purpose as ``refused: ...``)."""
    try:
        check = run()
    except Exception as e:
        kind = "refused" if refusals and _raised_by_rotary(e) else "crash"
        check = Check(name, False, None, f"{kind}: {_message(e)}")
    checks.append(check)
    return check


def _forward(model: nn.Module, ids: torch.Tensor, checks: list[Check], name: str) -> torch.Tensor | None:
    """Logits that later checks compare against, or None (the failure recorded as check ``name``)."""
    try:
        return _logits(model, ids)
    except Exception as e:
        checks.append(Check(name, False, None, "crash: " + _message(e)))
        return None


def _install(model: nn.Module, reference: torch.Tensor, ids: torch.Tensor, verdict: Verdict, **options) -> bool:
    """Install into ``model``; True if installed. A refusal sets ``verdict`` to ``refused`` (with the check that
    the model still gives ``reference`` and has its stock keys), any other exception to a failed check."""
    import rotary.hf

    keys = set(model.state_dict())
    try:
        rotary.hf.install(model, **options)
        return True
    except Exception as e:
        if not _raised_by_rotary(e):
            verdict.checks.append(Check("install", False, None, "crash: " + _message(e)))
            return False
        verdict.status, verdict.reason = "refused", _message(e)

    def unchanged():
        d = _diff(_logits(model, ids), reference)
        same = set(model.state_dict()) == keys and rotary.hf.installed(model) is None
        return Check("refusal keeps model", d <= IDENTITY_TOL and same, d,
                     "" if same else "module tree or state_dict changed")

    _guard(verdict.checks, "refusal keeps model", unchanged)
    return False


def _why_inert(stock: nn.Module, ids: Inputs, g: torch.Generator, options: dict,
               reference: torch.Tensor | None = None) -> str:
    """Tells a P that commutes with the model's RoPE (its Givens planes are the host's rotated pairs: a dense P
    acts) from a P that never reaches the attention scores (a dense P is inert too). ``reference``: what the
    install computes at P = I (default: the stock logits)."""
    import rotary.hf

    try:
        model = rotary.hf.install(copy.deepcopy(stock), mixing="orthogonal", **options)
        _set_random(_mixer_parameters(model), g)
        d = _diff(_logits(model, ids), _logits(stock, ids) if reference is None else reference)
    except Exception as e:
        return f"a dense P could not be tried ({_message(e, 80)})"
    if d > ACTS_TOL:
        return f"a dense P (mixing='orthogonal') acts, {d:.1e}: the Givens planes commute with the model's RoPE"
    return f"a dense P (mixing='orthogonal') is inert too, {d:.1e}: P does not reach the attention scores"


def _acts(model: nn.Module, reference: torch.Tensor, ids: Inputs, g: torch.Generator, stock: nn.Module,
          options: dict, stock_reference: torch.Tensor | None = None) -> Check:
    """Random mixer angles must move the logits away from ``reference`` (P = I). ``stock_reference``: what an
    install into ``stock`` computes at P = I, where that is not the stock logits (see :func:`_why_inert`)."""
    mixers = _mixer_parameters(model)
    if not mixers:
        return Check("P acts", False, None, "no mixer parameters in the install record")
    _set_random(mixers, g)
    d = _diff(_logits(model, ids), reference)
    if d > ACTS_TOL:
        return Check("P acts", True, d)
    return Check("P acts", False, d, "P inert: " + _why_inert(stock, ids, g, options, stock_reference))


def _fold_and_reload(model: nn.Module, reference: torch.Tensor, ids: Inputs, stock_keys: set, attn: str,
                     baseline_reload: Check, checks: list[Check], auto: str = "AutoModelForCausalLM") -> None:
    """``rotary.fold`` keeps ``reference`` and leaves a stock model; stock transformers (``auto``) reloads what it
    saves."""
    import rotary
    import rotary.hf

    def fold():
        rotary.fold(model)
        d = _diff(_logits(model, ids), reference)
        problems = []
        if rotary.hf.installed(model) is not None:
            problems.append("install record remains")
        extra = sorted(set(model.state_dict()) - stock_keys)
        if extra:
            problems.append(f"extra keys {extra[:3]}")
        left = sorted({"rotary", "rotary_install"} & set(model.config.to_dict()))
        if left:
            problems.append(f"config.{left[0]} remains")
        return Check("fold", d <= EXACT_TOL and not problems, d, "; ".join(problems))

    if _guard(checks, "fold", fold, refusals=True).value is None:
        return

    def reload():
        stock_fails = baseline_reload.ok is False
        try:
            logits, keys = _reload(model, ids, attn, auto)
        except Exception as e:
            if stock_fails:
                return Check("reload", None, None, f"n/a: the stock model does not reload either ({_message(e, 80)})")
            raise
        d = _diff(logits, reference)
        ok = d <= EXACT_TOL and not keys
        if not ok and stock_fails:
            return Check("reload", None, d, "n/a: the stock model does not reload exactly either")
        return Check("reload", ok, d, ", ".join(keys[:3]))

    _guard(checks, "reload", reload)


def _freq_acts(model: nn.Module, ids: Inputs, g: torch.Generator) -> Check:
    """Random learned frequency scales must move the logits."""
    angles = _angle_parameters(model)
    if not angles:
        return Check("freq acts", False, None, "no learned frequency parameters in the install record")
    before = _logits(model, ids)
    _set_random(angles, g)
    d = _diff(_logits(model, ids), before)
    return Check("freq acts", d > ACTS_TOL, d, "" if d > ACTS_TOL else "frequencies inert: logits unchanged")


def _gradient(model: nn.Module, ids: Inputs, learned_freq: bool) -> Check:
    """The loss's gradient reaches P (and the learned frequencies): its L1 norm."""
    params = _mixer_parameters(model) + (_angle_parameters(model) if learned_freq else [])
    model.zero_grad(set_to_none=True)
    _loss(model, ids).backward()
    norm = float(sum(p.grad.abs().sum() for p in params if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return Check("gradient", norm > 0, norm, "" if norm > 0 else "no gradient reaches P")


def _cache_check(model: nn.Module, ids: Inputs, full: torch.Tensor, baseline_cache: Check) -> Check:
    """Cached decoding gives the full forward's logits ``full`` (n/a where the stock model's does not either)."""
    d = _diff(_cached(model, ids), full)
    if d > EXACT_TOL and baseline_cache.ok is False:
        return Check("cache", None, d, "n/a: the stock model's cached decoding differs too")
    return Check("cache", d <= EXACT_TOL, d)


def _uninstall_check(stock: nn.Module, ids: Inputs, stock_logits: torch.Tensor, options: dict,
                     g: torch.Generator) -> Check:
    """Install into a copy of ``stock``, random rotary parameters, uninstall: the stock logits and keys."""
    import rotary.hf

    fresh = rotary.hf.install(copy.deepcopy(stock), **options)
    _set_random([p for r in _rotaries(fresh) for p in r.parameters()], g)
    rotary.hf.uninstall(fresh)
    d = _diff(_logits(fresh, ids), stock_logits)
    same = set(fresh.state_dict()) == set(stock.state_dict()) and "rotary" not in fresh.config.to_dict()
    return Check("uninstall", d <= IDENTITY_TOL and same, d, "" if same else "keys or config differ from stock")


def _run_mode(verdict: Verdict, stock: nn.Module, ids: Inputs, stock_logits: torch.Tensor, attn: str,
              baseline: dict[str, Check], g: torch.Generator, auto: str = "AutoModelForCausalLM") -> None:
    """The end-to-end checks of the default install or of ``learned_freq=True`` on a copy of ``stock``; cached
    decoding where ``baseline`` has the stock model's (``"cache"``); the stock reload through ``auto``."""
    options = {"learned_freq": True} if _mode(verdict.mode) == "learned_freq" else {}
    checks = verdict.checks
    model = copy.deepcopy(stock)
    stock_keys = set(stock.state_dict())
    if not _install(model, stock_logits, ids, verdict, **options):
        return
    _guard(checks, "identity", lambda: Check("identity", (d := _diff(_logits(model, ids), stock_logits))
                                             <= IDENTITY_TOL, d))
    _guard(checks, "P acts", lambda: _acts(model, stock_logits, ids, g, stock, options))
    if options:
        _guard(checks, "freq acts", lambda: _freq_acts(model, ids, g))
    _guard(checks, "gradient", lambda: _gradient(model, ids, learned_freq=bool(options)))
    perturbed = _forward(model, ids, checks, "cache" if "cache" in baseline else "fold")
    if perturbed is not None:
        if "cache" in baseline:
            _guard(checks, "cache", lambda: _cache_check(model, ids, perturbed, baseline["cache"]))
        _fold_and_reload(model, perturbed, ids, stock_keys, attn, baseline["reload"], checks, auto)
    _guard(checks, "uninstall", lambda: _uninstall_check(stock, ids, stock_logits, options, g))


def _lora(stock: nn.Module, targets: list[str] | str, g: torch.Generator) -> nn.Module:
    """A PEFT model of a copy of ``stock``, eval mode, with a nonzero LoRA (r=4) on ``targets`` (leaf names, or
    PEFT's regex of module names)."""
    import peft

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=g)))
        return peft.get_peft_model(copy.deepcopy(stock), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)).eval()


def _merge(model: nn.Module, ids: Inputs, reference: torch.Tensor, merged: dict) -> Check:
    """PEFT's ``merge_and_unload`` (the result in ``merged["model"]``) keeps the logits ``reference``."""
    merged["model"] = model.merge_and_unload()
    d = _diff(_logits(merged["model"], ids), reference)
    return Check("merge", d <= EXACT_TOL, d)


def _run_lora(verdict: Verdict, stock: nn.Module, targets: list[str] | str, ids: Inputs, attn: str,
              baseline: dict[str, Check], g: torch.Generator, auto: str = "AutoModelForCausalLM") -> None:
    """LoRA on the q/k/v projections (``targets``: leaf names, or PEFT's regex of module names), install, P acts,
    merge, fold, stock reload (through ``auto``)."""
    checks = verdict.checks
    if not targets:
        verdict.status, verdict.reason = "skipped", "no q/k/v projection found in the first attention"
        return
    model = _lora(stock, targets, g)
    adapted = _forward(model, ids, checks, "identity")
    if adapted is None or not _install(model, adapted, ids, verdict):
        return
    _guard(checks, "identity", lambda: Check("identity", (d := _diff(_logits(model, ids), adapted)) <= IDENTITY_TOL,
                                             d))
    _guard(checks, "P acts", lambda: _acts(model, adapted, ids, g, stock, {}))
    perturbed = _forward(model, ids, checks, "merge")
    merged: dict = {}
    if perturbed is not None and _guard(checks, "merge", lambda: _merge(model, ids, perturbed, merged)).value \
            is not None:
        _fold_and_reload(merged["model"], perturbed, ids, set(stock.state_dict()), attn, baseline["reload"], checks,
                         auto)


def check_architecture(model_type: str, *, seed: int = 0, time_limit: float | None = TIME_LIMIT,
                       modes: Iterable[str] = MODES) -> Row:
    """Build the tiny ``model_type`` and run every check of every mode; never raises (but KeyboardInterrupt)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    row = Row(model_type, str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")))
    return _checked(row, lambda: _check(row, seed, tuple(modes)), time_limit)


def _checked(row: Row, run: Callable[[], None], time_limit: float | None) -> Row:
    """``run()`` fills ``row``, under the time limit; a timeout or an exception outside the guarded checks is the
    row's (or its running verdict's) state."""
    start = time.perf_counter()
    try:
        with _time_limit(time_limit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run()
    except TimeLimit:
        running = [v for v in row.verdicts.values() if v.status == "running"]
        if row.state == "rope" and running:
            running[0].status, running[0].reason = "timeout", f"past {time_limit:.0f} s"
        else:
            row.state, row.reason = "timeout", f"past {time_limit:.0f} s" + (f"; {row.reason}" if row.reason else "")
    except Exception as e:  # outside every guarded check
        row.state, row.reason = "crash", _message(e)
    row.seconds = round(time.perf_counter() - start, 1)
    return row


def _layer_count(model: nn.Module) -> int:
    """The decoder's layer count (the longest ModuleList named ``layers``/``h``/``blocks``), for the table."""
    lists = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.split(".")[-1] in
             ("layers", "h", "blocks", "layer", "decoder_layers") and not any(
                 s in n for s in ("vision", "visual", "audio"))]
    return max((len(m) for m in lists), default=0)


def _default_builds(model_type: str) -> str:
    """Whether transformers' own default config of ``model_type`` builds (on the meta device: no memory, no init):
    "" if it does, else why not."""
    import transformers

    try:
        with torch.device("meta"):
            transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type))
        return ""
    except Exception as e:
        return _message(e, 100)


def _check(row: Row, seed: int, modes: tuple[str, ...]) -> None:
    try:
        row.rope = _config_rope(tiny_config(row.model_type))
        stock, attn = build(row.model_type, seed=seed)
    except Exception as e:
        row.state, row.reason = "no_build", _message(e)
        default = _default_builds(row.model_type)
        row.reason += f" (transformers' default config fails too: {default})" if default else \
            " (transformers' default config builds: the tiny config or the stock forward fails)"
        return
    row.attn_implementation = attn
    row.layers = _layer_count(stock)
    attention = _text_attention(stock)
    row.attention = "" if attention is None else type(attention).__name__
    row.projections = _projections(attention)
    row.rope = _rope_evidence(stock)
    ids = _ids(_vocab(stock), _special_ids(stock.config), seed)
    stock_logits = _logits(stock, ids)
    g = torch.Generator().manual_seed(seed + 1)
    if not row.rope:
        row.state, row.reason = "no_rope", _no_rope_reason(stock)
        verdict = row.verdicts["default"] = Verdict("default")
        if _install(copy.deepcopy(stock), stock_logits, ids, verdict):
            verdict.status, verdict.reason = "fails", "installed into a model without RoPE"
        return
    baseline = {"cache": _guard(row.baseline, "cache", lambda: _stock_cache(stock, ids, stock_logits)),
                "reload": _guard(row.baseline, "reload", lambda: _stock_reload(stock, ids, stock_logits, attn))}
    for mode in modes:
        if mode == "lora":
            _run_verdict(row, mode, lambda v: _run_lora(v, stock, row.projections, ids, attn, baseline, g))
        else:
            _run_verdict(row, mode, lambda v: _run_mode(v, stock, ids, stock_logits, attn, baseline, g))


def _stock_cache(stock: nn.Module, ids: Inputs, stock_logits: torch.Tensor, name: str = "cache") -> Check:
    """The stock model's own cached decoding against its full forward (the baseline of the ``cache`` checks)."""
    d = _diff(_cached(stock, ids), stock_logits)
    return Check(name, d <= EXACT_TOL, d)


def _stock_reload(stock: nn.Module, ids: Inputs, stock_logits: torch.Tensor, attn: str,
                  auto: str = "AutoModelForCausalLM", name: str = "reload") -> Check:
    """The stock model's own save and stock reload (the baseline of the ``reload`` checks)."""
    logits, keys = _reload(stock, ids, attn, auto)
    d = _diff(logits, stock_logits)
    return Check(name, d <= EXACT_TOL and not keys, d, ", ".join(keys[:3]))


def _run_verdict(row: Row, key: str, run: Callable[[Verdict], None]) -> None:
    """``run`` fills the verdict ``row.verdicts[key]``; an exception outside its guarded checks is a failed check,
    and a verdict that ends ``running`` ``works`` unless a check failed."""
    verdict = row.verdicts[key] = Verdict(key, "running")
    try:
        run(verdict)
    except Exception as e:  # outside the guarded checks
        verdict.checks.append(Check("checks", False, None, "crash: " + _message(e)))
    if verdict.status == "running":
        verdict.status = "fails" if verdict.failed else "works"


# ------------------------------------------------------------------------------------------------ multimodal
# The vision-language models and Whisper, swept beside the causal LMs (gemma3 and whisper are causal rows too:
# Gemma3ForConditionalGeneration on text alone, WhisperForCausalLM), by model_type: their transformers class
MULTIMODAL = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "whisper": "WhisperForConditionalGeneration",
}
VLM_LORA_TARGETS = r"model\.language_model.*\.(q_proj|k_proj|v_proj)"  # PEFT's regex: the language model's q/k/v
WHISPER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj"]  # every attention's, the encoder's and cross-attention's too
WHISPER_OPTIONS = {"placement": "attention"}  # the RoPE on q and k of every decoder self-attention
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START = 250, 251, 252  # Gemma 3: image, end of image, start of image
MEL, FRAMES = 8, 32  # Whisper's log-mel bins and input frames


def _vlm_config(model_type: str):
    """A tiny vision-language config: the sweep's text sizes (2 layers, hidden 64, 4 heads of 16, 2 key/value
    heads, vocab 256, initializer_range 0.1; M-RoPE sections 2, 3, 3 for Qwen, interleaved for Qwen3-VL; Gemma 3
    one sliding and one full layer) and a one-layer vision tower of width 32 on 14-pixel patches."""
    import transformers

    text = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=256, initializer_range=0.1)
    if model_type == "gemma3":
        text.update(layer_types=["sliding_attention", "full_attention"], sliding_window=8)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                         image_token_index=IMAGE_TOKEN, boi_token_index=VISION_START,
                                         eoi_token_index=VIDEO_TOKEN, initializer_range=0.1)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                               **({"mrope_interleaved": True} if model_type == "qwen3_vl" else {})}
    vision = dict(depth=1, embed_dim=32, hidden_size=64 if model_type == "qwen2_vl" else 32, num_heads=2, mlp_ratio=2,
                  intermediate_size=64, out_hidden_size=64, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  fullatt_block_indexes=[0], deepstack_visual_indexes=[], num_position_embeddings=64)
    return transformers.AutoConfig.for_model(model_type, text_config=text, vision_config=vision,
                                             image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                                             vision_start_token_id=VISION_START)


def _image_inputs(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """One random image in random tokens, batch 1: Qwen's 4 x 4 patches (merged 2 x 2: 4 image tokens) in 20
    tokens, Gemma 3's 28 x 28 pixels (4 image tokens) in 12."""
    g = torch.Generator().manual_seed(seed + 2)
    gemma = model.config.model_type == "gemma3"
    ids = _ids(_vocab(model), _special_ids(model.config), seed + 2, (1, 12 if gemma else 20))
    ids[0, 2], ids[0, 3:7] = VISION_START, IMAGE_TOKEN
    if gemma:
        ids[0, 7] = VIDEO_TOKEN  # the end-of-image token
        return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 28, 28, generator=g),
                "token_type_ids": (ids == IMAGE_TOKEN).long()}
    return {"input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 14 * 14, generator=g),
            "image_grid_thw": torch.tensor([[1, 4, 4]]), "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}


def build_multimodal(model_type: str, *, seed: int = 0) -> tuple[nn.Module, dict[str, Inputs], str]:
    """The tiny ``model_type`` of :data:`MULTIMODAL` in eval mode, float32, transformers' default attention, and
    its inputs by name: ``text`` (BATCH x LENGTH random tokens) and ``image`` for a vision-language model,
    ``audio`` (random log-mel features, BATCH x LENGTH random decoder tokens) for Whisper."""
    import transformers

    if model_type not in MULTIMODAL:
        raise ValueError(f"{model_type!r} is not one of the multimodal models {list(MULTIMODAL)}")
    whisper = model_type == "whisper"
    if whisper:
        config = transformers.WhisperConfig(
            vocab_size=256, num_mel_bins=MEL, encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=FRAMES // 2,
            max_target_positions=2 * LENGTH, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
            suppress_tokens=None, begin_suppress_tokens=None, init_std=0.1)
    else:
        config = _vlm_config(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if whisper:
            model = transformers.WhisperForConditionalGeneration(config).float().eval()
        else:
            model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    ids = _ids(_vocab(model), _special_ids(model.config), seed)
    if whisper:
        features = torch.randn(BATCH, MEL, FRAMES, generator=torch.Generator().manual_seed(seed + 2))
        inputs: dict[str, Inputs] = {"audio": {"input_features": features, "decoder_input_ids": ids}}
    else:
        inputs = {"text": ids, "image": _image_inputs(model, seed)}
    for x in inputs.values():
        _logits(model, x)
    return model, inputs, model.config._attn_implementation or "eager"


def check_multimodal(model_type: str, *, seed: int = 0, time_limit: float | None = TIME_LIMIT,
                     modes: Iterable[str] = MODES) -> Row:
    """Build the tiny ``model_type`` of :data:`MULTIMODAL` and run every mode's checks on each of its inputs;
    never raises (but KeyboardInterrupt)."""
    row = Row(model_type, MULTIMODAL.get(model_type, ""), kind="multimodal")
    return _checked(row, lambda: _check_multimodal(row, seed, tuple(modes)), time_limit)


def _check_multimodal(row: Row, seed: int, modes: tuple[str, ...]) -> None:
    try:
        stock, inputs, attn = build_multimodal(row.model_type, seed=seed)
    except Exception as e:
        row.state, row.reason = "no_build", _message(e)
        return
    whisper = row.model_type == "whisper"
    row.model_class, row.attn_implementation, row.inputs = type(stock).__name__, attn, list(inputs)
    row.layers = _layer_count(stock)
    attention = stock.model.decoder.layers[0].self_attn if whisper else _text_attention(stock)
    row.attention = "" if attention is None else type(attention).__name__
    row.projections = _projections(attention)
    row.rope = "none of its own: rotary adds it (placement='attention')" if whisper else _rope_evidence(stock)
    g = torch.Generator().manual_seed(seed + 1)
    for name, x in inputs.items():
        _check_input(row, stock, name, x, attn, modes, g)


def _check_input(row: Row, stock: nn.Module, name: str, x: Inputs, attn: str, modes: tuple[str, ...],
                 g: torch.Generator) -> None:
    """A multimodal row's checks on its input ``name``: the stock baseline (reload; Whisper's cached decoding
    too), then the verdicts ``<mode>/<name>``."""
    whisper = row.model_type == "whisper"
    auto = "WhisperForConditionalGeneration" if whisper else "AutoModelForImageTextToText"
    stock_logits = _logits(stock, x)
    baseline = {"reload": _guard(row.baseline, f"reload ({name})", lambda: _stock_reload(
        stock, x, stock_logits, attn, auto, name=f"reload ({name})"))}
    if whisper:
        baseline["cache"] = _guard(row.baseline, f"cache ({name})", lambda: _stock_cache(
            stock, x, stock_logits, name=f"cache ({name})"))
    for mode in modes:
        if whisper and mode == "lora":
            run = lambda v: _run_whisper_lora(v, stock, x, g)  # noqa: E731
        elif whisper:
            run = lambda v: _run_whisper_mode(v, stock, x, stock_logits, baseline, g)  # noqa: E731
        elif mode == "lora":
            run = lambda v: _run_lora(v, stock, VLM_LORA_TARGETS, x, attn, baseline, g, auto)  # noqa: E731
        else:
            run = lambda v: _run_mode(v, stock, x, stock_logits, attn, baseline, g, auto)  # noqa: E731
        _run_verdict(row, f"{mode}/{name}", run)


def _rope_alone(stock: nn.Module, ids: Inputs, options: dict) -> tuple[torch.Tensor, set[str]]:
    """What a Whisper install computes at P = I: the logits and keys of ``options`` with ``mixing=None`` (HF
    Whisper has no RoPE of its own: the reference is rotary's RoPE alone, not the stock model)."""
    import rotary.hf

    model = rotary.hf.install(copy.deepcopy(stock), mixing=None, **options)
    return _logits(model, ids), set(model.state_dict())


def _run_whisper_mode(verdict: Verdict, stock: nn.Module, audio: Inputs, stock_logits: torch.Tensor,
                      baseline: dict[str, Check], g: torch.Generator) -> None:
    """Whisper's default install or ``learned_freq=True`` (placement="attention") on a copy of ``stock``: identity
    against the RoPE alone, P (and the frequencies) act, gradient, cached decoding, fold (the RoPE stays) and
    rotary's reload, uninstall."""
    options = {**WHISPER_OPTIONS, **({"learned_freq": True} if _mode(verdict.mode) == "learned_freq" else {})}
    checks = verdict.checks
    reference, rope_keys = _rope_alone(stock, audio, options)
    model = copy.deepcopy(stock)
    if not _install(model, stock_logits, audio, verdict, **options):
        return
    _guard(checks, "identity", lambda: Check("identity", (d := _diff(_logits(model, audio), reference))
                                             <= IDENTITY_TOL, d))
    _guard(checks, "P acts", lambda: _acts(model, reference, audio, g, stock, options, reference))
    if "learned_freq" in options:
        _guard(checks, "freq acts", lambda: _freq_acts(model, audio, g))
    _guard(checks, "gradient", lambda: _gradient(model, audio, learned_freq="learned_freq" in options))
    perturbed = _forward(model, audio, checks, "cache")
    if perturbed is not None:
        _guard(checks, "cache", lambda: _cache_check(model, audio, perturbed, baseline["cache"]))
        _fold_and_reload_rope(model, perturbed, audio, rope_keys, checks)
    _guard(checks, "uninstall", lambda: _uninstall_check(stock, audio, stock_logits, options, g))


def _run_whisper_lora(verdict: Verdict, stock: nn.Module, audio: Inputs, g: torch.Generator) -> None:
    """LoRA on Whisper's q/k/v projections, ``rotary.hf.install(peft_model, placement="attention")``: identity
    against the LoRA model with the RoPE alone, P acts, merge, fold (the RoPE stays) and rotary's reload."""
    import rotary.hf

    checks = verdict.checks
    stock_reference, rope_keys = _rope_alone(stock, audio, WHISPER_OPTIONS)
    model = _lora(stock, WHISPER_LORA_TARGETS, g)
    adapted = _forward(model, audio, checks, "identity")
    if adapted is None:
        return
    reference = _logits(rotary.hf.install(copy.deepcopy(model), mixing=None, **WHISPER_OPTIONS), audio)
    if not _install(model, adapted, audio, verdict, **WHISPER_OPTIONS):
        return
    _guard(checks, "identity", lambda: Check("identity", (d := _diff(_logits(model, audio), reference))
                                             <= IDENTITY_TOL, d))
    _guard(checks, "P acts", lambda: _acts(model, reference, audio, g, stock, WHISPER_OPTIONS, stock_reference))
    perturbed = _forward(model, audio, checks, "merge")
    merged: dict = {}
    if perturbed is not None and _guard(checks, "merge", lambda: _merge(model, audio, perturbed, merged)).value \
            is not None:
        _fold_and_reload_rope(merged["model"], perturbed, audio, rope_keys, checks)


def _fold_and_reload_rope(model: nn.Module, reference: torch.Tensor, audio: Inputs, rope_keys: set[str],
                          checks: list[Check]) -> None:
    """Whisper's fold: P into the projections, ``reference`` kept, the RoPE itself left installed (the keys of
    the install with ``mixing=None``, a record without P); ``rotary.hf.from_pretrained`` reloads what it saves."""
    import transformers

    import rotary
    import rotary.hf

    def fold():
        rotary.fold(model)
        d = _diff(_logits(model, audio), reference)
        record = rotary.hf.installed(model)
        problems = []
        if record is None:
            problems.append("the RoPE's install record is gone")
        elif record.options.rotary.mixing is not None:
            problems.append(f"the record keeps mixing={record.options.rotary.mixing!r}")
        keys = sorted(set(model.state_dict()) ^ rope_keys)
        if keys:
            problems.append(f"keys other than the RoPE alone's {keys[:3]}")
        return Check("fold", d <= EXACT_TOL and not problems, d, "; ".join(problems))

    if _guard(checks, "fold", fold, refusals=True).value is None:
        return

    def reload():
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            loaded = rotary.hf.from_pretrained(transformers.WhisperForConditionalGeneration, folder,
                                               dtype=torch.float32).eval()
        d = _diff(_logits(loaded, audio), reference)
        keys = sorted(set(loaded.state_dict()) ^ set(model.state_dict()))
        return Check("reload", d <= EXACT_TOL and not keys, d, ", ".join(keys[:3]))

    _guard(checks, "reload", reload)


def architectures() -> list[str]:
    """Every model_type of transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, in its order, then those of
    :data:`MULTIMODAL` it lacks: every name :func:`sweep` takes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return causal + [name for name in MULTIMODAL if name not in causal]


def environment() -> dict:
    import peft
    import transformers

    return {
        "date": datetime.date.today().isoformat(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }


def causal_lms() -> set[str]:
    """The model types of transformers' causal LMs."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def sweep(model_types: Iterable[str] | None = None, *, seed: int = 0, time_limit: float | None = TIME_LIMIT,
          modes: Iterable[str] = MODES, progress: Callable[[Row], None] | None = None) -> Report:
    """Check every architecture (or ``model_types``): a causal row for each name but those only of
    :data:`MULTIMODAL` (``qwen2_vl``, ...), a multimodal row for each name of it (``gemma3`` and ``whisper`` get
    both); ``progress`` is called with each finished row."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    start = time.perf_counter()
    rows, multimodal = [], []
    for model_type in architectures() if model_types is None else model_types:
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type not in MULTIMODAL:
            rows.append(check_architecture(model_type, seed=seed, time_limit=time_limit, modes=tuple(modes)))
            if progress is not None:
                progress(rows[-1])
        if model_type in MULTIMODAL:
            multimodal.append(check_multimodal(model_type, seed=seed, time_limit=time_limit, modes=tuple(modes)))
            if progress is not None:
                progress(multimodal[-1])
    return Report(rows, environment(), round(time.perf_counter() - start, 1), multimodal)


# ------------------------------------------------------------------------------------------------ output
_MODE_LABELS = [(m, f"`{m}`" if m != "lora" else "LoRA") for m in MODES]  # the tables' column heads


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def to_json(report: Report) -> dict:
    return {"environment": report.environment, "seconds": report.seconds, "summary": report.summary(),
            "rows": [dataclasses.asdict(r) for r in report.rows],
            "multimodal": [dataclasses.asdict(r) for r in report.multimodal]}


def render(report: Report, command: str = "rotary support") -> str:
    """The markdown of ``docs/support.md``: the summary, what each verdict checks, a row per RoPE architecture,
    the vision-language models and Whisper (where the report has them), the architectures that do not build here
    or have no RoPE, and every check's number."""
    env, s = report.environment, report.summary()
    rope = [r for r in report.rows if r.state == "rope"]

    def names(items):
        return ", ".join(f"`{x}`" for x in items)

    def count(label, items):
        return f"| {label} | {len(items)} | {names(items)} |"

    per_mode = _MODE_LABELS
    lines = [
        "# Which transformers causal LMs `rotary.hf.install` supports",
        "",
        f"Generated by `{command}` on {env['date']}: transformers {env['transformers']}, torch {env['torch']}, "
        f"peft {env['peft']}, Python {env['python']}, CPU, {env['threads']} thread(s); {report.seconds:.0f} s. "
        "Every architecture of transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built from its default config "
        "at a tiny size (2 layers, 3 where that keeps one of each layer type; hidden 64, 4 heads of 16, 2 key/value "
        "heads where grouped, 4 experts, small MLA ranks, vocab 256; float32, random weights at std 0.1, sdpa or "
        "else eager attention) and checked on random tokens (2 x 12, an attention mask of ones). "
        + ("The vision-language models and Whisper are checked with images and audio too, in a table of their own. "
           if report.multimodal else "")
        + "Regenerate this page with `rotary support` after upgrading transformers.",
        "",
        "## Summary",
        "",
        "| | count | architectures |",
        "|---|---|---|",
        f"| swept | {s['architectures']} | |",
        f"| build here | {s['built']} | |",
        f"| RoPE text architectures that build | {s['rope']} | |",
        f"| works end to end, default install | {len(s['works']['default'])} | (the table below) |",
        f"| works end to end, `learned_freq=True` | {len(s['works']['learned_freq'])} | |",
        f"| works end to end, LoRA | {len(s['works']['lora'])} | |",
        f"| folds to a stock checkpoint (default install) | {len(s['fold_works'])} | |",
        count("install refused, model unchanged (default)", s["refused"]["default"]),
        count("fold refused (`learned_freq=True`)", s["fold_refused"]["learned_freq"]),
        count("**P inert**: a random P leaves the logits unchanged (a silent no-op)", s["p_inert"]),
        count("learned frequencies inert", s["freq_inert"]),
        count("wrong checkpoint: fold, merge or stock reload changes the logits or keys", s["wrong_checkpoint"]),
        count("a refusal changed the model", s["refusal_changed_model"]),
        count("crash: an exception that is not a refusal", s["crash"]),
        count("another check failed (identity, gradient, cache, uninstall)", s["other_failures"]),
        count("timeout", s["timeout"]),
        count("RoPE in the config, but does not build here", s["no_build_rope"]),
        *_multimodal_summary(s["multimodal"]),
        "",
        "## What a verdict checks",
        "",
        "`works` means every check below passed; otherwise the cell lists the failed checks, each with the number "
        "it measured (max abs logit difference unless said otherwise) or the exception it raised (`crash: type: "
        "message`). `refused: ...` is an error rotary raised at install on purpose (its type and message); the model "
        "must still give the stock logits afterwards.",
        "",
        f"- identity: installed (P = I) against stock logits, <= {IDENTITY_TOL:g};",
        f"- P acts: every mixer angle of the install's Rotaries set to normal(0, {P_STD}): the logits must move by "
        f"> {ACTS_TOL:g}. Where they do not (`P inert`), a dense P (`mixing=\"orthogonal\"`) is tried to tell Givens "
        "planes that commute with the model's RoPE pairs from a P that never reaches the scores. `freq acts` "
        "(`learned_freq`): the learned frequency scales likewise;",
        "- gradient: the loss's gradient reaches P (and the learned frequencies): its L1 norm, > 0;",
        f"- cache: prefill of {LENGTH - DECODE_STEPS} tokens, then {DECODE_STEPS} single-token steps with the KV "
        f"cache, against the full sequence, <= {EXACT_TOL:g};",
        f"- fold: `rotary.fold` keeps the logits (<= {EXACT_TOL:g}) and leaves the stock state_dict keys, no install "
        "record and no `config.rotary_install`; `refused: ...` where rotary refuses to fold;",
        f"- reload: `save_pretrained`, then stock `AutoModelForCausalLM.from_pretrained`: the same logits (<= "
        f"{EXACT_TOL:g}) and no missing, unexpected or mismatched keys;",
        f"- uninstall: install, random P, `rotary.hf.uninstall`: the stock logits (<= {IDENTITY_TOL:g}) and keys;",
        "- LoRA: `get_peft_model(model, LoraConfig(r=4, target_modules=<the first attention's q/k/v projections>))` "
        "(a nonzero adapter), `rotary.hf.install(peft_model)`: identity, P acts, `merge_and_unload()` (merge: the "
        "same logits), fold, reload.",
        "",
        "A check that the stock model fails too (its own cached decoding or save/reload) is marked `n/a`, not "
        "counted.",
        "",
        "## RoPE architectures",
        "",
        "| model_type | attention (q/k/v) | " + " | ".join(label for _, label in per_mode) + " | fold to stock |",
        "|---|---|" + "---|" * len(per_mode) + "---|",
    ]
    for r in rope:
        cells = [f"`{r.model_type}`", f"{r.attention} ({', '.join(r.projections) or '-'})"]
        cells += ["-" if r.verdicts.get(mode) is None else r.verdicts[mode].text() for mode, _ in per_mode]
        cells.append("-" if r.fold is None else r.fold.text())
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += _multimodal_section(report.multimodal)
    lines += ["", "## Does not build here", "",
              "The tiny config, the model's construction or its stock forward fails (or it ran past the time limit), "
              "before rotary is involved. Each reason says whether transformers' own default config builds (on the "
              "meta device).", "", "| model_type | class | RoPE in config | reason |", "|---|---|---|---|"]
    for r in report.rows:
        if r.state in ("no_build", "timeout", "crash"):
            lines.append(f"| `{r.model_type}` | {_cell(r.model_class)} | {_cell(r.rope or '-')} | "
                         f"{_cell(r.reason)} |")
    lines += ["", "## No RoPE", "", "Built, but neither the config nor a module has a rotary position embedding. The "
              "last column says what `rotary.hf.install(model)` did.", "", "| model_type | class | why | install |",
              "|---|---|---|---|"]
    for r in report.rows:
        if r.state == "no_rope":
            v = r.verdicts.get("default")
            lines.append(f"| `{r.model_type}` | {_cell(r.model_class)} | {_cell(r.reason)} | "
                         f"{_cell('-' if v is None else v.text())} |")
    lines += ["", "## Measurements", "", "Every check's number, per architecture and way of installing (baseline: the "
              "stock model's own cached decoding and save/reload), and the seconds each architecture took.", "",
              "| model_type | s | baseline | " + " | ".join(label for _, label in per_mode) + " |",
              "|---|---|---|" + "---|" * len(per_mode)]
    for r in rope:
        cells = [f"`{r.model_type}`", f"{r.seconds:.1f}", ", ".join(c.text() for c in r.baseline)]
        for mode, _ in per_mode:
            v = r.verdicts.get(mode)
            cells.append("-" if v is None else (", ".join(c.text() for c in v.checks) or v.text()))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines + _multimodal_measurements(report.multimodal)) + "\n"


def _multimodal_summary(m: dict) -> list[str]:
    """The summary table's lines of the vision-language models and Whisper (none where the sweep had none): how
    many of them work end to end, every input, by way of installing."""
    if not m["swept"]:
        return []

    def line(label, items):
        return f"| vision-language models and Whisper: {label} | {len(items)} of {m['swept']} | " + ", ".join(
            f"`{x}`" for x in items) + " |"

    return [line("work end to end, default install", m["works"]["default"]),
            line("work end to end, `learned_freq=True`", m["works"]["learned_freq"]),
            line("`learned_freq=True` refused, model unchanged", m["refused"]["learned_freq"]),
            line("work end to end, LoRA", m["works"]["lora"])]


def _multimodal_section(rows: list[Row]) -> list[str]:
    """The section of the vision-language models and Whisper: what differs from the causal checks, and a line per
    model and input (none where the sweep had none)."""
    if not rows:
        return []
    per_mode = _MODE_LABELS
    lines = [
        "", "## Vision-language models and Whisper", "",
        "Built from tiny configs of their own: the text sizes above (2 layers, hidden 64, 4 heads of 16, 2 key/value "
        "heads, vocab 256), a one-layer vision tower of width 32 on 14-pixel patches; Qwen's M-RoPE with sections 2, "
        "3, 3 (interleaved for Qwen3-VL), Gemma 3 with one sliding and one full layer; Whisper with 2 encoder and 2 "
        f"decoder layers on {MEL} mel bins x {FRAMES} frames. Each is checked on each of its inputs: `text` "
        f"({BATCH} x {LENGTH} random tokens), `image` (one random image among random tokens, batch 1: Qwen 4 x 4 "
        "patches, 4 image tokens in 20; Gemma 3 28 x 28 pixels, 4 image tokens in 12), `audio` (Whisper: random "
        f"log-mel features and {BATCH} x {LENGTH} decoder tokens).",
        "",
        "The checks are those above, except: the vision-language models' reload is stock "
        "`AutoModelForImageTextToText.from_pretrained`, their LoRA targets the language model's q/k/v "
        "(`target_modules=r\"model\\.language_model.*\\.(q_proj|k_proj|v_proj)\"`), and their cached decoding is "
        "not checked. HF Whisper has no RoPE of its own: rotary adds it, `rotary.hf.install(model, "
        "placement=\"attention\")` (the RoPE and P on q and k of every decoder self-attention); identity is against "
        "the same install with `mixing=None` (the RoPE alone), cached decoding feeds the decoder's tokens one at a "
        "time with the cache, the fold moves P into the projections and keeps the RoPE installed (the keys of the "
        "install with `mixing=None`), and the reload is `rotary.hf.from_pretrained(WhisperForConditionalGeneration, "
        "folder)`; its LoRA targets every attention's `q_proj`, `k_proj` and `v_proj`.",
        "",
        "| model_type | class | attention (q/k/v) | input | " + " | ".join(label for _, label in per_mode)
        + " | fold and reload |",
        "|---|---|---|---|" + "---|" * len(per_mode) + "---|",
    ]
    for r in rows:
        head = [f"`{r.model_type}`", r.model_class]
        if r.state != "rope":
            lines.append("| " + " | ".join(_cell(c) for c in head + ["-", "-", f"{r.state}: {r.reason}"]
                                           + ["-"] * len(per_mode)) + " |")
            continue
        for name in r.inputs:
            cells = head + [f"{r.attention} ({', '.join(r.projections) or '-'})", name]
            cells += ["-" if r.verdicts.get(f"{m}/{name}") is None else r.verdicts[f"{m}/{name}"].text()
                      for m, _ in per_mode]
            fold = r.fold_of(f"default/{name}")
            cells.append("-" if fold is None else fold.text())
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _multimodal_measurements(rows: list[Row]) -> list[str]:
    """Every check's number of the vision-language models and Whisper, per input (none where the sweep had
    none)."""
    built = [r for r in rows if r.state == "rope"]
    if not built:
        return []
    per_mode = _MODE_LABELS
    lines = ["", "Vision-language models and Whisper, per input (the seconds are the model's, every input):", "",
             "| model_type | input | s | baseline | " + " | ".join(label for _, label in per_mode) + " |",
             "|---|---|---|---|" + "---|" * len(per_mode)]
    for r in built:
        for name in r.inputs:
            baseline = [c for c in r.baseline if c.name.endswith(f"({name})")]
            cells = [f"`{r.model_type}`", name, f"{r.seconds:.1f}", ", ".join(c.text() for c in baseline)]
            for mode, _ in per_mode:
                v = r.verdicts.get(f"{mode}/{name}")
                cells.append("-" if v is None else (", ".join(c.text() for c in v.checks) or v.text()))
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines
