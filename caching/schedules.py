"""Refresh schedules: on which steps the deep features are recomputed.

DeepCache (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", arXiv:2312.00858) refreshes the
cached high-level features every N steps (uniform), or at steps packed more densely around a centre step
where features change fastest (non-uniform, Sec. 3.3: the paper centres at step 15 of 50 with power 1.4).
Faster Diffusion (Li et al., "Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models",
arXiv:2312.09608) recomputes the encoder only on key steps, dense at the start of sampling where encoder
features change most (Sec. 3.3; their 50-step DDIM key set is {0,1,2,3,5,10,15,25,35}).
"""

from __future__ import annotations

import math

SCHEDULES = ("uniform", "non-uniform")

# Faster Diffusion's 50-step key set, as fractions of the run, so any step count gets the same shape.
FASTER_DIFFUSION_KEYS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)


def uniform_refresh(steps: int, interval: int) -> frozenset[int]:
    """Steps 0, N, 2N, ...: the uniform DeepCache schedule (interval 1 refreshes every step)."""
    if interval < 1:
        raise ValueError(f"cache interval must be at least 1, got {interval}")
    return frozenset(range(0, steps, interval))


def nonuniform_refresh(steps: int, interval: int, center: float = 0.3, power: float = 1.4) -> frozenset[int]:
    """As many refreshes as the uniform schedule, packed around ``center`` (a fraction of the run).

    The refresh steps are c + sign(v) |v|^p for v evenly spaced in [-c^(1/p), (steps - c)^(1/p)]: with p > 1
    this warps an even grid so points crowd near c, where the paper measured the largest feature change.
    When rounding merges points the power is relaxed towards 1 (the uniform grid) until the count is met.
    """
    if interval < 1:
        raise ValueError(f"cache interval must be at least 1, got {interval}")
    if not 0.0 <= center <= 1.0:
        raise ValueError(f"center must be a fraction of the run in [0, 1], got {center}")
    if power < 1.0:
        raise ValueError(f"power must be at least 1 (1 is the uniform grid), got {power}")
    want = len(uniform_refresh(steps, interval))
    if want >= steps:
        return frozenset(range(steps))
    c = center * (steps - 1)
    p = power
    best: set[int] = set()
    while True:
        lo, hi = -(c ** (1.0 / p)), (steps - 1 - c) ** (1.0 / p)
        pts = {0}
        for k in range(want):
            v = lo + (hi - lo) * k / max(want - 1, 1)
            pts.add(min(steps - 1, max(0, int(round(c + math.copysign(abs(v) ** p, v))))))
        if len(pts) > len(best):
            best = pts
        if len(pts) >= want or p <= 1.0:
            break
        p = max(1.0, p - 0.02)
    return frozenset(sorted(best)[:want] if len(best) > want else best)


def refresh_steps(schedule: str, steps: int, interval: int, center: float = 0.3, power: float = 1.4) -> frozenset[int]:
    if schedule == "uniform":
        return uniform_refresh(steps, interval)
    if schedule == "non-uniform":
        return nonuniform_refresh(steps, interval, center, power)
    raise ValueError(f"unknown refresh schedule {schedule!r}; expected one of {SCHEDULES}")


def faster_diffusion_keys(steps: int, interval: int | None = None) -> frozenset[int]:
    """Key steps for encoder propagation.

    ``interval`` None: the paper's non-uniform 50-step key set rescaled to ``steps`` (step 0 always a key).
    An integer: uniform keys every ``interval`` steps (the paper's simpler variant).
    """
    if interval is not None:
        return uniform_refresh(steps, interval)
    keys = {min(steps - 1, int(round(k * steps / 50))) for k in FASTER_DIFFUSION_KEYS_50}
    # Short runs squash the dense head together; keep the first few steps all keys as the paper does.
    keys.update(range(min(steps, max(1, round(4 * steps / 50)))))
    return frozenset(keys)
