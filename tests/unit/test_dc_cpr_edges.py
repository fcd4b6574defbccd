"""DC-Solver's cascade polynomial regression (samplers/dc_cpr.py), edges: the top of the documented step_degree
range is accepted and fitted exactly."""

import torch

from preprint.samplers.dc_cpr import SearchedSetting, fit_cpr, predict_ratios


def test_cpr_fits_the_highest_step_degree_six():
    """step_degree 6 (the documented top of 0 to 6) is accepted and recovers a degree-6 cascade."""
    g = torch.Generator().manual_seed(11)
    e = torch.randn((7, 3, 3), generator=g, dtype=torch.float64)
    settings = []
    for steps in (12, 16, 20):
        used = torch.arange(steps) >= 2
        for cfg in (3.0, 6.0, 9.0):
            settings.append(SearchedSetting(steps, cfg, predict_ratios(e, steps, cfg), used))
    fit = fit_cpr(settings, step_degree=6)
    assert fit.coefficients.shape == (7, 3, 3)
    torch.testing.assert_close(fit.coefficients, e, rtol=0, atol=1e-5)
