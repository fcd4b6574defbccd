"""``learned_guidance`` with one sigma per image (ComfyUI passes a ``[B]`` sigma): each image's scale is read from
its own noise predictions at its own sigma, and the options after ``sigma`` must be named."""

from __future__ import annotations

import pytest
import torch

from preprint.guidance.annealing import GuidanceScheduler, GuidedPrediction, SchedulerConfig, learned_guidance


def _norm_scheduler(bias: float) -> GuidanceScheduler:
    """``w = ||eps_u - eps_c|| / 5 + bias``: one hidden unit passes the direction's (non-negative) norm feature."""
    cfg = SchedulerConfig(hidden_size=3, n_layers=0, w_bias=bias, w_scale=1.0)
    w0 = torch.zeros(3, cfg.input_size)
    w0[0, cfg.t_embed_dim] = 1.0  # the first delta feature: ||eps_u - eps_c|| / delta_embed_normalization
    w1 = torch.zeros(1, 3)
    w1[0, 0] = 1.0
    return GuidanceScheduler(cfg, {"combined_head.0.weight": w0, "combined_head.0.bias": torch.zeros(3),
                                   "combined_head.2.weight": w1, "combined_head.2.bias": torch.zeros(1)})


def _prediction(scale: float) -> tuple[torch.Tensor, GuidedPrediction]:
    g = torch.Generator().manual_seed(3)
    x, c, u = (torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    c[1] *= 3.0  # the two images have clearly different guidance directions
    return x, GuidedPrediction(u + (c - u) * scale, c, u, scale)


@pytest.mark.parametrize("kind,sigmas", [("eps", (1.0, 3.0)), ("flow", (0.3, 0.8))])
def test_each_image_gets_the_scale_of_its_own_sigma(kind, sigmas):
    """With sigma ``[s0, s1]`` image i's scale is ``||alpha_i (D_c - D_u)_i|| / s_i / 5 + bias`` (the norm of its own
    eps_u - eps_c), and the result equals guiding each image alone with its scalar sigma."""
    scale, bias = 2.0, 1.5
    sched = _norm_scheduler(bias)
    x, p = _prediction(scale)
    sigma = torch.tensor(sigmas, dtype=torch.float64)
    out = learned_guidance(p, x, sigma, scheduler=sched, guidance_lambda=0.4, timestep=500.0, parameterisation=kind)
    direction = p.cond - p.uncond
    for i, s in enumerate(sigmas):
        a = 1.0 if kind == "eps" else 1.0 - s
        w = float((a * direction[i]).norm()) / s / 5.0 + bias
        assert abs(w - scale) > 0.5  # the learned scale really moves the result
        want = p.denoised[i] + direction[i] * (w - scale)
        torch.testing.assert_close(out[i], want, rtol=0, atol=1e-5)  # the scheduler runs in float32
        alone = learned_guidance(GuidedPrediction(*(t[i:i + 1] for t in p[:3]), scale), x[i:i + 1],
                                 torch.tensor(s, dtype=torch.float64), scheduler=sched, guidance_lambda=0.4,
                                 timestep=500.0, parameterisation=kind)
        torch.testing.assert_close(out[i:i + 1], alone, rtol=0, atol=1e-5)  # another image's sigma: off by > 0.5


def test_options_after_sigma_are_keyword_only():
    """``guidance_lambda`` and ``timestep`` are both plain floats: a positional call that could swap them is refused."""
    x, p = _prediction(2.0)
    sigma = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"takes 3 positional arguments"):
        learned_guidance(p, x, sigma, _norm_scheduler(1.0), 0.4, 500.0, "eps")  # type: ignore[misc]
