"""Optimal-steps search (samplers/optimal_steps.py): a point that no finite path reaches is never extended."""

import torch

from preprint.samplers import optimal_steps as oss


def test_an_unreachable_intermediate_point_is_no_source_for_the_next_step():
    """D(x, s) = a x + b per sigma. The teacher passes through 2^599 at sigma 4 (a = -2, b = 2^600 at sigma 8) and
    back to 0.5 at sigma 2 and 1 at sigma 0 (a = 0, b = 1 at sigma 2), so the one-step jump 16 -> 4 misses the
    teacher by about 2^599: its squared error overflows float64 and sigma 4 is unreachable in one step. The zero
    placeholder state kept there would jump 4 -> 0 exactly onto the teacher's end (D(0, 4) = 1), a made-up path
    from no real state. The only real two-step paths end through sigma 8 (cost inf: the jump 8 -> 0 follows the huge
    derivative there) or sigma 2 (finite): the search must return [0, 3, 4]."""
    big = 2.0 ** 600
    coef = {16.0: (1.0, 1.0), 8.0: (-2.0, big), 4.0: (-1.0, 1.0), 2.0: (0.0, 1.0)}

    def model(x, sigma):
        a, b = coef[float(sigma.reshape(-1)[0])]
        return a * x + b

    grid = torch.tensor([16.0, 8.0, 4.0, 2.0, 0.0], dtype=torch.float64)
    result = oss.search(model, torch.ones(1, 1, dtype=torch.float64), grid, 2)
    assert result.indices.tolist() == [0, 3, 4]
    assert torch.isfinite(result.sample_costs).all()
