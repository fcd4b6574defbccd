"""Refresh schedules: on which steps the deep features are recomputed.

DeepCache (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", arXiv:2312.00858) refreshes the
cached high-level features every N steps (uniform), or at steps packed more densely around a centre step
where features change fastest (non-uniform, Sec. 3.3: the paper centres at step 15 of 50 with power 1.4).
Faster Diffusion (Li et al., "Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models",
arXiv:2312.09608) recomputes the encoder only on key steps, dense at the start of sampling where encoder
features change most (Sec. 3.3; their 50-step DDIM key set is {0,1,2,3,5,10,15,25,35}).
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("preprint.caching")

SCHEDULES = ("uniform", "non-uniform")

# Faster Diffusion's 50-step key set, as fractions of the run, so any step count gets the same shape.
FASTER_DIFFUSION_KEYS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)


def uniform_refresh(steps: int, interval: int) -> frozenset[int]:
    """Steps 0, N, 2N, ...: the uniform DeepCache schedule (interval 1 refreshes every step)."""
    if interval < 1:
        raise ValueError(f"cache interval must be at least 1, got {interval}")
    return frozenset(range(0, steps, interval))


def _quad_center_keys(steps: int, n: int, center: int, power: float) -> list[int]:
    """Key steps for one power: n + 1 points evenly spaced between -center^(1/p) and (steps - center)^(1/p),
    raised to p and truncated to integers, duplicates merged, the two end points dropped, step 0 added.

    The lower end is the principal complex root of -center, as in the reference implementation (a negative
    base to a fractional power is complex in Python); the real part of its power is what the schedule keeps,
    so the points below the centre thin out more gently than a mirror image of those above it would.
    """
    start = complex(-center) ** (1.0 / power)
    stop = complex((steps - center) ** (1.0 / power))
    delta = (stop - start) / n
    points = [start + k * delta for k in range(n)] + [stop]
    values = {int(_real_power(z, power)) for z in points}
    return [0] + [v + center for v in sorted(values)[1:-1]]


def _real_power(z: complex, power: float) -> float:
    """Real part of the principal value of z ** power, computed as exp(p log|z|) cos(p arg z)."""
    r = abs(z)
    if r == 0.0:
        return 0.0
    return math.exp(power * math.log(r)) * math.cos(power * math.atan2(z.imag, z.real))


def nonuniform_refresh(steps: int, interval: int, center: float = 0.3, power: float = 1.4) -> frozenset[int]:
    """As many refreshes as the uniform schedule, packed around ``center`` (a fraction of the run).

    The placement of the reference DeepCache implementation (``sample_from_quad_center``): the centre step is
    round(center * steps); the keys are the integer parts of an evenly spaced grid in |u|^(1/p) around it
    (see :func:`_quad_center_keys`), so they crowd near the centre, where the paper measured the largest
    feature change (with ``center`` near 1 the last step can be a key). When merged duplicates leave fewer keys
    than the budget, the power is lowered by 0.02 at a time towards the uniform grid until the count is met.
    """
    if interval < 1:
        raise ValueError(f"cache interval must be at least 1, got {interval}")
    if not 0.0 <= center <= 1.0:
        raise ValueError(f"center must be a fraction of the run in [0, 1], got {center}")
    if power < 1.0:
        raise ValueError(f"power must be at least 1 (1 is the uniform grid), got {power}")
    uniform = uniform_refresh(steps, interval)
    want = len(uniform)
    if want >= steps:
        return frozenset(range(steps))
    c = round(center * steps)
    p = power
    while p > 1.0:
        keys = _quad_center_keys(steps, want, c, p)
        if len(keys) == want:
            return frozenset(keys)
        p -= 0.02
    log.warning("non-uniform refresh: no power in (1, %s] places %d refreshes in %d steps around step %d; "
                "using the uniform schedule", power, want, steps, c)
    return uniform


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
