"""Attention entropy scaling for sizes other than the training size (pure torch).

Jin et al., "Training-free Diffusion Model Adaptation to Variable-Sized Text-to-Image Synthesis",
arXiv:2306.08645 (NeurIPS 2023).

The entropy of a softmax attention row grows with the number of keys it spreads over, roughly as
``log T``; above the training size every query attends more diffusely than the model learnt, which blurs
and repeats. Scaling the logits by ``sqrt(log T / log N)`` (``T`` keys now, ``N`` keys at the training
size) restores the training-time entropy: the temperature ``1 / sqrt(d)`` becomes ``sqrt(log_N T / d)``.
The factor is applied to the queries, which scales the logits exactly. Below the training size it is
below 1 and sharpens nothing away: it lowers the logits' scale as the paper prescribes.

Self-attention only: cross-attention keys are text tokens, whose number does not change with the size.
For joint text-image attention (Flux, SD3) ``T`` and ``N`` count the text tokens as well (I-Max's
``64^2 + 512`` for Flux at 1024 px).
"""

from __future__ import annotations

import math


def entropy_factor(keys_now: int, keys_train: int) -> float:
    """``sqrt(log T / log N)``: 1 when the counts agree (or either is too small to have an entropy)."""
    if keys_now == keys_train or keys_now < 2 or keys_train < 2:
        return 1.0
    return math.sqrt(math.log(keys_now) / math.log(keys_train))


def keys_at_training_size(keys_now: int, image_tokens_now: int, image_tokens_train: int) -> int:
    """Keys a layer had at the training size: its image share scaled by the area ratio, other tokens (text
    in joint attention) unchanged. ``image_tokens_*`` are the model input's token counts (latent area over
    the patch area); a UNet level ``k`` times down-sampled keeps the same ratio."""
    if image_tokens_now <= 0:
        raise ValueError(f"attention entropy scaling: {image_tokens_now} image tokens")
    other = max(keys_now - image_tokens_now, 0)
    image_now = keys_now - other
    return other + max(1, round(image_now * image_tokens_train / image_tokens_now))


# The hooks that apply the factor in a running model. ComfyUI hands an attention override the query and key tensors,
# not the image size, so an APPLY_MODEL wrapper records the latent's size for it.
LATENT_KEY = "preprint_entropy_latent"


class RecordLatentSize:
    """APPLY_MODEL wrapper: the latent's height and width (frames, height and width for a video latent), for the
    attention override to count image tokens."""

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        sides = x.shape[-3:] if x.ndim == 5 else x.shape[-2:]
        to = {**(transformer_options or {}), LATENT_KEY: tuple(int(n) for n in sides)}
        return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)


def patch_extent(patch) -> tuple[int, int, int] | tuple[int, int]:
    """A model's patch size as (rows, columns), or (frames, rows, columns) for a video DiT that patches time too
    (Wan, HunyuanVideo give a (t, h, w) sequence; Flux, SD3, Qwen-Image, Lumina2 an int)."""
    if isinstance(patch, (tuple, list)):
        p = tuple(int(n) for n in patch)
        if len(p) not in (2, 3) or min(p) < 1:
            raise ValueError(f"attention entropy scaling: unexpected patch size {tuple(patch)}")
        return p
    return int(patch), int(patch)


class EntropyOverride:
    """``optimized_attention_override``: self-attention queries times sqrt(log T / log N); chains an earlier
    override.

    ``dit``: the model's image self-attention runs over the whole token sequence (image, or text + image), so a
    shorter one (Lumina2's and HunyuanVideo's text refiners) is not an image attention and keeps its scale; a UNet's
    down-sampled levels are shorter and are scaled. On a video DiT the latent's frames (recorded with its size, over
    the temporal patch) give the image tokens, so joint text of any length (HunyuanVideo 1.5 adds glyph and vision
    tokens) counts as text; only the frame's area is compared with training. Without recorded frames the frames
    are whole multiples of a frame's tokens in the layer's keys."""

    def __init__(self, train_latent: tuple[int, int], patch, previous=None, dit: bool = False):
        self.patch, self.previous, self.dit = patch_extent(patch), previous, dit
        self.video = len(self.patch) == 3
        self.train_tokens = self._image_tokens(*train_latent)

    def _image_tokens(self, h: int, w: int) -> int:
        ph, pw = self.patch[-2:]
        return -(-h // ph) * -(-w // pw)

    def __call__(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        latent = to.get(LATENT_KEY)
        if latent is not None and len(args) >= 3:
            q, k = args[0], args[1]
            token_dim = 2 if kwargs.get("skip_reshape", False) else 1
            n_q, n_k = q.shape[token_dim], k.shape[token_dim]
            now = self._image_tokens(*latent[-2:])
            if not self.video:
                frames = 1
            elif len(latent) == 3:
                frames = -(-latent[0] // self.patch[0])
                if now <= n_k < frames * now and n_k % now == 0:  # attention within fewer frames (per frame)
                    frames = n_k // now
            else:
                frames = max(1, n_k // now)
            if n_q == n_k and not (self.dit and n_k < frames * now):  # self-attention (cross-attention: the text's)
                factor = entropy_factor(n_k, keys_at_training_size(n_k, frames * now, frames * self.train_tokens))
                if factor != 1.0:
                    args = (q * factor, *args[1:])
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)
