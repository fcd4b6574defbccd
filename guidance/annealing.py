"""Annealing guidance scale: a learned scheduler that picks the CFG scale at every step.

Yehezkel, Dahary, Voynov & Cohen-Or, "Navigating with Annealing Guidance Scale in Diffusion Space",
arXiv:2506.24108 (official code: github.com/annealing-guidance/annealing-guidance).

The scheduler is a small MLP. Its inputs are three scalars per image, each expanded into ``[v, cos(v),
cos(2v), ..., cos((k-1)v)]`` (k = 4 by default, 12 features in all):

* ``t / 1000`` with ``t`` the model timestep (0..999),
* ``||eps_u - eps_c|| / 5``, the Euclidean norm of the guidance direction over the whole latent,
* ``lambda`` in [0, 1], the user's trade-off (higher: stronger prompt alignment; the authors use 0.4);

and it predicts ``w = w_scale * MLP(features) + w_bias``; guidance is then ``eps = eps_u + w (eps_c - eps_u)``.
The sampler it was trained with is DDIM whose re-noising direction uses the *unconditional* prediction
(the paper's Algorithm 4, ``pred_sample_direction_with_null``):

    x_{t-1} = sqrt(a_{t-1}) x0_guided + sqrt(1 - a_{t-1}) eps_u

On ComfyUI's sigma axis (``x = alpha x0 + sigma eps``) that is ``x' = alpha' D_g + sigma' eps_u``, which for EPS
models and flow models alike is ComfyUI's ``euler_cfg_pp`` step (up to rounding).

Weights live in a safetensors file: the MLP's tensors under their module names (``combined_head.0.weight``
...) and the configuration as JSON in the metadata entry ``config``. ``annealing_convert`` makes that file
from the authors' checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch

from ..samplers.common import check_sigmas, progress, step_callback
from ..utils.noise_schedule import Parameterisation, alpha, check_parameterisation

CONFIG_KEY = "config"
FORMAT_KEY = "format"
FORMAT = "preprint.annealing_guidance.v1"


class SchedulerFileError(ValueError):
    """A scheduler file that cannot be used; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Shape and normalisations of the scheduler MLP (names follow the authors' configuration)."""

    hidden_size: int = 128
    output_size: int = 1
    n_layers: int = 2
    t_embed_dim: int = 4
    delta_embed_dim: int = 4
    lambda_embed_dim: int = 4
    t_embed_normalization: float = 1000.0
    delta_embed_normalization: float = 5.0
    w_bias: float = 1.0
    w_scale: float = 1.0

    @property
    def input_size(self) -> int:
        return self.t_embed_dim + self.delta_embed_dim + self.lambda_embed_dim

    def layer_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of each Linear: input -> hidden, n_layers x hidden -> hidden, hidden -> output."""
        shapes = [(self.hidden_size, self.input_size)]
        shapes += [(self.hidden_size, self.hidden_size)] * self.n_layers
        shapes.append((self.output_size, self.hidden_size))
        return shapes

    def layer_names(self) -> list[str]:
        # Linear layers sit at even indices of the authors' nn.Sequential (ReLUs in between).
        return [f"combined_head.{2 * i}" for i in range(len(self.layer_shapes()))]

    @classmethod
    def from_dict(cls, d: dict) -> SchedulerConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: d[k] for k in known if k in d}
        try:
            cfg = cls(**kwargs)
        except TypeError as e:  # pragma: no cover - dataclass accepts all known names
            raise SchedulerFileError(f"guidance scheduler configuration is invalid: {e}") from e
        for name in ("hidden_size", "output_size", "t_embed_dim", "delta_embed_dim", "lambda_embed_dim"):
            v = getattr(cfg, name)
            if not isinstance(v, int) or v < 1:
                raise SchedulerFileError(
                    f"guidance scheduler configuration: {name} must be a positive integer, got {v!r}."
                )
        if not isinstance(cfg.n_layers, int) or cfg.n_layers < 0:
            raise SchedulerFileError(
                f"guidance scheduler configuration: n_layers must be >= 0, got {cfg.n_layers!r}."
            )
        if cfg.output_size != 1:
            raise SchedulerFileError(
                f"guidance scheduler configuration: output_size is {cfg.output_size}; only schedulers that predict "
                "one scale per image (output_size 1) are supported."
            )
        return cfg


def embed(value: torch.Tensor, n: int) -> torch.Tensor:
    """``[v, cos(v), cos(2v), ..., cos((n-1) v)]`` per row (the official positional-style embedding)."""
    k = torch.arange(1, n, dtype=value.dtype, device=value.device)
    return torch.cat([value[:, None], torch.cos(value[:, None] * k)], dim=1)


class GuidanceScheduler:
    """The scheduler MLP as plain tensors (evaluated in float32 on the latent's device)."""

    def __init__(self, config: SchedulerConfig, tensors: dict[str, torch.Tensor]):
        self.config = config
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, (o, i) in zip(config.layer_names(), config.layer_shapes(), strict=True):
            w, b = tensors.get(f"{name}.weight"), tensors.get(f"{name}.bias")
            if w is None or b is None:
                raise SchedulerFileError(
                    f"guidance scheduler weights: '{name}.weight' / '{name}.bias' missing. The file does not match "
                    "its configuration (hidden_size / n_layers); re-create it with annealing_convert."
                )
            if tuple(w.shape) != (o, i) or tuple(b.shape) != (o,):
                raise SchedulerFileError(
                    f"guidance scheduler weights: '{name}' has shape {tuple(w.shape)} / {tuple(b.shape)}, expected "
                    f"({o}, {i}) / ({o},) from the configuration; the file is damaged or made for another model."
                )
            if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
                raise SchedulerFileError(f"guidance scheduler weights: '{name}' contains NaN or infinity.")
            self.layers.append((w.float(), b.float()))

    def __deepcopy__(self, memo):  # immutable weights: model clones share them
        return self

    def features(self, timestep: torch.Tensor, delta_norm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        c = self.config
        return torch.cat([
            embed(timestep / c.t_embed_normalization, c.t_embed_dim),
            embed(delta_norm / c.delta_embed_normalization, c.delta_embed_dim),
            embed(lam, c.lambda_embed_dim),
        ], dim=1)

    def __call__(self, timestep: float | torch.Tensor, lam: float | torch.Tensor, eps_uncond: torch.Tensor,
                 eps_cond: torch.Tensor) -> torch.Tensor:
        """Guidance scale per image, shape ``[B]`` (float32)."""
        delta = (eps_uncond - eps_cond).float()
        b = delta.shape[0]
        norm = delta.reshape(b, -1).norm(dim=1)
        t = torch.as_tensor(timestep, dtype=torch.float32, device=norm.device).reshape(-1).expand(b)
        lam_t = torch.as_tensor(lam, dtype=torch.float32, device=norm.device).reshape(-1).expand(b)
        h = self.features(t, norm, lam_t)
        for i, (w, bias) in enumerate(self.layers):
            h = torch.nn.functional.linear(h, w.to(h.device), bias.to(h.device))
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return self.config.w_scale * h[:, 0] + self.config.w_bias

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (w, b) in zip(self.config.layer_names(), self.layers, strict=True):
            out[f"{name}.weight"], out[f"{name}.bias"] = w.contiguous(), b.contiguous()
        return out


def constant_scheduler(w: float, config: SchedulerConfig | None = None) -> GuidanceScheduler:
    """A scheduler whose output is exactly ``w`` for every input (all weights zero, last bias ``w - w_bias``
    divided by ``w_scale``). Used to prove the mechanics against plain CFG."""
    config = config or SchedulerConfig(hidden_size=8, n_layers=1, w_bias=0.0, w_scale=1.0)
    tensors = {}
    for name, (o, i) in zip(config.layer_names(), config.layer_shapes(), strict=True):
        tensors[f"{name}.weight"] = torch.zeros(o, i)
        tensors[f"{name}.bias"] = torch.zeros(o)
    last = config.layer_names()[-1]
    tensors[f"{last}.bias"] = torch.full((1,), (w - config.w_bias) / config.w_scale)
    return GuidanceScheduler(config, tensors)


def save_scheduler(scheduler: GuidanceScheduler, path: str | Path, source: str = "") -> None:
    from safetensors.torch import save_file

    meta = {CONFIG_KEY: json.dumps(asdict(scheduler.config)), FORMAT_KEY: FORMAT}
    if source:
        meta["source"] = source
    save_file(scheduler.state_dict(), str(path), metadata=meta)


def load_scheduler(path: str | Path) -> GuidanceScheduler:
    """Load a scheduler file; every failure says what is wrong and how to get a good file."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    how = ("Convert the authors' released checkpoint with `python <this pack>/guidance/annealing_convert.py "
           "checkpoint.pt <ComfyUI>/models/guidance_schedulers/annealing_sdxl.safetensors`.")
    if not p.is_file():
        raise SchedulerFileError(f"guidance scheduler file not found: {p}. {how}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SchedulerFileError(
            f"guidance scheduler file {p.name} is not a readable safetensors file ({e}). {how}"
        ) from e
    if CONFIG_KEY not in meta:
        raise SchedulerFileError(
            f"guidance scheduler file {p.name} has no '{CONFIG_KEY}' metadata, so its MLP shape is unknown; it was "
            f"not made by annealing_convert. {how}"
        )
    try:
        config_dict = json.loads(meta[CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise SchedulerFileError(
            f"guidance scheduler file {p.name}: the '{CONFIG_KEY}' metadata is not JSON ({e}). {how}"
        ) from e
    if not isinstance(config_dict, dict):
        raise SchedulerFileError(
            f"guidance scheduler file {p.name}: the '{CONFIG_KEY}' metadata is not an object. {how}"
        )
    return GuidanceScheduler(SchedulerConfig.from_dict(config_dict), tensors)


class GuidedPrediction(NamedTuple):
    """One guided model evaluation: the combined result and the two predictions it was made from."""

    denoised: torch.Tensor  # CFG result with scale ``scale`` (plus whatever other hooks added)
    cond: torch.Tensor
    uncond: torch.Tensor
    scale: float


RENOISE = ("uncond", "guided")


@torch.no_grad()
def sample_annealing_guidance(predict: Callable[[torch.Tensor, torch.Tensor], GuidedPrediction], x: torch.Tensor,
                              sigmas: torch.Tensor, *, scheduler: GuidanceScheduler, guidance_lambda: float,
                              timestep_of: Callable[[float], float], parameterisation: Parameterisation = "eps",
                              renoise: str = "uncond", callback=None, disable=None) -> torch.Tensor:
    """DDIM with the learned guidance scale (arXiv:2506.24108, Algorithm 4).

    ``predict(x, sigma)`` evaluates the model once (both branches); ``timestep_of(sigma)`` gives the model
    timestep (0..999) the scheduler expects. ``renoise="uncond"`` is the paper's step; ``"guided"`` re-noises
    with the guided prediction, i.e. plain DDIM, so a constant scheduler reproduces plain CFG exactly.
    """
    check_parameterisation(parameterisation)
    if renoise not in RENOISE:
        raise ValueError(f"annealing guidance: renoise must be one of {RENOISE}, got {renoise!r}.")
    if not 0.0 <= guidance_lambda <= 1.0:
        raise ValueError(f"annealing guidance: lambda must lie in [0, 1], got {guidance_lambda}.")
    sigmas = check_sigmas(sigmas, "annealing guidance")
    s_in = x.new_ones([x.shape[0]])
    for i in progress(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        p = predict(x, sigma * s_in)
        guided = learned_guidance(p, x, sigma, scheduler=scheduler, guidance_lambda=guidance_lambda,
                                  timestep=timestep_of(float(sigma)), parameterisation=parameterisation)
        step_callback(callback, x, i, sigma, guided)
        if float(sigma_next) == 0.0:
            x = guided
            continue
        direction = p.uncond if renoise == "uncond" else guided
        if parameterisation == "eps":
            x = guided + (x - direction) / sigma * sigma_next
        else:
            a, a_next = alpha(sigma, parameterisation), alpha(sigma_next, parameterisation)
            x = a_next * guided + (x - a * direction) / sigma * sigma_next
    return x


def learned_guidance(p: GuidedPrediction, x: torch.Tensor, sigma: torch.Tensor, *, scheduler: GuidanceScheduler,
                     guidance_lambda: float, timestep: float, parameterisation: Parameterisation) -> torch.Tensor:
    """The guided prediction at the scale the scheduler picks for this evaluation: ``p.denoised`` moved from its
    scale ``p.scale`` to the learned ``w`` along ``p.cond - p.uncond`` (``p.denoised`` itself where they agree)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma  # one sigma per batch row, or shared
    eps_c = _eps(x, p.cond, s, parameterisation)
    eps_u = _eps(x, p.uncond, s, parameterisation)
    w = scheduler(timestep, guidance_lambda, eps_u, eps_c)
    if not bool(torch.isfinite(w).all()):
        raise FloatingPointError(
            f"annealing guidance: the scheduler predicted a non-finite scale ({w.tolist()}) at sigma "
            f"{float(sigma.flatten()[0]):.4g}; the weights file is damaged or does not belong to this model."
        )
    if bool((w == p.scale).all()):
        return p.denoised  # bit-for-bit the model's own CFG result
    delta = (w.to(p.denoised) - p.scale).reshape(-1, *([1] * (x.ndim - 1)))
    return p.denoised + (p.cond - p.uncond) * delta


def _eps(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, kind: Parameterisation) -> torch.Tensor:
    if kind == "eps":
        return (x - denoised) / sigma
    return (x - alpha(sigma, kind) * denoised) / sigma


def timestep_from_noise_level(t: float) -> float:
    """Model timestep (0..999) of a normalised noise level, as DDPM-trained schedulers count it."""
    return 999.0 * min(max(t, 0.0), 1.0)

