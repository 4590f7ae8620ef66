"""The one install mechanism of the integrations (openai-whisper, Hugging Face causal LMs and Whisper).

- :mod:`.options`: :class:`InstallOptions`, what an install was asked for (a :class:`rotary.core.options.RotaryOptions`
  and the host's fields), validated once, serialisable.
- :mod:`.record`: :class:`Install`, the record of what was installed where (the Rotaries, their q/k projections,
  the handles of every hook and replaced forward), implementing the fold protocol once; removal undoes it.
- :mod:`.mix`: how P is applied (on the projection weights or on activations) and the fold of one Rotary.
- :mod:`.adapters`: what an install must know of adapter wrappers (PEFT), without importing them.

A host file keeps only what is host-specific: its inspection of the model and its copied forward bodies.
"""

from .adapters import active, describe, is_adapter_layer, is_training_wrapper
from .mix import MixedOutput, MixedWeights, commutes_with_rotations, heads_mixer, plain_linear, prepare_fold_into
from .options import FORMAT, MIX_NORM, MIX_ON, PLACEMENTS, InstallOptions, flag, is_record
from .record import RECORD_NAME, Install, Placed, Target, find

__all__ = [
    "FORMAT", "MIX_NORM", "MIX_ON", "PLACEMENTS", "RECORD_NAME", "Install", "InstallOptions", "MixedOutput",
    "MixedWeights", "Placed", "Target", "active", "commutes_with_rotations", "describe", "find", "flag", "heads_mixer",
    "is_adapter_layer", "is_record", "is_training_wrapper", "plain_linear", "prepare_fold_into",
]
