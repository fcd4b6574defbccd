"""DPM-Solver-v3: a multistep ODE solver whose coefficients come from empirical model statistics (EMS).

Paper: Zheng, Lu, Chen, Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model Statistics",
arXiv:2310.13268 (NeurIPS 2023). Written from the paper and checked against the conventions of the official code
(thu-ml/DPM-Solver-v3, MIT); no code is copied.

Everything here is in ComfyUI's sigma language, ``x = alpha(sigma) x0 + sigma eps`` with ``alpha = 1`` (EPS models)
or ``alpha = 1 - sigma`` (flow models), stepping in ``lambda = log(alpha / sigma)`` and using the *data*
prediction ``D(x, sigma)`` that ComfyUI's denoiser returns. The paper writes the noise prediction; the translation
is ``sigma eps = x - alpha D``, so with statistics ``l, s, b`` (tensors of the latent's shape on a grid uniform in
lambda) the paper's quantities are

* ``N = sigma eps - l x = (1 - l) x - alpha D``                                  (Eq. 5, the linear split)
* ``f = N / alpha = (1 - l) x / alpha - D``                                       (Eq. 6)
* ``g(lambda) = e^{-S(lambda)} f - int_{lambda_s}^{lambda} e^{-S(r)} b(r) dr``,   ``S = int_{lambda_s} s``  (Eq. 7)
* ``x_t = alpha_t e^{-L_t} [x_s / alpha_s - int_{lambda_s}^{lambda_t} e^{L(r)+S(r)} (g(r) + B(r)) dr]``  (Eq. 8)

with ``L = int_{lambda_s} l`` and ``B(r) = int_{lambda_s}^{r} e^{-S} b``. The statistics are chosen (Sec. 3.2) as

* ``l = argmin E ||grad_x N||_F^2`` (Eq. 10): fitted by least squares on Jacobian-vector products ``sigma J_eps v``
  against ``v`` with Rademacher ``v``, i.e. ``l = E[v * (v - alpha J_D v)] / E[v * v]`` per element;
* ``s, b = argmin E ||f' - s f - b||^2`` (Eq. 11), ``f'`` the total lambda-derivative of ``f`` along the ODE
  trajectory (a JVP with tangent ``(dx/dlambda, 1)``): an ordinary per-element linear regression of ``f'`` on ``f``.

With ``l = 1, s = b = 0``, ``f = -D`` and ``g = -D`` and Eq. 8 is exactly DPM-Solver++: the integrals below are
evaluated segment by segment with the exponent linear on each segment and the polynomial weights integrated exactly,
so the reduction holds to float rounding, not only to quadrature error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..utils.noise_schedule import Parameterisation, alpha, check_parameterisation, half_log_snr
from . import dpm_solver_pp
from .common import bind_model, check_sigmas, progress, step_callback

SECOND_ORDER_RULES: tuple[str, ...] = ("taylor", "dpmsolver")


# --------------------------------------------------------------------------------------------------- statistics

@dataclass
class Statistics:
    """EMS on a lambda grid: ``lambdas`` ascending ``[G + 1]`` (float64), ``l, s, b`` each ``[G + 1, *shape]``."""

    lambdas: torch.Tensor
    l: torch.Tensor
    s: torch.Tensor
    b: torch.Tensor

    def __post_init__(self) -> None:
        lam = self.lambdas
        if lam.ndim != 1 or len(lam) < 2 or not bool((lam[1:] > lam[:-1]).all()) or not torch.isfinite(lam).all():
            raise ValueError("DPM-Solver-v3 statistics need a finite, strictly increasing lambda grid of >= 2 points")
        for name in ("l", "s", "b"):
            t = getattr(self, name)
            if t.shape[0] != len(lam) or t.shape != self.l.shape:
                raise ValueError(f"DPM-Solver-v3 statistics: {name} has shape {tuple(t.shape)}, expected "
                                 f"({len(lam)}, *latent shape) like l {tuple(self.l.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"DPM-Solver-v3 statistics: {name} holds NaN or infinity; compute them again")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    @classmethod
    def degenerate(cls, shape: tuple[int, ...], lam_min: float = -10.0, lam_max: float = 10.0,
                   points: int = 2) -> Statistics:
        """``l = 1, s = b = 0``: the statistics under which DPM-Solver-v3 is DPM-Solver++."""
        lam = torch.linspace(lam_min, lam_max, points, dtype=torch.float64)
        one = torch.ones((points, *shape))
        return cls(lam, one, torch.zeros_like(one), torch.zeros_like(one))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lambdas": self.lambdas, "l": self.l, "s": self.s, "b": self.b}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Statistics:
        missing = {"lambdas", "l", "s", "b"} - set(tensors)
        if missing:
            raise ValueError(f"DPM-Solver-v3 statistics file lacks {sorted(missing)}; compute them again")
        return cls(tensors["lambdas"].double(), tensors["l"].float(), tensors["s"].float(), tensors["b"].float())

    def at(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``l, s, b`` linearly interpolated at the lambdas ``lam`` ([M], float64); held constant beyond the grid."""
        grid = self.lambdas
        lam = lam.clamp(float(grid[0]), float(grid[-1]))
        hi = torch.searchsorted(grid, lam).clamp(1, len(grid) - 1)
        lo = hi - 1
        w = ((lam - grid[lo]) / (grid[hi] - grid[lo])).reshape(-1, *([1] * len(self.shape)))

        def interp(t: torch.Tensor) -> torch.Tensor:
            t = t.double()
            return t[lo] + w * (t[hi] - t[lo])

        return interp(self.l), interp(self.s), interp(self.b)


# ------------------------------------------------------------------------------------------- exact quadrature

def _psi(z: torch.Tensor, m_max: int) -> list[torch.Tensor]:
    """``psi_m(z) = int_0^1 e^{z tau} tau^m dtau`` for m = 0..m_max, stable near z = 0 (series) and away (recursion)."""
    small = z.abs() < 0.5
    zs = torch.where(small, z, torch.zeros_like(z))
    zb = torch.where(small, torch.ones_like(z), z)
    ez = torch.exp(zb)
    out, prev = [], None
    for m in range(m_max + 1):
        # series: sum_k z^k / (k! (m + k + 1)); 25 terms reach 1e-30 for |z| < 0.5
        term, series = torch.ones_like(zs), torch.zeros_like(zs)
        for k in range(25):
            series = series + term / (m + k + 1)
            term = term * zs / (k + 1)
        rec = torch.expm1(zb) / zb if m == 0 else (ez - m * prev) / zb
        prev = rec
        out.append(torch.where(small, series, rec))
    return out


def _segment_integrals(nodes: torch.Tensor, a: torch.Tensor, i0: int, i1: int, lam_s: float,
                       powers: int, extra: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``A_n = int e^{a(r)} (r - lam_s)^n / n! dr`` for n < ``powers`` and ``int e^{a} extra`` over nodes[i0..i1].

    ``a`` is taken linear on each segment (exact for ``l + s`` piecewise constant, in particular for the degenerate
    statistics), the polynomial weights are integrated exactly against it, ``extra`` is taken linear per segment.
    """
    shape = a.shape[1:]
    acc = [torch.zeros(shape, dtype=torch.float64) for _ in range(powers)]
    acc_extra = torch.zeros(shape, dtype=torch.float64) if extra is not None else None
    for j in range(i0, i1):
        r0, delta = float(nodes[j]) - lam_s, float(nodes[j + 1] - nodes[j])
        z = a[j + 1] - a[j]
        scale = delta * torch.exp(a[j])
        psi = _psi(z, max(powers - 1, 1))
        for n in range(powers):
            # (r0 + tau delta)^n / n! = sum_m C(n, m) r0^(n-m) delta^m tau^m / n!
            poly = sum(math.comb(n, m) * r0 ** (n - m) * delta ** m * psi[m] for m in range(n + 1))
            acc[n] = acc[n] + scale * poly / math.factorial(n)
        if extra is not None:
            acc_extra = acc_extra + scale * (extra[j] * psi[0] + (extra[j + 1] - extra[j]) * psi[1])
    return acc, acc_extra


def _cumtrapz(values: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    d = (nodes[1:] - nodes[:-1]).reshape(-1, *([1] * (values.ndim - 1)))
    steps = 0.5 * d * (values[1:] + values[:-1])
    return torch.cat([torch.zeros_like(values[:1]), torch.cumsum(steps, 0)])


def _derivative_weights(lams: list[float], pseudo: bool) -> list[list[float]]:
    """Weights ``W[n-1][i]`` with ``g^(n)(lam_0) ~= sum_i W[n-1][i] g_i`` from points ``lams[0..k-1]``.

    Non-pseudo: the Taylor derivatives at ``lams[0]`` of the interpolating polynomial (solve the Vandermonde system
    of ``(lam_i - lam_0)^j``). Pseudo (the paper's pseudo-order, Sec. 3.3): Newton divided differences in the given
    point order, ``n!`` times the n-th difference, which uses only lower-order information per term.
    """
    k = len(lams)
    n = k - 1
    if n == 0:
        return []
    if pseudo:
        # divided differences as linear maps of g: D[i][j] is a weight vector over the points
        table = [[[1.0 if p == j else 0.0 for p in range(k)] for j in range(k)]]
        for i in range(1, n + 1):
            row = []
            for j in range(n - i + 1):
                denom = lams[j] - lams[i + j]
                row.append([(a - b) / denom for a, b in zip(table[i - 1][j], table[i - 1][j + 1], strict=True)])
            table.append(row)
        return [[math.factorial(i) * w for w in table[i][0]] for i in range(1, n + 1)]
    vander = torch.tensor([[(lams[i] - lams[0]) ** j for j in range(1, n + 1)] for i in range(1, k)],
                          dtype=torch.float64)
    inv = torch.linalg.inv(vander)  # coefficient j of the polynomial from (g_i - g_0)
    out = []
    for j in range(n):
        row = [0.0] * k
        for i in range(1, k):
            row[i] = math.factorial(j + 1) * float(inv[j, i - 1])
            row[0] -= row[i]
        out.append(row)
    return out


@dataclass
class StepWeights:
    """``x_t = wx[i] * x_i + wd[i] * D_i (summed over points) + const``; per-element tensors, float64 on the CPU."""

    wx: list[torch.Tensor]
    wd: list[torch.Tensor]
    const: torch.Tensor


def step_weights(stats: Statistics, lams: list[float], lam_t: float, kind: Parameterisation, pseudo: bool = False,
                 second_order: str = "taylor") -> StepWeights:
    """Weights of the DPM-Solver-v3 multistep update from the points ``lams`` (base ``lams[0]`` first, then the
    points the derivatives use, in that order) to ``lam_t`` (Eq. 8 with Taylor terms of ``g``, Eq. 12).

    ``second_order="taylor"`` integrates the Taylor polynomial of ``g`` exactly, as the official v3 code does.
    ``"dpmsolver"`` uses the weights of the official DPM-Solver++ multistep instead: at order 2 ``A_1`` becomes
    ``(h / 2) A_0`` (Algorithm 2, the 2M of ComfyUI and of this pack), at order 3 the second-derivative weight is
    halved (its 3M). Under the degenerate statistics each rule is exactly the DPM-Solver++ of that form.
    """
    if second_order not in SECOND_ORDER_RULES:
        raise ValueError(f"second_order must be one of {SECOND_ORDER_RULES}, got {second_order!r}")
    order = len(lams)
    lam_s = lams[0]
    pts = torch.tensor([*lams, lam_t], dtype=torch.float64)
    grid = stats.lambdas
    inside = grid[(grid > pts.min()) & (grid < pts.max())]
    nodes = torch.unique(torch.cat([pts, inside]))  # sorted
    l_n, s_n, b_n = stats.at(nodes)
    idx = {v: int(torch.searchsorted(nodes, torch.tensor(v, dtype=torch.float64))) for v in [*lams, lam_t]}
    i_s, i_t = idx[lam_s], idx[lam_t]
    big_l = _cumtrapz(l_n, nodes)
    big_l = big_l - big_l[i_s]
    big_s = _cumtrapz(s_n, nodes)
    big_s = big_s - big_s[i_s]
    has_b = bool((b_n != 0).any())
    big_b = _cumtrapz(torch.exp(-big_s) * b_n, nodes) if has_b else None
    if big_b is not None:
        big_b = big_b - big_b[i_s]
    a = big_l + big_s
    acc, a_b = _segment_integrals(nodes, a, i_s, i_t, lam_s, order, big_b)
    if second_order == "dpmsolver" and order == 2:
        acc[1] = 0.5 * (lam_t - lam_s) * acc[0]
    elif second_order == "dpmsolver" and order == 3:
        acc[2] = 0.5 * acc[2]
    derivs = _derivative_weights(lams, pseudo)
    lam_tensor = torch.tensor([lam_t], dtype=torch.float64)
    a_t = float(alpha(_sigma_of(lam_tensor, kind), kind))
    e_t = torch.exp(-big_l[i_t])
    wx, wd = [], []
    const = torch.zeros(stats.shape, dtype=torch.float64)
    for i, lam_i in enumerate(lams):
        gamma = (acc[0] if i == 0 else 0.0) + sum(acc[n] * derivs[n - 1][i] for n in range(1, order))
        j = idx[lam_i]
        a_i = float(alpha(_sigma_of(torch.tensor([lam_i], dtype=torch.float64), kind), kind))
        coeff = a_t * e_t * gamma * torch.exp(-big_s[j])  # weight of -f_i (Eq. 7 and 8)
        wx.append(-coeff * (1.0 - l_n[j]) / a_i + (a_t / a_i * e_t if i == 0 else 0.0))
        wd.append(coeff)
        if big_b is not None:
            const = const + a_t * e_t * gamma * big_b[j]
    if a_b is not None:
        const = const - a_t * e_t * a_b
    return StepWeights(wx, wd, const)


def _sigma_of(lam: torch.Tensor, kind: Parameterisation) -> torch.Tensor:
    return torch.sigmoid(-lam) if kind == "flow" else torch.exp(-lam)


# ---------------------------------------------------------------------------------------------------- solver

def _apply(w: StepWeights, xs: list[torch.Tensor], ds: list[torch.Tensor]) -> torch.Tensor:
    """The weighted sum in float64 where the device has it: large e^{S} weights cancel between the terms."""
    ref = xs[0]
    wide = torch.float32 if ref.device.type == "mps" else torch.float64

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=ref.device, dtype=wide)

    out = cast(w.const).expand_as(ref).clone()
    for wx, wd, x, d in zip(w.wx, w.wd, xs, ds, strict=True):
        out = out + cast(wx) * x.to(wide) + cast(wd) * d.to(wide)
    return out.to(ref.dtype)


@torch.no_grad()
def sample_dpm_solver_v3(model, x, sigmas, extra_args=None, callback=None, disable=None,
                         statistics: Statistics | None = None, order: int = 2, corrector: bool = True,
                         lower_order_final: bool = True, parameterisation: Parameterisation = "eps",
                         predictor_pseudo: bool = False, corrector_pseudo: bool = True,
                         second_order: str = "taylor"):
    """DPM-Solver-v3 multistep with the pseudo-corrector (Zheng et al., arXiv:2310.13268).

    ``statistics=None`` uses the degenerate EMS (l = 1, s = b = 0): with ``corrector=False`` that is DPM-Solver++
    multistep of the same order (order 2 in the Taylor form unless ``second_order="dpmsolver"``). The corrector
    (Sec. 3.3, UniC-style) reuses the newest model output, so every step costs one model call. Steps whose lambda is
    infinite (a flow model at sigma = 1, or sigma = 0) are the DPM-Solver++ first-order step / the data prediction.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver-v3 order must be 1, 2 or 3, got {order}")
    kind = check_parameterisation(parameterisation)
    sigmas = check_sigmas(sigmas, "DPM-Solver-v3")
    if statistics is None:
        statistics = Statistics.degenerate(tuple(x.shape[1:]))
    if tuple(x.shape[1:]) != statistics.shape:
        raise ValueError(f"DPM-Solver-v3: the statistics were computed for latents of shape {statistics.shape}, "
                         f"this run's latent is {tuple(x.shape[1:])}; compute statistics for this size")
    denoise = bind_model(model, extra_args)
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    xs: list[torch.Tensor] = []
    ds: list[torch.Tensor] = []
    lams: list[float] = []
    last_order = 0  # the order of the predictor step that produced the newest state
    for i in progress(total, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, sigma * s_in)
        lam = float(half_log_snr(sigma.double().reshape(1), kind))
        xs, ds, lams = (xs + [x])[-4:], (ds + [d])[-4:], (lams + [lam])[-4:]
        finite = dpm_solver_pp.finite_tail([torch.tensor(v) for v in lams])
        c_order = min(last_order + (1 if corrector_pseudo else 0), finite)
        if corrector and c_order > 1:
            # pseudo-corrector: redo the last step from x_s with the new output at t among the points
            pick = [-2, -1, *range(-3, -c_order - 1, -1)]
            w = step_weights(statistics, [lams[p] for p in pick], lams[-1], kind, corrector_pseudo, second_order)
            x_new = _apply(w, [xs[p] for p in pick], [ds[p] for p in pick])
            # keep N = (1 - l) x - alpha D fixed (the model is not called again): D moves with x
            l_t = statistics.at(torch.tensor([lam], dtype=torch.float64))[0][0].to(x.device, x.dtype)
            a_t = alpha(sigma, kind).to(x.dtype)
            ds[-1] = d = d + (1.0 - l_t) * (x_new - x) / a_t
            xs[-1] = x = x_new
        step_callback(callback, x, i, sigma, d)
        k = dpm_solver_pp.effective_order(i, total, order, finite, lower_order_final)
        if sigma_next == 0:
            x = d
        elif not math.isfinite(lam):
            # lambda_s = -inf (flow at sigma = 1): only the first-order step exists, and it is the same for any EMS
            lam_next = half_log_snr(sigma_next, kind)
            x = dpm_solver_pp._first_order(x, d, sigma, half_log_snr(sigma, kind), sigma_next, lam_next, kind)
            k = 1
        else:
            lam_next = float(half_log_snr(sigma_next.double().reshape(1), kind))
            pick = list(range(-1, -k - 1, -1))
            w = step_weights(statistics, [lams[p] for p in pick], lam_next, kind, predictor_pseudo, second_order)
            x = _apply(w, [xs[p] for p in pick], [ds[p] for p in pick])
        last_order = k
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"DPM-Solver-v3: step {i + 1} produced NaN or infinity; the statistics do not suit this "
                             "schedule (compute them with more samples), or sample without them")
    return x


# ------------------------------------------------------------------------------------------ computing the EMS

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
JVP_MODES: tuple[str, ...] = ("forward", "finite_difference")
S_LIMIT = 10.0  # bound on the fitted s (measured max |s| on the CFG 7.5 mixture: 11, on a few elements)


def timestep_is_differentiable(timestep: Callable[[torch.Tensor], torch.Tensor], sigma: torch.Tensor) -> bool:
    """Whether forward-mode AD sees a derivative of a model's sigma -> timestep map (ComfyUI's ``model_sampling
    .timestep``). Discrete-time models (SD1.x, SDXL: the nearest of 1000 training timesteps, an argmin) give none:
    forward-mode JVPs through them silently drop the derivative through the noise level."""
    with torch.inference_mode(False), torch.no_grad():
        try:
            _, tangent = torch.func.jvp(timestep, (sigma.detach().clone(),), (torch.ones_like(sigma),))
        except RuntimeError:
            return False
    return tangent.is_floating_point() and bool((tangent != 0).any())


def _jvp(denoise: Denoise, x: torch.Tensor, sigma: torch.Tensor, tx: torch.Tensor, tsigma: torch.Tensor,
         mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D(x, sigma), d/de D(x + e tx, sigma + e tsigma) at e = 0)``.

    ``forward``: forward-mode AD (``torch.func.jvp``; PyTorch's fused attention kernels have no forward derivative,
    so attention runs on the math kernel here, and group / layer norms run as Python decompositions: measured
    ~3 s per call of a tiny SD1.5 UNet on this CPU, a fixed per-call overhead, so larger chunks amortise it). It runs
    under ``no_grad``: forward-mode AD does not need grad mode, and with it on, those decompositions would save the
    weights for a backward pass, which ComfyUI's weights, loaded in inference mode, refuse.
    ``finite_difference``: a central difference with step 0.02 along the tangent (two plain calls, batched as one),
    for hosts whose attention kernels (xformers, sage) forward AD cannot enter; callers scale tangents to the size
    the state varies on (sigma), where a 0.02 step is both inside the linear regime and above half-precision noise.
    """
    if mode == "forward":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.inference_mode(False), torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            prim, tan = torch.func.jvp(lambda a, b: denoise(a, b), (x.clone(), sigma.clone()),
                                       (tx.clone(), tsigma.clone()))
        return prim.detach(), tan.detach()
    if mode != "finite_difference":
        raise ValueError(f"jvp mode must be one of {JVP_MODES}, got {mode!r}")
    eps = 0.02
    both = denoise(torch.cat([x + eps * tx, x - eps * tx]), torch.cat([sigma + eps * tsigma, sigma - eps * tsigma]))
    plus, minus = both.chunk(2)
    return denoise(x, sigma), (plus - minus) / (2 * eps)


class _Moments:
    """Per-element sums over samples at one grid point (float64, CPU): what l, s and b are solved from."""

    NAMES = ("vjv", "vv", "u", "d", "dd_", "uu", "ud", "dd", "u_dd_", "d_dd_")

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.n = 0
        self.sums = {k: torch.zeros(shape, dtype=torch.float64) for k in self.NAMES}

    def add(self, v, sjv, u, d, dd_) -> None:
        v, sjv, u, d, dd_ = (t.detach().to("cpu", torch.float64) for t in (v, sjv, u, d, dd_))
        self.n += u.shape[0]
        for key, val in (("vjv", v * sjv), ("vv", v * v), ("u", u), ("d", d), ("dd_", dd_), ("uu", u * u),
                         ("ud", u * d), ("dd", d * d), ("u_dd_", u * dd_), ("d_dd_", d * dd_)):
            self.sums[key] += val.sum(0)

    def solve_l(self) -> torch.Tensor:
        """Eq. 10 as least squares of ``sigma J_eps v`` on ``v``."""
        return self.sums["vjv"] / self.sums["vv"]

    def s_b(self, l: torch.Tensor, dl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 11: regress ``f' = -l' u + (1 - l)(D - u) - D'`` on ``f = (1 - l) u - D`` (``u = x / alpha``)."""
        m = {k: v / self.n for k, v in self.sums.items()}
        var_u, var_d = m["uu"] - m["u"] ** 2, m["dd"] - m["d"] ** 2
        cov_ud = m["ud"] - m["u"] * m["d"]
        cov_u_dd_ = m["u_dd_"] - m["u"] * m["dd_"]
        cov_d_dd_ = m["d_dd_"] - m["d"] * m["dd_"]
        q = 1.0 - l
        c1 = -dl - q  # coefficient of u in f'
        mean_f = q * m["u"] - m["d"]
        mean_fp = c1 * m["u"] + q * m["d"] - m["dd_"]
        var_f = q * q * var_u - 2 * q * cov_ud + var_d
        cov = (c1 * q * var_u - c1 * cov_ud + q * q * cov_ud - q * var_d - q * cov_u_dd_ + cov_d_dd_)
        # f equal on every sample (variance at rounding level against its terms' size): no slope to fit, s = 0
        tiny = 1e-9 * (q * q * m["uu"] + m["dd"]) + 1e-300
        s = torch.where(var_f > tiny, cov / var_f.clamp_min(1e-300), torch.zeros_like(cov))
        # |s| beyond S_LIMIT comes from elements whose f hardly varies over the samples; e^{S} weights of that size
        # cancel catastrophically in the update, so the slope is bounded and b refitted to it
        s = s.clamp(-S_LIMIT, S_LIMIT)
        return s, mean_fp - s * mean_f


def compute_statistics(denoise: Denoise, shape: tuple[int, ...], kind: Parameterisation, lam_min: float,
                       lam_max: float, grid_points: int = 60, samples: int = 32, chunk: int = 8,
                       substeps: int = 1, seed: int = 0, jvp: str = "forward", device=None,
                       dtype: torch.dtype = torch.float32, callback: Callable[[int, int], None] | None = None
                       ) -> Statistics:
    """EMS of ``denoise`` on ``grid_points + 1`` lambdas uniform in [lam_min, lam_max] (Sec. 3.2, App. C).

    ``samples`` states are carried from ``lam_min`` to ``lam_max`` along their probability-flow ODE trajectories by
    DPM-Solver++(2M) with ``substeps`` steps per grid interval; the first sub-step reuses the prediction the
    statistics already computed, so ``substeps = 1`` costs no extra call. At each grid point, in chunks of
    ``chunk`` samples (memory is one chunk's JVP), two JVPs: ``(v, 0)`` for l and ``(dx/dlambda, 1)`` for the
    derivative of the prediction along the trajectory. Only one grid point's states are held; s and b of a point
    are solved once l of its neighbours is known (for ``l'``). Cost: ``(grid_points + 1) * samples`` pairs of JVPs
    plus ``grid_points * samples * (substeps - 1)`` plain calls (and one per sample to leave sigma = 1 on flow).
    """
    kind = check_parameterisation(kind)
    if grid_points < 2 or samples < 2 or chunk < 1 or substeps < 1:
        raise ValueError("grid_points >= 2, samples >= 2, chunk >= 1 and substeps >= 1 are required")
    if not lam_min < lam_max:
        raise ValueError(f"lambda range must increase, got [{lam_min}, {lam_max}]")
    gen = torch.Generator().manual_seed(int(seed))
    grid = torch.linspace(lam_min, lam_max, grid_points + 1, dtype=torch.float64)

    def sig(lam: float) -> torch.Tensor:
        return _sigma_of(torch.tensor(lam, dtype=torch.float64), kind)

    noise = torch.randn((samples, *shape), generator=gen).to(device=device, dtype=dtype)
    sigma0 = sig(float(grid[0]))
    if kind == "flow":
        # trajectories start from pure noise at sigma = 1, as a sampler's do; one DDIM step reaches the grid
        xs = []
        for c in range(0, samples, chunk):
            n = noise[c:c + chunk]
            d = denoise(n, torch.ones(n.shape[0], device=n.device, dtype=dtype))
            xs.append(sigma0.to(dtype) * n + (1 - sigma0).to(dtype) * d)
        x = torch.cat(xs)
    else:
        x = sigma0.to(dtype) * noise
    ls: list[torch.Tensor] = []
    ss: list[torch.Tensor] = []
    bs: list[torch.Tensor] = []
    waiting: _Moments | None = None  # the previous grid point, whose s and b need l of this one (for l')
    prev_d: torch.Tensor | None = None
    prev_lam: float | None = None
    h = float(grid[1] - grid[0])
    for j, lam_j in enumerate(grid.tolist()):
        sigma = sig(lam_j)
        a_j = float(alpha(sigma, kind))
        dlog_sigma = -1.0 if kind == "eps" else -a_j  # d log(sigma) / d lambda
        v_all = (torch.randint(0, 2, (samples, *shape), generator=gen) * 2 - 1).to(device=device, dtype=dtype)
        mom = _Moments(shape)
        d_all = []
        for c in range(0, samples, chunk):
            xc, vc = x[c:c + chunk], v_all[c:c + chunk]
            sb = torch.full((xc.shape[0],), float(sigma), device=xc.device, dtype=dtype)
            # probe along sigma * v (the scale the state varies on) so a finite difference step suits every sigma
            d, jv = _jvp(denoise, xc, sb, vc * float(sigma), torch.zeros_like(sb), jvp)
            jv = jv / float(sigma)
            # dx/dlambda = (d log sigma / d lambda) x + alpha D; d sigma / d lambda = sigma * d log sigma / d lambda
            xdot = dlog_sigma * xc + a_j * d
            _, ddot = _jvp(denoise, xc, sb, xdot, sb * dlog_sigma, jvp)
            mom.add(vc, vc - a_j * jv, xc / a_j, d, ddot)
            d_all.append(d.detach())
        ls.append(mom.solve_l())
        if waiting is not None:  # l' of the previous point: central difference (forward at the first point)
            k = j - 1
            dl = (ls[j] - ls[k - 1]) / (2 * h) if k > 0 else (ls[j] - ls[k]) / h
            _append_sb(waiting, ls[k], dl, ss, bs)
        waiting = mom
        if j < grid_points:
            x, prev_d, prev_lam = _march(denoise, x, torch.cat(d_all), prev_d, prev_lam, lam_j, float(grid[j + 1]),
                                         substeps, kind, chunk)
        if callback is not None:
            callback(j + 1, grid_points + 1)
    _append_sb(waiting, ls[-1], (ls[-1] - ls[-2]) / h, ss, bs)
    return Statistics(grid, torch.stack(ls).float(), torch.stack(ss).float(), torch.stack(bs).float())


def _append_sb(mom: _Moments, l: torch.Tensor, dl: torch.Tensor, ss: list, bs: list) -> None:
    s, b = mom.s_b(l, dl)
    ss.append(s)
    bs.append(b)


def _march(denoise: Denoise, x, d, prev_d, prev_lam, lam0: float, lam1: float, substeps: int, kind, chunk: int):
    """Carry the states from lam0 to lam1 with DPM-Solver++(2M); returns the state and the newest (D, lambda)."""
    lams = torch.linspace(lam0, lam1, substeps + 1, dtype=torch.float64)
    sig = _sigma_of(lams, kind)
    for k in range(substeps):
        if k > 0:
            sb = torch.full((x.shape[0],), float(sig[k]), device=x.device, dtype=x.dtype)
            d = torch.cat([denoise(x[c:c + chunk], sb[c:c + chunk]) for c in range(0, x.shape[0], chunk)])
        if prev_d is None:
            hist_d, hist_l, order = [d], [lams[k]], 1
        else:
            hist_d, hist_l, order = [prev_d, d], [torch.tensor(prev_lam, dtype=torch.float64), lams[k]], 2
        x_next = dpm_solver_pp._multistep_update(x, hist_d, hist_l, sig[k].to(x.dtype), sig[k + 1].to(x.dtype),
                                                 kind, order)
        prev_d, prev_lam = d, float(lams[k])
        x = x_next
    return x, prev_d, prev_lam
