"""EVODiff: what a run keeps alive and whether it records autograd history.

The solver is a second-order multistep rule: a step combines the newest data prediction m_0 with the one
before it, m_1 (and the corrector at the next call uses the same two). Nothing older is ever read, so a run
must not keep a third latent-sized prediction alive. A sampler is inference: it must run with autograd off
(no graph through the model's parameters or the input), like every other sampler of the pack.
"""

from __future__ import annotations

import weakref

import torch

from preprint.samplers.evodiff import sample_evodiff


def _denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear stand-in for a data prediction (a fresh tensor at every call)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return 1.3 * torch.tanh(0.8 * x / (1.0 + s)) + 0.2 * x / (1.0 + s * s)


SIGMAS = torch.tensor([12.0, 6.0, 3.0, 1.5, 0.8, 0.4, 0.2, 0.1], dtype=torch.float64)


def _x0(seed: int = 0) -> torch.Tensor:
    return 12.0 * torch.randn((2, 3, 5), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_only_the_two_newest_data_predictions_stay_alive():
    """At the report of step i the prediction of step i is current and those of steps i - 1 and i - 2 are the
    multistep window (m_0, m_1 of the coming step and its corrector); the prediction of step i - 3 or older is
    never used again and must already be freed (one latent per window slot, not one more)."""
    refs: list[weakref.ref] = []

    def model(x, sigma):
        out = _denoise(x, sigma)
        refs.append(weakref.ref(out))
        return out

    oldest_alive: list[tuple[int, int]] = []

    def report(info):
        alive = [k for k, r in enumerate(refs) if r() is not None]
        oldest_alive.append((info["i"], min(alive)))

    for lof in (True, False):
        refs.clear()
        oldest_alive.clear()
        out = sample_evodiff(model, _x0(), SIGMAS, disable=True, callback=report, lower_order_final=lof)
        assert torch.isfinite(out).all()
        assert [i for i, _ in oldest_alive] == list(range(len(SIGMAS) - 1))
        for i, oldest in oldest_alive:
            assert oldest >= i - 2, (lof, i, oldest)


def test_sampling_builds_no_autograd_graph():
    """With an input and model weights that require grad, the model is called with autograd off and the result
    carries no graph."""
    weight = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    grad_modes: list[bool] = []

    def model(x, sigma):
        grad_modes.append(torch.is_grad_enabled())
        return weight * _denoise(x, sigma)

    x0 = _x0(1).requires_grad_(True)
    out = sample_evodiff(model, x0, SIGMAS, disable=True)
    assert grad_modes == [False] * (len(SIGMAS) - 1)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.is_grad_enabled()  # restored afterwards
