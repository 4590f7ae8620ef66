"""`rotary demo`: its checks report what the float64 reference and the invariants say, and its flags explain
themselves."""

import torch

from rotary.lab import demo
from rotary.lab.cli import build_parser


def test_checks_measure_real_errors():
    m = demo.trained_looking(48, 4)
    found = demo.checks(m, torch.randn(2, 9, 48), offset=37)
    assert found["reference"] < 1e-5  # float32 against float64
    assert found["incremental"] == 0  # one token at a time is the same rotation, bit for bit
    assert found["shift"] < 1e-4  # scores depend on relative positions only
    assert found["bf16"] < 2**-8  # one bf16 rounding, not position 100 000 rounded


def test_checks_would_see_a_wrong_rotation(monkeypatch):
    """The reference check is not vacuous: a module rotating at the wrong positions is caught."""
    m = demo.trained_looking(48, 4)
    call = type(m).forward
    monkeypatch.setattr(type(m), "forward", lambda self, x, offset=0, **kw: call(self, x, offset=offset + 1, **kw))
    assert demo.checks(m, torch.randn(2, 9, 48), offset=37)["reference"] > 1e-2


def test_every_demo_flag_has_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["demo"]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert flags and all(a.help for a in flags)
