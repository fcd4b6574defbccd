"""Tier bookkeeping shared by both test tiers: which tier each test belongs to, and a plain-words summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

from preprint.runner.comfy_host import find_comfyui, why_not_found

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_FILE = Path(os.environ.get("PREPRINT_TIER_SUMMARY", ROOT / ".pytest_tiers.json"))
COMFYUI = find_comfyui()
_counts: dict[str, dict[str, int]] = {"unit": {}, "host": {}, "browser": {}}


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        tier = next((t for t in ("host", "browser") if f"tests/{t}/" in report.nodeid), "unit")
        outcome = report.outcome
        _counts[tier][outcome] = _counts[tier].get(outcome, 0) + 1


def pytest_sessionfinish(session, exitstatus):
    SUMMARY_FILE.write_text(json.dumps({
        "counts": _counts,
        "comfyui": str(COMFYUI) if COMFYUI else None,
        "host_skip_reason": None if COMFYUI else why_not_found(),
        "browser_skip_reason": _browser_skip_reason(),
    }))


def _browser_skip_reason() -> str | None:
    from .browser.conftest import SKIP_REASON

    return SKIP_REASON
