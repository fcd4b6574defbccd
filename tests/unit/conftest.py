"""Unit-tier fixtures: exact-score Gaussian-mixture denoisers and their reference ODE solutions."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest
import torch

from preprint.utils.gaussian_mixture import MixtureDenoiser, make_mixture, reference_solution

EVENT_SHAPE = (4, 8, 8)  # latent-shaped: an SD latent of 64x64 pixels


def karras_sigmas(n: int, sigma_min: float = 0.03, sigma_max: float = 14.6, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) schedule with a final 0, in float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)])


def flow_sigmas(n: int, shift: float = 3.0) -> torch.Tensor:
    """Flux / SD3 style time-shifted linear schedule from 1 to 0, in float64."""
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def log_snr_uniform_sigmas(n: int, kind: str) -> torch.Tensor:
    """n steps uniform in the half log-SNR lambda, then a final 0: every lambda step shrinks as n grows,
    which is what a convergence-order measurement needs (a linear-in-t flow schedule keeps a fixed
    lambda ratio near sigma = 0 whatever n is)."""
    if kind == "eps":
        lam = torch.linspace(-math.log(14.6), -math.log(0.03), n, dtype=torch.float64)
        s = torch.exp(-lam)
    else:
        lam = torch.linspace(math.log(0.02 / 0.98), math.log(0.98 / 0.02), n, dtype=torch.float64)
        s = torch.sigmoid(-lam)
    return torch.cat([s, s.new_zeros(1)])


class Problem:
    """A denoiser, its noise schedule family and a starting batch, with cached reference solutions.

    ``schedule="practical"``: Karras (EPS) or shifted-linear from 1 (flow), as users sample.
    ``schedule="uniform"``: uniform in log-SNR, for convergence orders.
    """

    def __init__(self, kind: str, cfg: float, batch: int = 4, seed: int = 0, schedule: str = "practical",
                 std_range: tuple[float, float] = (0.05, 0.3)):
        self._args = (kind, cfg, batch, seed, schedule, tuple(std_range))
        mixture = make_mixture(EVENT_SHAPE, components=6, seed=seed, std_range=std_range)
        cond_w = torch.tensor([4.0, 2.0, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)
        self.kind = kind
        self.cfg = cfg
        self.model = MixtureDenoiser(mixture, kind=kind, cond_weights=cond_w, cfg=cfg)
        self.schedule = schedule
        self.sigma_max = float(self.sigmas(2)[0])
        g = torch.Generator().manual_seed(seed + 1)
        self.x_start = self.model.prior_noise(batch, self.sigma_max, g)
        self._refs: dict[float, torch.Tensor] = {}

    def sigmas(self, steps: int) -> torch.Tensor:
        if self.schedule == "uniform":
            return log_snr_uniform_sigmas(steps, self.kind)
        return karras_sigmas(steps) if self.kind == "eps" else flow_sigmas(steps)

    def reference(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Exact solution over the span of ``sigmas``.

        A list ending in 0 ends with a jump from its last non-zero sigma straight to the denoised state; that
        jump belongs to the schedule, not to the solver, so the reference makes the same final jump from the
        exact state at that sigma. Solver error is then measured alone.
        """
        final_zero = float(sigmas[-1]) == 0.0
        end = float(sigmas[-2]) if final_zero and len(sigmas) > 1 else float(sigmas[-1])
        key = (end, final_zero)
        if key not in self._refs:
            stored = _stored_reference(self._args, key)
            x = torch.load(stored) if stored is not None and stored.exists() else None
            if x is None:
                x = reference_solution(self.model, self.x_start, self.sigma_max, end)
                if final_zero:
                    x = self.model(x, torch.tensor(end, dtype=torch.float64))
                if stored is not None:
                    tmp = stored.with_suffix(f".{os.getpid()}.tmp")
                    torch.save(x, tmp)
                    tmp.replace(stored)
            self._refs[key] = x
        return self._refs[key]

    def error(self, x: torch.Tensor, sigmas: torch.Tensor) -> float:
        """Root-mean-square error per element against the reference solution over the same sigma span."""
        ref = self.reference(sigmas)
        return float(torch.sqrt(((x.double() - ref) ** 2).mean()))


def _stored_reference(args: tuple, key: tuple) -> Path | None:
    """Where a reference solution is kept between test processes, when ``PREPRINT_REFERENCE_CACHE`` names a
    folder (the mutation runner sets it: each mutant's tests run in a new process). The file name hashes
    everything the solution depends on, the source of the mixture code and of this file included, so a change
    to any of them (a mutant of the mixture itself) computes it afresh."""
    folder = os.environ.get("PREPRINT_REFERENCE_CACHE")
    if not folder:
        return None
    import preprint.utils.gaussian_mixture as gm
    import preprint.utils.noise_schedule as ns

    h = hashlib.sha256(repr((args, key, torch.__version__)).encode())
    for source in (gm.__file__, ns.__file__, __file__):
        h.update(Path(source).read_bytes())
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"{h.hexdigest()[:32]}.pt"


_PROBLEMS: dict[tuple, Problem] = {}


def get_problem(kind: str, cfg: float = 1.0, schedule: str = "practical") -> Problem:
    key = (kind, cfg, schedule)
    if key not in _PROBLEMS:
        _PROBLEMS[key] = Problem(kind, cfg, schedule=schedule)
    return _PROBLEMS[key]


@pytest.fixture(params=["eps", "flow"])
def problem(request) -> Problem:
    return get_problem(request.param)


@pytest.fixture(params=[("eps", 1.0), ("eps", 7.5), ("flow", 1.0), ("flow", 3.5)],
                ids=lambda p: f"{p[0]}-cfg{p[1]}")
def guided_problem(request) -> Problem:
    return get_problem(*request.param)


def observed_order(errors: list[float], steps: list[int]) -> list[float]:
    """Convergence order from errors at successive step counts: log(e1/e2) / log(n2/n1)."""
    return [math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i]) for i in range(len(errors) - 1)]


@pytest.fixture(scope="module")
def one_thread():
    """Scene scoring runs many small tensor ops; on a shared CPU, intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
