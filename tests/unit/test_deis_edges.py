"""DEIS (samplers/deis.py), edges: sampling builds no autograd graph."""

import torch

from preprint.samplers.deis import sample_deis


def test_sampling_builds_no_autograd_graph():
    """The sampler runs under no_grad: a model whose output would carry a gradient is called with autograd off and
    the result is a plain tensor (no graph kept alive across the steps)."""
    w = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    modes = []

    def model(x, sigma, **_):
        modes.append(torch.is_grad_enabled())
        return w * x / (1.0 + sigma[:, None] ** 2)

    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    out = sample_deis(model, x, torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0], dtype=torch.float64), disable=True)
    assert modes and not any(modes)
    assert not out.requires_grad
