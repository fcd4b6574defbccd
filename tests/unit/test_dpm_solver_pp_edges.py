"""DPM-Solver++ (samplers/dpm_solver_pp.py), edges: dynamic thresholding at the top of its percentile range."""

import torch

from preprint.samplers.dpm_solver_pp import dynamic_threshold


def test_percentile_one_thresholds_at_each_samples_largest_value():
    """percentile 1 (the top of (0, 1]) is accepted: s is each sample's largest |x0| (at least the floor), so the
    sample is divided by it and nothing is clipped."""
    x0 = torch.tensor([[0.5, -3.0, 2.0], [0.2, 0.4, -0.6]], dtype=torch.float64)
    out = dynamic_threshold(x0, 1.0)
    torch.testing.assert_close(out[0], x0[0] / 3.0, rtol=0, atol=1e-15)
    torch.testing.assert_close(out[1], x0[1], rtol=0, atol=0)  # largest 0.6 is under the floor 1: s = 1
