"""Train the proving ground's toys on generated scenes (``python -m preprint train-proving-ground``).

Each stage is seeded and runs a fixed number of steps, so the same command on the same machine rebuilds
the same weights. Order per toy: train its VAE on random crops of generated scenes, rescale the VAE's
latent so that ComfyUI's latent format for the family maps it to zero mean and unit variance, encode a
fixed set of captioned scenes (images with the VAE, captions with the frozen text encoder exactly as
CLIPTextEncode does), then train the diffusion model on them in ComfyUI's own model class through
``BaseModel.apply_model`` (so noise scaling, timestep mapping and conditioning inputs are ComfyUI's).

Objectives: EPS UNet with EDM's weighting of the x0 error, 1/sigma^2 + 1 (sigma_data = 1), its 1/sigma^2 part
capped at 5 as min-SNR-5 does (the plain noise loss gives the high noise levels, where the caption decides
colours and layout, almost no weight); flow DiT with the velocity loss. 10% of the
captions are replaced by the empty prompt so CFG and unconditional sampling work. EMA weights are saved.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import models
from .scenes import TRAINING_SIZE, render, sample_scene

OBJECT_COUNT_WEIGHTS = (0.35, 0.35, 0.15, 0.15)  # 1, 2, 3, 4 objects: one- and two-object prompts matter most


@dataclass(frozen=True)
class Budget:
    vae_steps: int = 1500
    vae_batch: int = 24
    vae_crop: int = 32
    vae_lr: float = 1.5e-3
    scenes: int = 10000
    model_steps: int = 1800
    model_batch: int = 32
    lr: float = 1e-3
    ema: float = 0.998
    dropout: float = 0.1


# the 4-channel VAE keeps its colours only with the gentler recipe (at 1.5e-3 on 32-pixel crops it collapses to grey)
BUDGETS = {"sd15": Budget(vae_steps=1200, vae_batch=16, vae_crop=48, vae_lr=1e-3, model_steps=2400),
           "flux": Budget()}
VAE_FIELDS = ("vae_steps", "vae_batch", "vae_crop", "vae_lr")


def _log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _scene(g: torch.Generator):
    n = int(torch.multinomial(torch.tensor(OBJECT_COUNT_WEIGHTS), 1, generator=g)) + 1
    return sample_scene(g, n_objects=n)


def scene_images(n: int, g: torch.Generator, size: int = TRAINING_SIZE) -> tuple[torch.Tensor, list[str]]:
    """``n`` generated scenes as images in ``[-1, 1]`` ``[n, 3, size, size]`` and their captions."""
    scenes = [_scene(g) for _ in range(n)]
    images = torch.stack([render(s, size, size) for s in scenes]) * 2 - 1
    return images, [s.caption() for s in scenes]


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------- VAE


def train_vae(latent_channels: int, budget: Budget, seed: int) -> torch.nn.Module:
    """An AutoencoderKL trained on random crops of generated scenes: L1 + L2 reconstruction, a small KL,
    and latent noise on the decoder's input so it tolerates the imperfect latents a sampler returns."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = models.build_vae_module(latent_channels)
    from ..runner.tiny_models import randomise_  # imports comfy: only once ComfyUI is on the path

    randomise_(vae, seed)  # ComfyUI's layers skip weight initialisation: seeded fan-in scaled weights
    opt = torch.optim.AdamW(vae.parameters(), lr=budget.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    c = budget.vae_crop
    for step in range(budget.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, budget.vae_steps, budget.vae_lr)
        images, _ = scene_images(budget.vae_batch, g)
        y0, x0 = (int(v) for v in torch.randint(0, TRAINING_SIZE - c + 1, (2,), generator=g))
        x = images[:, :, y0:y0 + c, x0:x0 + c]
        moments = vae.quant_conv(vae.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        z = z + 0.05 * mean.detach().std() * torch.randn(mean.shape, generator=g)
        recon = vae.decoder(vae.post_quant_conv(z))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == budget.vae_steps - 1:
            _log(f"vae{latent_channels} step {step}/{budget.vae_steps} loss {loss.item():.4f}")
    return vae.eval()


def latent_target(latent_format) -> tuple[float, float]:
    """(mean, std) of a VAE latent that ``latent_format.process_in`` maps to zero mean, unit variance."""
    return float(getattr(latent_format, "shift_factor", 0.0) or 0.0), 1.0 / float(latent_format.scale_factor)


@torch.no_grad()
def normalise_latent_(vae: torch.nn.Module, images: torch.Tensor, latent_format) -> dict:
    """Rescale the VAE's latent per channel (quant_conv's mean rows and post_quant_conv's input, an exact
    reparametrisation: decoding is unchanged) so ComfyUI's latent format for the family sees N(0, 1)."""
    means = torch.cat([vae.quant_conv(vae.encoder(b)).chunk(2, dim=1)[0] for b in images.split(64)])
    mu, sd = means.mean(dim=(0, 2, 3)), means.std(dim=(0, 2, 3)).clamp_min(1e-4)
    t_mu, t_sd = latent_target(latent_format)
    k = t_sd / sd  # new = (old - mu) * k + t_mu
    c = mu.numel()
    q = vae.quant_conv
    q.weight[:c] *= k.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mu) * k + t_mu
    q.bias[c:] += 2 * torch.log(k)
    p = vae.post_quant_conv  # old = (new - t_mu) / k + mu
    p.bias += (p.weight[:, :, 0, 0] * (mu - t_mu / k)).sum(dim=1)
    p.weight /= k.view(1, -1, 1, 1)
    return {"latent_mean_before": mu.tolist(), "latent_std_before": sd.tolist()}


@torch.no_grad()
def encode_images(vae: torch.nn.Module, images: torch.Tensor, latent_format) -> torch.Tensor:
    """What the diffusion model sees: ``process_in`` of the VAE's latent (its mode, as ComfyUI encodes)."""
    out = [latent_format.process_in(vae.quant_conv(vae.encoder(b)).chunk(2, dim=1)[0]) for b in images.split(64)]
    return torch.cat(out)


@torch.no_grad()
def encode_captions(clip, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-attention context ``[N, T, D]`` (float16) and pooled output ``[N, P]`` (or None), computed
    caption by caption exactly as CLIPTextEncode does."""
    cache: dict[str, tuple] = {}
    cross, pooled = [], []
    for text in captions:
        if text not in cache:
            cond = models.encode(clip, text)[0]
            cache[text] = (cond[0][0].to(torch.float16), cond[1].get("pooled_output"))
        c, p = cache[text]
        cross.append(c)
        pooled.append(p)
    pooled_t = None if pooled[0] is None else torch.cat([p.reshape(1, -1) for p in pooled]).float()
    return torch.stack(cross), pooled_t


@contextlib.contextmanager
def training_mode(model):
    """Make ComfyUI's inference-oriented modules trainable for the duration: SDPA attention (the CPU
    default is a slow memory-saving kernel; the maths is the same) and a copy of every LayerNorm input
    (Flux blocks add to their inputs in place, which autograd would otherwise reject)."""
    import comfy.ldm.modules.attention as attention

    targets = [attention]
    try:
        import comfy.ldm.flux.math as flux_math

        targets.append(flux_math)
    except ImportError:
        pass
    saved = [(m, m.optimized_attention) for m in targets if hasattr(m, "optimized_attention")]
    hooks = [mod.register_forward_pre_hook(lambda _m, args: tuple(a.clone() if torch.is_tensor(a) else a
                                                                   for a in args))
             for mod in model.modules() if isinstance(mod, torch.nn.LayerNorm)]
    try:
        for m, _ in saved:
            m.optimized_attention = attention.attention_pytorch
        model.train()
        yield
    finally:
        for m, fn in saved:
            m.optimized_attention = fn
        for h in hooks:
            h.remove()
        model.eval()


def _sample_sigmas(arch: str, model_sampling, n: int, g: torch.Generator) -> torch.Tensor:
    if arch == "sd15":  # the 1000 discrete training noise levels, uniformly
        idx = torch.randint(0, len(model_sampling.sigmas), (n,), generator=g)
        return model_sampling.sigmas[idx].float()
    u = torch.rand(n, generator=g).clamp(1e-4, 1.0)
    shifted = model_sampling.sigma(u).float()  # the levels the default schedule visits ...
    return torch.where(torch.rand(n, generator=g) < 0.5, shifted, u)  # ... and every level evenly


def train_diffusion(arch: str, latents: torch.Tensor, cross: torch.Tensor, pooled: torch.Tensor | None,
                    uncond: tuple[torch.Tensor, torch.Tensor | None], budget: Budget, seed: int) -> dict:
    """Train the toy's diffusion model; returns its EMA state dict."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    base = models.build_model(arch)
    net = base.diffusion_model
    from ..runner.tiny_models import randomise_

    randomise_(net, seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("out.2.", "final_layer.linear.")):
                p.zero_()
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=budget.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ms = base.model_sampling
    u_cross, u_pooled = uncond
    n = latents.shape[0]
    with training_mode(net):
        for step in range(budget.model_steps):
            for group in opt.param_groups:
                group["lr"] = _lr(step, budget.model_steps, budget.lr)
            idx = torch.randint(0, n, (budget.model_batch,), generator=g)
            x0 = latents[idx]
            drop = torch.rand(len(idx), generator=g) < budget.dropout
            ctx = torch.where(drop.view(-1, 1, 1), u_cross.to(cross.dtype), cross[idx]).float()
            extra = {}
            if pooled is not None:
                extra["y"] = torch.where(drop.view(-1, 1), u_pooled.reshape(1, -1), pooled[idx])
            sigma = _sample_sigmas(arch, ms, len(idx), g)
            noise = torch.randn(x0.shape, generator=g)
            xt = ms.noise_scaling(sigma, noise.clone(), x0)
            denoised = base.apply_model(xt, sigma, c_crossattn=ctx, **extra)
            err = (denoised - x0).pow(2).mean(dim=(1, 2, 3))
            s2 = sigma.pow(2)
            # EPS: EDM's 1/s^2 + 1 on the x0 error, its noise-loss part 1/s^2 capped at 5 (min-SNR-5)
            # flow: ||v_hat - v||^2 == ||x0_hat - x0||^2 / s^2
            weight = torch.clamp(1 / s2, max=5.0) + 1 if arch == "sd15" else 1 / s2.clamp_min(1e-4)
            loss = (err * weight).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            decay = min(budget.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                    else:
                        ema[k].copy_(v)
            if step % 100 == 0 or step == budget.model_steps - 1:
                _log(f"{arch} step {step}/{budget.model_steps} loss {loss.item():.4f}")
    return ema


def reuse_vae(arch: str, folder: Path, budget: Budget, seed: int) -> torch.nn.Module:
    """The toy's VAE from an earlier run in ``folder``, provided it was trained with this seed and this
    budget's VAE recipe (what ``train_vae`` would make again); the diffusion model can then be retrained alone."""
    spec = models.TOYS[arch]
    path = models.weight_path(spec.vae_file, Path(folder))
    state, meta = models.load_weights(path, arch)
    old = meta.get("budget", {})
    old.setdefault("vae_lr", 1e-3)  # files written before the rate was a budget field used 1e-3
    differs = [f"{k} {old.get(k)} != {getattr(budget, k)}" for k in VAE_FIELDS if old.get(k) != getattr(budget, k)]
    if meta.get("seed") != seed:
        differs.append(f"seed {meta.get('seed')} != {seed}")
    if differs:
        raise models.ProvingWeightsError(f"{path} was not trained with this VAE recipe ({'; '.join(differs)}); "
                                         "train the VAE again (drop --vae-from)")
    vae = models.build_vae_module(spec.latent_channels)
    models._load_into(vae, state, path, arch)
    return vae.eval()


def train_toy(arch: str, out_dir: Path, seed: int = 0, budget: Budget | None = None,
              vae_from: Path | None = None) -> dict:
    """Train one toy (VAE, then diffusion model) and write its two weight files to ``out_dir``; with
    ``vae_from``, reuse the VAE found there (see :func:`reuse_vae`) and train the diffusion model only."""
    spec = models.TOYS[arch]
    budget = budget or BUDGETS[arch]
    cfg = models.model_config(arch)
    started = time.time()
    if vae_from is not None:
        _log(f"{arch}: VAE from {vae_from}")
        vae = reuse_vae(arch, vae_from, budget, seed)
    else:
        _log(f"{arch}: VAE with {spec.latent_channels} latent channels, {budget.vae_steps} steps")
        vae = train_vae(spec.latent_channels, budget, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    _log(f"{arch}: rendering {budget.scenes} captioned scenes")
    images, captions = scene_images(budget.scenes, g)
    stats = normalise_latent_(vae, images[:2000], cfg.latent_format)
    latents = encode_images(vae, images, cfg.latent_format)
    del images
    vae_minutes = (time.time() - started) / 60
    clip = models.text_encoder(arch)
    _log(f"{arch}: encoding captions")
    cross, pooled = encode_captions(clip, captions)
    u_cross, u_pooled = encode_captions(clip, [""])
    if arch == "sd15":  # SD1.5 takes no pooled vector
        pooled = u_pooled = None
    t1 = time.time()
    _log(f"{arch}: diffusion model, {budget.model_steps} steps of {budget.model_batch}")
    ema = train_diffusion(arch, latents, cross, pooled, (u_cross[0], None if u_pooled is None else u_pooled[0]),
                          budget, seed + 3)
    meta = {"arch": arch, "seed": seed, "budget": budget.__dict__, "text_seed": models.TEXT_SEED,
            "text_fingerprint": models.fingerprint(clip), "command": models.REBUILD_COMMAND,
            "minutes": {"vae": round(vae_minutes, 1), "model": round((time.time() - t1) / 60, 1)},
            "latent_stats": stats, "torch": torch.__version__, "sampling_settings": dict(cfg.sampling_settings)}
    models.save_weights(models.weight_path(spec.vae_file, out_dir), vae.state_dict(),
                        {**meta, "part": "vae", "latent_channels": spec.latent_channels})
    models.save_weights(models.weight_path(spec.model_file, out_dir), ema, {**meta, "part": "model"})
    _log(f"{arch}: wrote {spec.model_file} and {spec.vae_file} to {out_dir}")
    return meta
