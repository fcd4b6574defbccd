"""EVODiff: entropy-aware, variance-optimised multistep solver in data prediction.

Paper: Li, Chen & Zeng, "EVODiff: Entropy-aware Variance Optimized Diffusion Inference", NeurIPS 2025,
arXiv:2509.26096 (official code: ShiguiLi/EVODiff).

EVODiff reads the sampler as information transfer: a step loses the least information about the data when the
*conditional variance* of its data-prediction difference is smallest. Without any reference trajectory it
therefore replaces the plain differences of a second-order multistep rule by variance-reduced ones,
``D = m_0 - r m_1`` with ``r`` blended between the schedule's ratio ``sqrt((s_t / s_0) / (s_0 / s_1))`` and the
least-squares projection ``<m_0, m_1> / <m_1, m_1>`` (per sample and channel), and picks the step's mixing
weights by further projections (the eta* and zeta* of the paper). One model call per step, like DPM-Solver++
2M; the newest call also corrects the current state (a corrector with no extra call, as in UniPC).

The step variable is ``h = e^{lambda_t} - e^{lambda_s}`` (lambda = log(alpha / sigma)), the first-order part
is DDIM, and on EPS models and flow models alike ``sigma`` is the model's noise std.

Differences from the official sampler, because ComfyUI hands a sampler an arbitrary sigma list ending in 0:
the step to sigma = 0 returns the data prediction (the official code stops at sigma_min instead, with an
ad-hoc final blend that is not defined at sigma = 0); the normalised time of the blend weight is
``(sigma + sigma_min) / (sigma_max + sigma_min)`` with the list's own extremes, which is the official EDM
setting; steps whose log-SNR is not finite (a flow model at sigma = 1) are plain DDIM.
"""

from __future__ import annotations

import torch

from ..utils.noise_schedule import Parameterisation, alpha, check_parameterisation, half_log_snr
from .common import Evaluation, History, bind_model, check_sigmas, run_steps


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel inner product, shaped to broadcast over ``a`` ([B, C, 1, ...]; a [B, D] batch is one
    channel per sample: [B, 1])."""
    if a.ndim < 3:
        prod = (a.reshape(a.shape[0], -1) * b.reshape(b.shape[0], -1)).sum(-1)
        return prod.reshape(a.shape[0], *([1] * (a.ndim - 1)))
    prod = (a.flatten(2) * b.flatten(2)).sum(-1)
    return prod.reshape(*prod.shape, *([1] * (a.ndim - 2)))


def _proj(a: torch.Tensor, b: torch.Tensor, bb: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares coefficient of ``a`` on ``b``, clipped to [-2, 2] (the official bound)."""
    bb = _dot(b, b) if bb is None else bb
    # a zero direction has no preferred coefficient: 0 keeps the step on its plain rule
    coef = torch.where(bb > 0, _dot(a, b) / bb.clamp_min(torch.finfo(bb.dtype).tiny), torch.zeros_like(bb))
    return coef.clamp(-2.0, 2.0)


class _Pending:
    """Quantities of a second-order probe step that the next model call uses to correct the state."""

    def __init__(self, x_euler, d1_0, r_logh, r_i, h, sigma_t, sigma_ratio, w, baser, m0, m1, m0_m0, big_steps):
        self.x_euler, self.d1_0, self.r_logh, self.r_i, self.h = x_euler, d1_0, r_logh, r_i, h
        self.sigma_t, self.sigma_ratio, self.w, self.baser = sigma_t, sigma_ratio, w, baser
        self.m0, self.m1, self.m0_m0, self.big_steps = m0, m1, m0_m0, big_steps


def _correct(p: _Pending, m_t: torch.Tensor, x_probe: torch.Tensor) -> torch.Tensor:
    """Variance-optimised correction of a probe from the model output at the probe (official eta*, zeta*)."""
    r_t0 = _proj(m_t, p.m0, p.m0_m0)
    r2 = (1 - p.w) * p.baser + p.w * r_t0
    d2_0 = m_t - r2 * p.m0
    b_pre = p.d1_0 / (p.r_logh * p.h)
    b_next = p.r_logh * d2_0 / p.h
    eta = 0.5 * torch.sigmoid((0.5 * _proj(b_next + b_pre, b_next - b_pre)).abs())
    b_theta = (-eta / p.r_logh) * p.d1_0 + p.r_logh * (1 - eta) * d2_0
    resid = x_probe - p.x_euler - 0.5 * p.sigma_t * p.h / p.r_i * b_theta
    zeta_star = _proj(resid, p.d1_0) / (p.h * p.sigma_t)
    shifted = zeta_star.abs() - 0.5
    if p.big_steps:
        # long runs: trust the correction less where m_0 is consistent with the finite-difference slope
        d10 = (p.m0 - p.m1) / p.h
        consistency = torch.sigmoid(_proj(p.m0, d10) * (2 - p.sigma_ratio**2))
        zeta = torch.sigmoid(-shifted * consistency)
    else:
        zeta = torch.sigmoid(shifted)
    return p.x_euler + 0.5 * p.sigma_t * p.h / zeta * b_theta


class EVODiffStep:
    """The solver as a step of :func:`run_steps`; :meth:`correct` applies the pending correction of a probe."""

    def __init__(self, kind: Parameterisation, sigmas: torch.Tensor, lower_order_final: bool) -> None:
        self.kind, self.lower_order_final = kind, lower_order_final
        self.total_steps = len(sigmas) - 1
        positive = sigmas[sigmas > 0]
        self.t_lo = float(positive.min()) if len(positive) else 0.0
        self.t_hi = float(sigmas.max())
        self.big_steps = self.total_steps > 20
        self.denoised = History(2)
        self.sigmas = History(2)
        self.pending: _Pending | None = None

    def correct(self, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        if self.pending is None:
            return x
        x = _correct(self.pending, denoised, x)
        self.pending = None
        return x

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        kind, x, i, sigma, sigma_next, denoised = self.kind, ev.x, ev.i, ev.sigma, ev.sigma_next, ev.denoised
        m_hist = self.denoised.push(denoised)
        s_hist = self.sigmas.push(sigma)
        if sigma_next == 0:
            return denoised
        lam_s, lam_t = half_log_snr(sigma, kind), half_log_snr(sigma_next, kind)
        ratio = sigma_next / sigma
        if not torch.isfinite(lam_s):
            # alpha = 0 (flow at sigma = 1): DDIM is x_t = sigma_t x + alpha_t m_0
            return ratio * x + alpha(sigma_next, kind) * denoised
        h = lam_t.exp() - lam_s.exp()
        x_euler = ratio * x + sigma_next * h * denoised
        lam_prev = half_log_snr(s_hist[0], kind) if len(s_hist) == 2 else None
        last_step = self.lower_order_final and i == self.total_steps - 1
        if lam_prev is None or not torch.isfinite(lam_prev) or last_step:
            return x_euler
        m0, m1 = m_hist[-1], m_hist[-2]
        m0_m0 = _dot(m0, m0)
        # r_i of the paper: ratio of the previous to the current step in log-SNR (DPM-Solver++'s r0)
        r_logh = (lam_s - lam_prev) / (lam_t - lam_s)
        t_norm = (float(sigma_next) + self.t_lo) / (self.t_hi + self.t_lo)
        w = 0.5 * (1 - t_norm**2)
        baser = torch.sqrt(ratio / (sigma / s_hist[0]))
        r1 = (1 - w) * baser + w * _proj(m0, m1)
        d1_0 = m0 - r1 * m1  # variance-reduced difference (the paper's balanced difference)
        r_i = (torch.sigmoid(0.25 * r1.abs()) * r_logh).clamp(0.25 * r_logh, 1.5 * r_logh)
        x = x_euler + 0.5 * sigma_next * h / r_i * d1_0
        if i + 1 < self.total_steps:  # the next model call, at this probe, corrects it
            self.pending = _Pending(x_euler, d1_0, r_logh, r_i, h, sigma_next, ratio, w, baser, m0, m1, m0_m0,
                                    self.big_steps)
        return x


@torch.no_grad()
def sample_evodiff(model, x, sigmas, extra_args=None, callback=None, disable=None,
                   parameterisation: Parameterisation = "eps", lower_order_final: bool = True, **_ignored):
    """EVODiff second-order variance-optimised multistep solver (Li et al., arXiv:2509.26096)."""
    kind = check_parameterisation(parameterisation)
    sigmas = check_sigmas(sigmas, "EVODiff")
    step = EVODiffStep(kind, sigmas, lower_order_final)
    return run_steps(bind_model(model, extra_args), x, sigmas, step, callback, disable, correct=step.correct)
