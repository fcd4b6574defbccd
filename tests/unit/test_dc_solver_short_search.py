"""DC-Solver's ratio search (samplers/dc_solver.py) on a list too short to compensate: one pass, one warning."""

import logging

import torch

from preprint.samplers.dc_solver import search_ratios


def test_a_list_with_no_compensable_step_is_scored_once_and_left_at_one(caplog):
    """Two steps: a ratio acts from step index 2 on, so nothing can be fitted. The search scores plain UniPC once
    (one model call per step), warns once and returns ratios of 1, however many iterations were asked for."""
    calls = []

    def model(x, sigma):
        calls.append(1)
        return x / (1.0 + sigma.reshape(-1, 1) ** 2)

    sig = torch.tensor([8.0, 2.0, 0.0], dtype=torch.float64)
    noise = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 8.0
    with caplog.at_level(logging.WARNING):
        result = search_ratios(model, noise, sig, torch.zeros_like(noise), iterations=4)
    assert len(calls) == 2
    assert torch.equal(result.ratios, torch.ones(2, dtype=torch.float64)) and len(result.losses) == 1
    assert sum("can be compensated" in r.getMessage() for r in caplog.records) == 1
