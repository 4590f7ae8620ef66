"""The module's angles against frequencies computed apart from it: Python floats from each scheme's definition
(``rotary.core.reference.frequencies_reference``), with a learned frequency scale, through the whole forward.

Other tests hold the same schemes against transformers' own ``ROPE_INIT_FUNCTIONS`` (tests/test_scaling.py);
here the reference shares no code with :mod:`rotary.scaling` and also covers the learned scale."""

from __future__ import annotations

import pytest
import torch

from rotary import Rotary
from rotary.core.reference import attention_factor_reference, frequencies_reference, rotary_reference

R = 16  # rotary_dim of every case: head_dim 16, two heads
SCHEMES = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "ntk": {"rope_type": "ntk", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    "yarn-deepseek": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "mscale": 0.7,
                      "mscale_all_dim": 0.7, "beta_fast": 16.0, "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 32, "max_position_embeddings": 128,
                 "short_factor": [1.0 + 0.1 * i for i in range(R // 2)],
                 "long_factor": [2.0 + 0.5 * i for i in range(R // 2)]},
    "p-rope": {"rope_type": "p", "p": 0.5},
}
LENGTH_DEPENDENT = ("dynamic", "longrope")


def _trained(name: str, learned: bool, interleaved: bool) -> tuple[Rotary, list[float] | None]:
    m = Rotary(32, 2, scaling=SCHEMES[name], learned_freq=learned, interleaved=interleaved, mixing="givens")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        m.mixer.angles.copy_(torch.randn(m.mixer.angles.shape, generator=g))
        if learned:
            m.angles.log_freq_scale.copy_(0.3 * torch.randn(R // 2, generator=g))
    scale = m.angles.log_freq_scale.detach().double().tolist() if learned else None
    return m, scale


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned-scale"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_frequencies_equal_the_python_float_definition(name, learned):
    m, scale = _trained(name, learned, True)
    lengths = [None, 20, 200] if name in LENGTH_DEPENDENT else [None]
    for length in lengths:
        expected = torch.tensor(frequencies_reference(R, 10000.0, scaling=SCHEMES[name], length=length,
                                                      log_scale=scale), dtype=torch.float64)
        torch.testing.assert_close(m.frequencies(length), expected, rtol=1e-12, atol=0)
    assert m.angles.attention_factor == pytest.approx(attention_factor_reference(SCHEMES[name]), rel=1e-12)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned-scale"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_forward_equals_the_reference_built_from_those_frequencies(name, learned, interleaved):
    """``a R(m) P x``: the rotation at the reference's frequencies, P from the float64 Givens matrix, times the
    reference attention factor on the rotated channels. At an offset past the original contexts, so that every
    scheme's long-context regime is what the forward uses."""
    m, scale = _trained(name, learned, interleaved)
    offset, T = 150, 9
    x = torch.randn(2, T, 2, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = m.double()(x, offset=offset, layout="BTHD")
    pos = torch.arange(offset, offset + T)
    length = offset + T if name in LENGTH_DEPENDENT else None  # the default: the last position + 1
    freqs = torch.tensor(frequencies_reference(R, 10000.0, scaling=SCHEMES[name], length=length, log_scale=scale),
                         dtype=torch.float64)
    ref = rotary_reference(x, pos, interleaved=interleaved, freqs=freqs, mixing=m.mixing_matrix(torch.float64))
    ref = torch.cat([attention_factor_reference(SCHEMES[name]) * ref[..., :R], ref[..., R:]], dim=-1)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
