"""Host tier: boot the real ComfyUI once per session (CPU), with Preprint loaded as ComfyUI loads a custom-node
folder. Skipped, with the reason in the summary, when no ComfyUI checkout is found.

Booting happens when this conftest is imported, before pytest imports the host test modules: they import
``comfy`` at module level, and ComfyUI must be on ``sys.path`` in CPU mode before that first import.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest

from preprint.runner.comfy_host import PACK_DIR, find_comfyui

HYPHENATED_NAME = "comfyui-preprint"
COMFYUI = find_comfyui()


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _boot():
    from preprint.runner import comfy_host as ch

    work = Path(tempfile.mkdtemp(prefix="preprint-host-"))
    custom_nodes = work / "custom_nodes"
    custom_nodes.mkdir()
    # the pack under a hyphenated folder name, as git clones often are
    os.symlink(PACK_DIR, custom_nodes / HYPHENATED_NAME, target_is_directory=True)
    capture = _LogCapture()
    root = logging.getLogger()
    root.addHandler(capture)
    try:
        host = ch.boot(COMFYUI, pack_dir=custom_nodes / HYPHENATED_NAME, output_dir=work / "output")
    finally:
        root.removeHandler(capture)
    host.boot_log = capture.messages
    host.work_dir = work
    # calibrations computed by the examples and tests go to the session's folder, never the checkout's models/
    os.environ.setdefault("PREPRINT_CALIBRATION_DIR", str(work / "calibration"))
    return host


HOST = _boot() if COMFYUI is not None else None

if HOST is not None:
    collect_ignore: list[str] = []
else:
    # Without ComfyUI the host modules cannot even be imported; tests/conftest.py reports the skip.
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def comfy_host():
    if HOST is None:
        pytest.skip("no ComfyUI checkout found")
    return HOST


@pytest.fixture
def sag_masks(monkeypatch):
    """The masks SAG builds from the attention map, as the node computes them: its own ``attention_mask`` (looked up
    in the maths module the run engine imported, under ComfyUI's module name for the pack) wrapped to record every
    result. Nothing about the mask is changed."""
    import sys

    import nodes

    pack = nodes.NODE_CLASS_MAPPINGS["PreprintSelfAttentionGuidance"].__module__.rsplit(".", 2)[0]
    sag_math = sys.modules[f"{pack}.guidance.pag_runtime"].sag_math
    real, seen = sag_math.attention_mask, []

    def record(*args, **kwargs):
        mask = real(*args, **kwargs)
        seen.append(mask.clone())
        return mask
    monkeypatch.setattr(sag_math, "attention_mask", record)
    return seen
