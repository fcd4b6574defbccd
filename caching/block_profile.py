"""Block-change profiles for Block Caching: measured once, saved as a small JSON file, reused.

Wimbauer et al., "Cache Me if You Can: Accelerating Diffusion Models through Block Caching"
(arXiv:2312.03209), Sec. 3: the output of block b changes between steps by the relative L1 amount

    delta_b(t) = ||o_b(t) - o_b(t-1)||_1 / ||o_b(t)||_1                                         (Eq. 1)

and the change of most blocks is small and smooth in t. A block is recomputed when the change accumulated
since it was last computed would pass a threshold, and reused otherwise (Sec. 3.2).

A profile stores, per block, the *rate* of change per unit of sampling progress (progress runs 0 -> 1 over
the run), measured on a calibration run. Accumulated change between two points of the run is the integral
of that rate, so one profile serves any step count: a user who calibrates at 20 steps and samples at 30 gets
the same schedule shape with proportionally more reuse, no recalibration needed.

The file carries a fingerprint of the network's architecture (class and parameter shapes, not weights), so a
profile made on SDXL is refused on SD1.5 with a message saying so; LoRA and fine-tunes of the same
architecture share profiles.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "preprint-block-cache-profile"
VERSION = 1
# profiles are chosen by name in a text widget: a plain name keeps the file inside the profile folder
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.\- ]{1,120}$")


class ProfileError(ValueError):
    """A profile that cannot be used here (wrong model, malformed, missing)."""


def profile_file_name(name: str) -> str:
    """The file name (NAME.json) a profile name stands for; ProfileError for anything but a plain name."""
    name = name.strip()
    if name.endswith(".json"):
        name = name[:-5]
    if not _PLAIN_NAME.match(name) or name.startswith("."):
        raise ProfileError(f"profile name {name!r} is not a plain file name; use letters, digits, spaces, '-', '_' "
                           "or '.', without folders.")
    return f"{name}.json"


def model_fingerprint(module: torch.nn.Module) -> str:
    """Architecture fingerprint: class name plus every parameter's name and shape, hashed."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, p in module.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def relative_l1_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """Eq. 1 of the paper: ||new - old||_1 / ||new||_1 (0 when both are zero)."""
    num = (new.float() - old.float()).abs().sum().item()
    den = new.float().abs().sum().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def block_key(name: tuple[str, int]) -> str:
    return f"{name[0]}.{name[1]}"


@dataclass
class Profile:
    """Per-block change rates on a progress grid (see the module docstring)."""

    fingerprint: str
    model: str
    progress: list[float]
    rates: dict[str, list[float]]
    steps: int = 0
    notes: dict = field(default_factory=dict)

    def rate(self, block: str, p: float) -> float:
        """Piecewise-linear rate at progress p, held constant beyond the measured range."""
        r = self.rates.get(block)
        if not r:
            return math.inf  # unmeasured block: never reuse it
        g = self.progress
        if p <= g[0]:
            return r[0]
        if p >= g[-1]:
            return r[-1]
        k = bisect.bisect_right(g, p)
        w = (p - g[k - 1]) / (g[k] - g[k - 1])
        return r[k - 1] * (1 - w) + r[k] * w

    def accumulated(self, block: str, p0: float, p1: float, pieces: int = 8) -> float:
        """Integral of the block's rate from p0 to p1 (trapezoid rule): the change expected between them."""
        if p1 <= p0:
            return 0.0
        h = (p1 - p0) / pieces
        vals = [self.rate(block, p0 + k * h) for k in range(pieces + 1)]
        if math.inf in vals:  # an unmeasured (never reused) block: the trapezoid sum would give inf - inf = NaN
            return math.inf
        return h * (sum(vals) - 0.5 * (vals[0] + vals[-1]))

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "model": self.model,
                "steps": self.steps, "progress": self.progress, "rates": self.rates, "notes": self.notes}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def from_json(cls, data: dict, source: str = "profile") -> Profile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"{source} is not a Preprint block-cache profile (no '{FORMAT}' format tag); "
                               "make one with the Block Cache node in 'calibrate' mode.")
        if data.get("version") != VERSION:
            raise ProfileError(f"{source} has profile version {data.get('version')}, this Preprint reads version "
                               f"{VERSION}; recalibrate with the Block Cache node in 'calibrate' mode.")
        try:
            progress = [float(v) for v in data["progress"]]
            rates = {str(k): [float(x) for x in v] for k, v in data["rates"].items()}
            prof = cls(fingerprint=str(data["fingerprint"]), model=str(data.get("model", "?")), progress=progress,
                       rates=rates, steps=int(data.get("steps", 0)), notes=dict(data.get("notes", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{source} is malformed ({e}); recalibrate with the Block Cache node in "
                               "'calibrate' mode.") from e
        if not progress or any(b <= a for a, b in zip(progress, progress[1:], strict=False)):
            raise ProfileError(f"{source} is malformed: its progress grid must be non-empty and increasing.")
        bad = [k for k, v in rates.items() if len(v) != len(progress)]
        if bad:
            raise ProfileError(f"{source} is malformed: blocks {bad[:3]} have rate lists of the wrong length.")
        return prof

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"block-cache profile '{path}' does not exist; run the Block Cache node once in "
                               "'calibrate' mode to create it, or check the name.")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ProfileError(f"block-cache profile '{path}' could not be read as JSON ({e}).") from e
        return cls.from_json(data, source=f"block-cache profile '{path}'")

    def check_model(self, fingerprint: str, model: str) -> None:
        if fingerprint != self.fingerprint:
            raise ProfileError(
                f"this block-cache profile was calibrated on a different model architecture ({self.model}, "
                f"fingerprint {self.fingerprint}) than the one it is applied to ({model}, fingerprint "
                f"{fingerprint}); block changes differ between architectures, so it cannot be reused. "
                "Calibrate a profile for this model with the Block Cache node in 'calibrate' mode.")


class Calibrator:
    """Collects per-block change rates during one run and turns them into a :class:`Profile`."""

    def __init__(self):
        # block -> list of (progress midpoint, rate) samples, one per chunk per measured interval
        self.samples: dict[str, list[tuple[float, float]]] = {}

    def add(self, block: str, p_prev: float, p_now: float, change: float) -> None:
        if p_now <= p_prev or not math.isfinite(change):
            return
        self.samples.setdefault(block, []).append((0.5 * (p_prev + p_now), change / (p_now - p_prev)))

    def profile(self, fingerprint: str, model: str, steps: int) -> Profile:
        if not self.samples:
            raise ProfileError("calibration recorded no block changes (the run had fewer than two steps?); "
                               "calibrate with at least 4 sampling steps.")
        grid = sorted({round(p, 6) for s in self.samples.values() for p, _ in s})
        rates: dict[str, list[float]] = {}
        for block, s in self.samples.items():
            by_p: dict[float, list[float]] = {}
            for p, r in s:
                by_p.setdefault(round(p, 6), []).append(r)
            known = sorted(by_p)
            vals = [sum(by_p[p]) / len(by_p[p]) for p in known]
            # place every block on the common grid (blocks measured at other points are interpolated)
            prof = Profile("", "", known, {"b": vals})
            rates[block] = [round(prof.rate("b", p), 8) for p in grid]
        return Profile(fingerprint=fingerprint, model=model, progress=grid, rates=rates, steps=steps)
