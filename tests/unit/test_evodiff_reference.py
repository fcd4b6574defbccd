"""EVODiff against an independent, loop-based reference of the paper's step, and its error on exact scores.

The reference below is written from the equations (arXiv:2509.26096 and the official sampler's notation), one
sample and one channel at a time with Python scalars, not from the module's tensor code. Every quantity the
step uses is a per-(sample, channel) scalar or an element-wise update, so a slice-by-slice loop is the whole
algorithm:

* lambda = log(alpha / sigma); h = e^{lambda_t} - e^{lambda_s}; DDIM: x_t = (s_t / s_s) x + s_t h m_0;
* probe: D = m_0 - r_1 m_1, r_1 = (1 - w) sqrt((s_t / s_s) / (s_s / s_prev)) + w clip(<m_0, m_1> / <m_1, m_1>),
  w = (1 - ((s_t + s_min) / (s_max + s_min))^2) / 2, r_i = clip(sigmoid(|r_1| / 4) r, r / 4, 3 r / 2) with
  r = (lambda_s - lambda_prev) / (lambda_t - lambda_s); x_probe = x_DDIM + s_t h D / (2 r_i);
* corrector at the next call m_t: D_2 = m_t - r_2 m_0 (r_2 as r_1 with <m_t, m_0> / <m_0, m_0>),
  B_pre = D / (r h), B_next = r D_2 / h, eta = sigmoid(|clip(<B_n + B_p, B_n - B_p> / |B_n - B_p|^2) / 2|) / 2,
  B = -eta D / r + r (1 - eta) D_2, zeta* = clip(<x_probe - x_DDIM - s_t h B / (2 r_i), D> / <D, D>) / (h s_t),
  zeta = sigmoid(|zeta*| - 1/2), or over more than 20 steps sigmoid(-(|zeta*| - 1/2) c) with
  c = sigmoid(clip(<m_0, d> / <d, d>) (2 - (s_t / s_s)^2)), d = (m_0 - m_1) / h; x = x_DDIM + s_t h B / (2 zeta);
* first order (DDIM) on the first step, after a step from an infinite log-SNR, and on the last step with
  ``lower_order_final``; x_t = s_t x + alpha_t m_0 from alpha_s = 0; the data prediction on the step to sigma 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from preprint.samplers.evodiff import _dot, _proj, sample_evodiff
from preprint.utils.gaussian_mixture import MixtureDenoiser, make_mixture

from .conftest import get_problem

# ------------------------------------------------------------------------------------------ the reference


def _lam(s: float, kind: str) -> float:
    a = 1.0 - s if kind == "flow" else 1.0
    if s == 0.0:
        return math.inf
    if a == 0.0:
        return -math.inf
    return math.log(a / s)


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _inner(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u * v).sum())


def _coef(u: torch.Tensor, v: torch.Tensor) -> float:
    """Least-squares coefficient of u on v, clipped to [-2, 2]; 0 for a zero v."""
    vv = _inner(v, v)
    if vv == 0.0:
        return 0.0
    return min(max(_inner(u, v) / vv, -2.0), 2.0)


def reference_evodiff(model, x: torch.Tensor, sigmas: list[float], kind: str, lower_order_final: bool):
    """The sampler, one (sample, channel) slice at a time; returns the output and the state at every call."""
    n = len(sigmas) - 1
    s_min = min(s for s in sigmas if s > 0)
    s_max = max(sigmas)
    x = x.clone()
    batch, channels = x.shape[0], x.shape[1]
    slices = [(b, c) for b in range(batch) for c in range(channels)]
    prev = None  # (sigma, data prediction) of the previous call
    pending = None  # what the corrector needs of the last probe
    states = []
    for i in range(n):
        s, t = sigmas[i], sigmas[i + 1]
        m = model(x, torch.full((batch,), s, dtype=x.dtype))
        if pending is not None:
            x = x.clone()
            for b, c in slices:
                q = pending["slices"][(b, c)]
                rl, h, st, w, base = pending["r"], pending["h"], pending["t"], pending["w"], pending["base"]
                mt = m[b, c]
                r2 = (1 - w) * base + w * _coef(mt, q["m0"])
                d2 = mt - r2 * q["m0"]
                b_pre = q["d1"] / (rl * h)
                b_next = rl * d2 / h
                eta = 0.5 * _sig(abs(0.5 * _coef(b_next + b_pre, b_next - b_pre)))
                b_theta = -eta / rl * q["d1"] + rl * (1 - eta) * d2
                resid = x[b, c] - q["xe"] - 0.5 * st * h / q["ri"] * b_theta
                zeta_star = _coef(resid, q["d1"]) / (h * st)
                if n > 20:
                    d10 = (q["m0"] - q["m1"]) / h
                    cons = _sig(_coef(q["m0"], d10) * (2 - (st / pending["s"]) ** 2))
                    zeta = _sig(-(abs(zeta_star) - 0.5) * cons)
                else:
                    zeta = _sig(abs(zeta_star) - 0.5)
                x[b, c] = q["xe"] + 0.5 * st * h / zeta * b_theta
            pending = None
        states.append(x.clone())
        last = prev
        prev = (s, m)
        if t == 0.0:
            x = m
            continue
        lam_s, lam_t = _lam(s, kind), _lam(t, kind)
        if lam_s == -math.inf:
            x = t * x + (1.0 - t) * m  # alpha_s = 0 (flow at sigma 1); alpha_t = 1 - t
            continue
        h = math.exp(lam_t) - math.exp(lam_s)
        x_ddim = (t / s) * x + t * h * m
        if last is None or not math.isfinite(_lam(last[0], kind)) or (lower_order_final and i == n - 1):
            x = x_ddim
            continue
        s_prev, m_prev = last
        rl = (lam_s - _lam(s_prev, kind)) / (lam_t - lam_s)
        tn = (t + s_min) / (s_max + s_min)
        w = 0.5 * (1 - tn * tn)
        base = math.sqrt((t / s) / (s / s_prev))
        probe = x_ddim.clone()
        pending = {"r": rl, "h": h, "t": t, "s": s, "w": w, "base": base, "slices": {}}
        for b, c in slices:
            m0, m1 = m[b, c], m_prev[b, c]
            r1 = (1 - w) * base + w * _coef(m0, m1)
            d1 = m0 - r1 * m1
            ri = min(max(_sig(0.25 * abs(r1)) * rl, 0.25 * rl), 1.5 * rl)
            probe[b, c] = x_ddim[b, c] + 0.5 * t * h / ri * d1
            pending["slices"][(b, c)] = {"m0": m0, "m1": m1, "d1": d1, "ri": ri, "xe": x_ddim[b, c]}
        x = probe
    return x, states


# ------------------------------------------------------------------------------------------ comparisons


def _irregular(n: int, lo: float, hi: float, kind: str, end_zero: bool) -> list[float]:
    """n sigmas from hi to lo with log-SNR steps alternating short and long (ratios down to ~0.2), + 0."""
    weights = [1.0 if k % 3 else 0.2 for k in range(n - 1)]
    weights = [wk * (1.0 + 0.1 * k) for k, wk in enumerate(weights)]
    total = sum(weights)
    if kind == "eps":
        l0, l1 = -math.log(hi), -math.log(lo)
    else:
        l0, l1 = math.log((1 - hi) / hi), math.log((1 - lo) / lo)
    lams = [l0]
    for wk in weights:
        lams.append(lams[-1] + (l1 - l0) * wk / total)
    out = [math.exp(-v) if kind == "eps" else 1.0 / (1.0 + math.exp(v)) for v in lams]
    return out + ([0.0] if end_zero else [])


def _model(kind: str, shape: tuple[int, ...]) -> MixtureDenoiser:
    return MixtureDenoiser(make_mixture(shape, components=4, seed=11, std_range=(0.1, 0.5)), kind=kind)


CASES = {
    # name: (kind, sigmas, lower_order_final)
    "eps-to-zero": ("eps", _irregular(9, 0.03, 14.6, "eps", True), True),
    "eps-open-end-lof": ("eps", _irregular(8, 0.2, 14.6, "eps", False), True),
    "eps-open-end-2nd-order-last": ("eps", _irregular(8, 0.2, 14.6, "eps", False), False),
    "eps-20-steps": ("eps", _irregular(20, 0.03, 14.6, "eps", True), True),
    "eps-21-steps": ("eps", _irregular(21, 0.03, 14.6, "eps", True), True),
    "eps-24-steps-open-end": ("eps", _irregular(24, 0.05, 14.6, "eps", False), True),
    "flow-from-one": ("flow", [1.0, 0.93, 0.85, 0.6, 0.55, 0.3, 0.1, 0.0], True),
    "flow-open-end": ("flow", _irregular(7, 0.08, 0.95, "flow", False), False),
    "flow-from-one-22-steps": ("flow", [1.0] + _irregular(21, 0.02, 0.97, "flow", True), True),
}


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 5)], ids=["4d", "3d"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_loop_reference_to_float64_rounding(case, shape):
    """Every state the sampler reports and its output equal the reference's to float64 rounding.

    The corrector's projections amplify rounding: a 1e-15 relative change of the start moves later states by up
    to ~7e-12 (measured), so the bound is 1e-10 of the state's scale; every coefficient change of the step is
    orders of magnitude larger."""
    kind, sigmas, lof = CASES[case]
    model = _model(kind, shape[1:])
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64) * (1.0 if kind == "flow" else sigmas[0])
    if kind == "flow" and sigmas[0] < 1.0:
        x0 = (1 - sigmas[0]) * model.mixture.sample(shape[0], g) + sigmas[0] * x0
    seen: list[torch.Tensor] = []
    got = sample_evodiff(model, x0.clone(), torch.tensor(sigmas, dtype=torch.float64), disable=True,
                         parameterisation=kind, lower_order_final=lof, callback=lambda d: seen.append(d["x"]))
    want, states = reference_evodiff(model, x0, sigmas, kind, lof)
    assert len(seen) == len(states) == len(sigmas) - 1
    for k, (a, b) in enumerate(zip(seen, states, strict=True)):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale, msg=f"state {k} of {case}")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))


def test_reference_steps_are_not_trivial():
    """The comparison above exercises the corrector and the r_i rule: the corrector moves the probe by far more
    than the tolerance, and the irregular steps reach log-SNR ratios r below 0.3 and above 3. (r_i =
    sigmoid(|r_1| / 4) r stays in [0.5, 1) r, inside its clamp [r / 4, 3 r / 2]; a clamp bound such as 1 / (4 r)
    in place of r / 4 binds at these ratios, so the comparison shows it.)"""
    kind, sigmas, lof = CASES["eps-to-zero"]
    lams = [_lam(s, kind) for s in sigmas[:-1]]
    ratios = [(lams[k] - lams[k - 1]) / (lams[k + 1] - lams[k]) for k in range(1, len(lams) - 1)]
    assert min(ratios) < 0.3 and max(ratios) > 3.0
    model = _model(kind, (3, 4, 4))
    x0 = 14.6 * torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    seen: list[torch.Tensor] = []
    sample_evodiff(model, x0.clone(), torch.tensor(sigmas[:4], dtype=torch.float64), disable=True,
                   callback=lambda d: seen.append(d["x"]))
    # the run to sigmas[3] corrects its probe at sigmas[2]; the run ending at sigmas[2] returns the probe itself
    probe = sample_evodiff(model, x0.clone(), torch.tensor(sigmas[:3], dtype=torch.float64), disable=True,
                           lower_order_final=False)
    moved = float((seen[2] - probe).abs().max())
    assert moved > 0.1, moved  # measured 1.0 (the state there is ~13)


def test_step_to_zero_returns_the_last_data_prediction_and_lower_order_final_is_ddim():
    """The step to sigma = 0 returns the model's prediction at the state it was called on (no extra call), and with
    ``lower_order_final`` a list ending above 0 ends with a plain DDIM step from the (corrected) state."""
    model = _model("eps", (3, 4, 4))
    x0 = 10.0 * torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig = torch.tensor([10.0, 4.0, 1.5, 0.6, 0.0], dtype=torch.float64)
    calls: list[torch.Tensor] = []

    def recording(x, s):
        calls.append(x.clone())
        return model(x, s)

    out = sample_evodiff(recording, x0.clone(), sig, disable=True)
    assert len(calls) == 4
    assert torch.equal(out, model(calls[-1], sig[3].expand(2)))
    calls.clear()
    states: list[torch.Tensor] = []
    end = sample_evodiff(recording, x0.clone(), sig[:4], disable=True, callback=lambda d: states.append(d["x"]))
    # the last step: DDIM from the corrected state with the prediction at the probe the model was called on
    m = model(calls[2], sig[2].expand(2))
    assert not torch.equal(calls[2], states[2])
    torch.testing.assert_close(end, 0.4 * states[2] + 0.6 * (1 / 0.6 - 1 / 1.5) * m, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------------------------ projections


def test_dot_and_projection_are_per_sample_and_channel_for_every_rank():
    """The inner product sums each (sample, channel) slice (one channel per sample for 2-D input); the projection
    is <a, b> / <b, b>, clipped to [-2, 2], and 0 for a direction whose squared norm is 0 (even by underflow)."""
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 4, 5), (2, 3, 7), (3, 6, 2, 2, 2)]:
        a = torch.randn(shape, generator=g, dtype=torch.float64)
        b = torch.randn(shape, generator=g, dtype=torch.float64)
        d = _dot(a, b)
        assert d.shape == (*shape[:2], *([1] * (len(shape) - 2)))
        for i in range(shape[0]):
            for c in range(shape[1]):
                assert float(d[i, c].flatten()[0]) == pytest.approx(_inner(a[i, c], b[i, c]), rel=1e-13)
                want = min(max(_inner(a[i, c], b[i, c]) / _inner(b[i, c], b[i, c]), -2.0), 2.0)
                assert float(_proj(a, b)[i, c].flatten()[0]) == pytest.approx(want, rel=1e-13)
    a2 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    b2 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_dot(a2, b2).flatten(), (a2 * b2).sum(-1), rtol=1e-13, atol=0)
    # clipping at both bounds, and a precomputed <b, b> is used as given
    b = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    a = torch.stack([5.0 * b[0, 0], -7.0 * b[0, 1]])[None]
    assert _proj(a, b).flatten().tolist() == [2.0, -2.0]
    assert float(_proj(0.5 * b, b, 2 * _dot(b, b)).flatten()[0]) == pytest.approx(0.25, rel=1e-13)
    tiny = torch.full((1, 1, 4), 1e-170, dtype=torch.float64)  # <tiny, tiny> underflows to exactly 0
    assert float(_dot(tiny, tiny).flatten()[0]) == 0.0
    assert float(_proj(torch.full((1, 1, 4), 1e170, dtype=torch.float64), tiny).flatten()[0]) == 0.0


def test_two_dimensional_batches_sample_like_one_channel():
    """A [B, D] batch is sampled as one channel per sample, like the same batch shaped [B, 1, D]."""
    model = _model("eps", (1, 6))

    def flat(x, s):
        return model(x[:, None], s)[:, 0]

    x0 = 8.0 * torch.randn((3, 6), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sig = torch.tensor([8.0, 3.0, 1.0, 0.3, 0.0], dtype=torch.float64)
    three = sample_evodiff(model, x0[:, None].clone(), sig, disable=True)[:, 0]
    torch.testing.assert_close(sample_evodiff(flat, x0.clone(), sig, disable=True), three)


# ------------------------------------------------------------------------------------------ exact scores


def _errors(kind: str, n: int) -> tuple[float, float]:
    from preprint.samplers.dpm_solver_pp import sample_dpmpp_multistep

    problem = get_problem(kind, schedule="uniform")
    sig = problem.sigmas(n)
    evo = sample_evodiff(problem.model, problem.x_start.clone(), sig, disable=True, parameterisation=kind)
    ddim = sample_dpmpp_multistep(problem.model, problem.x_start.clone(), sig, disable=True, order=1,
                                  parameterisation=kind)
    return problem.error(evo, sig), problem.error(ddim, sig)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_error_on_exact_scores_well_below_ddim(kind):
    """On log-SNR-uniform steps EVODiff converges at order ~1 on exact scores (measured: 0.6-1.3 per doubling,
    like the official sampler, whose blended r and r_i are not consistent to second order), but with an error
    constant well below DDIM's: measured EVODiff / DDIM 0.35 (eps) / 0.30 (flow) at 20 steps and 0.41 / 0.37 at
    40 (the corrector's long-run branch). Dropping the corrector or the probe's second-order term, or scaling
    either, moves these past the bounds; the variance heuristics (the blend of r, eta, zeta) change the error on
    exact scores little, and the reference comparison above pins them instead."""
    for n, bound, err_bound in [(20, 0.40, 0.0072 if kind == "eps" else 0.0076), (40, 0.45, 0.0046)]:
        evo, ddim = _errors(kind, n)
        assert evo / ddim < bound, (n, evo, ddim)
        assert evo < err_bound, (n, evo)
