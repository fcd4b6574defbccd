"""DC-Solver's sampler (samplers/dc_solver.py), edges: the order cap it shares with ComfyUI's uni_pc, a one-sigma
list, and no progress bar unless asked (the ratio search calls the sampler many times)."""

import pytest
import torch

from preprint.samplers.dc_solver import dc_unipc


def _wiener(x, sigma):
    """The exact denoiser of unit-variance Gaussian data under EPS noise: E[x0 | x] = x / (1 + sigma^2)."""
    return x / (1.0 + sigma[:, None] ** 2)


def _x(seed=0):
    return torch.randn(3, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10.0


@pytest.mark.parametrize("sigmas,order,capped", [
    ([10.0, 1.0, 0.0], 2, 1),  # two steps: at most order 1
    ([10.0, 2.0, 0.3, 0.0], 3, 2),  # three steps: at most order 2
])
def test_order_is_capped_at_steps_minus_one_as_in_comfyui_uni_pc(sigmas, order, capped):
    sig = torch.tensor(sigmas, dtype=torch.float64)
    x = _x()
    # without lower_order_final the last step would use the full order; the cap keeps it at steps - 1
    got = dc_unipc(_wiener, x, sig, order=order, lower_order_final=False)
    want = dc_unipc(_wiener, x, sig, order=capped, lower_order_final=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind,sigma", [("eps", 5.0), ("flow", 0.5)])
def test_a_single_sigma_returns_the_input_without_calling_the_model(kind, sigma):
    calls = []

    def model(x, s):
        calls.append(s)
        return x * 0.0

    x = _x(1)
    out = dc_unipc(model, x, torch.tensor([sigma], dtype=torch.float64), parameterisation=kind)
    assert torch.equal(out, x) and calls == []


def test_no_progress_bar_unless_asked(capsys):
    sig = torch.tensor([10.0, 2.0, 0.3, 0.0], dtype=torch.float64)
    dc_unipc(_wiener, _x(), sig)
    assert capsys.readouterr().err == ""
    dc_unipc(_wiener, _x(), sig, disable=False)
    assert "/3 [" in capsys.readouterr().err  # the bar the default leaves out


def test_the_k_sampler_function_defaults_to_order_two_as_the_node():
    from preprint.samplers.dc_solver import sample_dc_solver

    sig = torch.tensor([10.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    x = _x(2)
    got = sample_dc_solver(_wiener, x, sig)
    assert torch.equal(got, dc_unipc(_wiener, x, sig, order=2))
    assert not torch.equal(got, dc_unipc(_wiener, x, sig, order=3))
