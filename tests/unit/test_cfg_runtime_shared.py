"""What the annealed / scheduled CFG engine (``guidance/cfg_runtime.py``) shares between runs cannot change."""

from __future__ import annotations

import dataclasses

import pytest

from preprint.guidance import cads
from preprint.guidance.cfg_runtime import CADS, AdaptiveGuidance, Host, ScheduledCFG


@pytest.mark.parametrize("make", [
    lambda: Host(parameterisation=lambda ms: "eps", combines_with_cfg=lambda guider: True),
    lambda: ScheduledCFG("Scheduled"),
    lambda: AdaptiveGuidance("AG"),
    lambda: CADS("C", cads.CADSConfig()),
])
def test_host_and_techniques_are_immutable(make):
    """The host and the techniques are shared by every run of a patched model and by its clones: no run can
    change them under another's feet (per-run state lives in the Run)."""
    obj = make()
    name = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, name, None)
