"""Adams-Bashforth style extrapolation of cached block outputs (AB-Cache).

Yu et al., "AB-Cache: Training-Free Acceleration of Diffusion Models via Adams-Bashforth Cached Feature
Reuse" (arXiv:2504.10540), Sec. 3: treating a block's output F as a smooth function of the step, the value
at the next step is predicted from the last k computed values with k-th order coefficients instead of being
copied; with equally spaced steps these are the binomial weights

    order 1:  F ~ F_1                  (plain reuse)
    order 2:  F ~ 2 F_1 - F_2
    order 3:  F ~ 3 F_1 - 3 F_2 + F_3                                                   (their Eq. 10-12)

where F_1 is the most recent computed value. Computed steps are not equally spaced once some are skipped,
and Heun / 2S samplers evaluate at fractional positions, so the weights here are the Lagrange weights of the
polynomial through the stored (position, value) pairs evaluated at the current position; on an even grid
they reduce to the coefficients above.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch


def extrapolation_weights(nodes: Sequence[float], target: float) -> list[float]:
    """Lagrange weights w_j with sum_j w_j f(nodes_j) = p(target), p the interpolating polynomial."""
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"extrapolation nodes must be distinct, got {list(nodes)}")
    weights = []
    for j, uj in enumerate(nodes):
        w = 1.0
        for m, um in enumerate(nodes):
            if m != j:
                w *= (target - um) / (uj - um)
        weights.append(w)
    return weights


class History:
    """The last ``order`` computed values of one tensor stream, with their step positions."""

    def __init__(self, order: int):
        if order < 1:
            raise ValueError(f"extrapolation order must be at least 1, got {order}")
        self.order = order
        self.items: deque[tuple[float, torch.Tensor]] = deque(maxlen=order)

    def push(self, position: float, value: torch.Tensor) -> None:
        # a second evaluation at the same position (Heun's corrector vs. the next step) replaces the first
        if self.items and self.items[-1][0] == position:
            self.items.pop()
        self.items.append((position, value.detach().clone()))

    def __len__(self) -> int:
        return len(self.items)

    def predict(self, position: float) -> torch.Tensor:
        """Extrapolate to ``position`` with as high an order as the history allows (1 = last value)."""
        if not self.items:
            raise LookupError("no computed value to extrapolate from")
        if len(self.items) == 1:
            return self.items[-1][1].clone()
        nodes = [p for p, _ in self.items]
        w = extrapolation_weights(nodes, position)
        # accumulate in float32: half-precision features would lose the small differences that carry the trend
        out = self.items[0][1].float() * w[0]
        for wj, (_, v) in zip(w[1:], list(self.items)[1:], strict=True):
            out = out + v.float() * wj
        return out.to(self.items[-1][1].dtype)
