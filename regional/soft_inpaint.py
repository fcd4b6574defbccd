"""Differential Diffusion in sigma space: a soft change map whose value per pixel is its denoise strength
(pure torch).

Levin and Fried, "Differential Diffusion: Giving Each Pixel Its Strength", arXiv:2306.00950. Each pixel with
change value ``m`` in ``[0, 1]`` is held at the re-noised original until the run reaches the point where an
img2img pass of denoise ``m`` would start, then denoised freely: ``m = 1`` changes from the first step,
``m = 0`` never, ``m = 0.5`` over the second half of the run.

"Where an img2img pass of denoise m starts" is a noise level, so it is read off the run's own sigma list:
the pixel joins once the run's step position ``u`` (``caching.clock.StepClock``: a call's sigma placed between
the schedule's sigmas, so Heun-type and SDE samplers agree with Euler) satisfies ``m >= 1 - u / N``. ComfyUI's
img2img takes the last ``N`` steps of an ``N / m``-step schedule; for the schedules that are functions of
``i / N`` (Karras, exponential, simple, normal, beta, Flux's shifted ones) that is the same starting sigma.
ComfyUI core's DifferentialDiffusion compares ``m`` with the model *timestep* normalised over the run
instead, which agrees only where sigma is linear in the timestep: on Karras or shifted flow schedules its
``m = 0.5`` pixels start late or early.
"""

from __future__ import annotations

import torch

from ..caching.clock import StepClock

TOLERANCE = 1e-6  # step positions are computed from float32 sigmas


def threshold(sigma, sample_sigmas) -> float:
    """The change value a pixel needs to be denoised at a call with ``sigma``: ``1 - u / N``."""
    clock = StepClock(sample_sigmas)
    return 1.0 - clock.position(sigma) / clock.steps


def active_mask(change: torch.Tensor, sigma, sample_sigmas) -> torch.Tensor:
    """1 where a pixel of the change map is being denoised at this call, 0 where it is held (same shape and
    dtype as ``change``)."""
    return (change >= threshold(sigma, sample_sigmas) - TOLERANCE).to(change.dtype)


# Inpainting models (SD1.5 / SDXL inpaint, Flux Fill) take, besides the noisy latent, a concat input: a mask of what
# is being regenerated and the image with that part hidden. ComfyUI builds it once per run from the conditioning's
# binary mask; with a soft change map the regenerated region grows as sigma falls, so the concat input must follow
# the active mask of every call, or the model keeps painting into a hole that is not there yet (or sees the original
# where it is already regenerating). The pieces of a concat input, by kind:
#   "mask"            1 channel, 1 where regenerated               (SD inpaint)
#   "mask_inverted"   1 channel, 1 where kept
#   "mask_pixels"     k channels, the pixel-space mask folded into channels (Flux Fill: 8 x 8 = 64)
#   "masked_image"    the latent image with the regenerated part hidden
#   "image"           an image conditioning that does not depend on the mask (left alone)
MASK_KINDS = ("mask", "mask_inverted", "mask_pixels")
KINDS = (*MASK_KINDS, "masked_image", "image")


def concat_layout(keys: tuple[str, ...], channels: int, latent_channels: int) -> tuple[tuple[str, int], ...]:
    """Channel widths of a concat input built from ComfyUI-style keys (``mask`` / ``mask_inverted``: 1 channel,
    ``masked_image`` / ``concat_image``: the latent's channels). Raises ValueError when they do not add up to
    ``channels``."""
    widths = {"mask": 1, "mask_inverted": 1, "masked_image": latent_channels, "concat_image": latent_channels}
    unknown = [k for k in keys if k not in widths]
    if unknown:
        raise ValueError(f"unknown concat keys {unknown}")
    layout = tuple(("image" if k == "concat_image" else k, widths[k]) for k in keys)
    total = sum(w for _, w in layout)
    if total != channels:
        raise ValueError(f"concat keys {list(keys)} make {total} channels, the input has {channels}")
    return layout


def given_hidden(pieces: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Where the concat input as built from the conditioning already hides the image (``[R, 1, ...]`` bool), read
    from its own mask piece; None when it carries no mask."""
    # ComfyUI's inpaint conditioning hides the pixels whose mask rounds to 1: above 0.5 (torch rounds 0.5 to even)
    if "mask" in pieces:
        return pieces["mask"] > 0.5
    if "mask_inverted" in pieces:
        return pieces["mask_inverted"] < 0.5
    if "mask_pixels" in pieces:  # Flux Fill's mask is not rounded: its mean over the folded 8 x 8 block
        return pieces["mask_pixels"].mean(dim=1, keepdim=True) > 0.5
    return None


def follow_change(concat: torch.Tensor, layout: tuple[tuple[str, int], ...], active: torch.Tensor,
                  original: torch.Tensor, blank: torch.Tensor) -> torch.Tensor:
    """The concat input for one model call whose active (being-regenerated) mask is ``active`` ``[R, 1, ...]``.

    Mask pieces become ``active`` (inverted / repeated as their kind says). The masked image hides exactly the
    active part: there it keeps what the conditioning put where it already hid the image (its encoding of the
    hidden image), and shows ``blank`` (the model's own "no image" latent) where the change map reaches beyond
    the conditioning's mask; outside the active part it shows ``original``, the run's latent image. So an active
    mask equal to the conditioning's mask gives back ``concat`` value for value, and an all-ones map with a
    full-frame conditioning mask is core's plain inpainting input. A layout without a mask piece is returned
    unchanged."""
    if sum(w for _, w in layout) != concat.shape[1]:
        raise ValueError(f"the layout has {sum(w for _, w in layout)} channels, the concat input {concat.shape[1]}")
    if not any(kind in MASK_KINDS for kind, _ in layout):
        return concat
    parts = torch.split(concat, [w for _, w in layout], dim=1)
    pieces = {kind: p for (kind, _), p in zip(layout, parts, strict=True)}
    hidden = given_hidden(pieces)
    on = active.to(device=concat.device, dtype=concat.dtype)
    region = on >= 0.5
    out = []
    for (kind, width), part in zip(layout, parts, strict=True):
        if kind == "mask":
            out.append(on)
        elif kind == "mask_inverted":
            out.append(1.0 - on)
        elif kind == "mask_pixels":
            # where the map agrees with a binary conditioning mask keep its pixel-accurate values (Flux Fill folds
            # the pixel mask, edges and all); elsewhere (and for soft conditioning masks) the block follows the map
            block = on.expand(-1, width, *on.shape[2:])
            binary = ((part == 0) | (part == 1)).all(dim=1, keepdim=True)
            out.append(block if hidden is None else torch.where((region == hidden) & binary, part, block))
        elif kind == "masked_image":
            shown = part if hidden is None else torch.where(hidden, part, blank.to(part))
            out.append(torch.where(region, shown, original.to(part)))
        else:
            out.append(part)
    return torch.cat(out, dim=1)
