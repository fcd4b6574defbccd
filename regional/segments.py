"""LIME's automatic region of interest: segments of the UNet's own features, picked by the edit words' attention.

Simsar et al., "LIME: Localized Image Editing via Attention Regularization in Diffusion Models", arXiv:2312.09256,
section "Edit Localization". The image is segmented by clustering intermediate features of the UNet, fused over
several resolutions (each resolution separates different parts of a scene, their fusion is more robust); the edit
words' cross-attention map marks its 100 most attended pixels, and the RoI is the union of the segments those
pixels fall in. Plain torch; the host records the features and the attention and passes them in.

Our reading where the paper leaves a choice open, each made in one place below:

- Features: the input of every decoder block, averaged over the model calls of the short pass, each block resampled
  (bilinear) to the latent's own grid and L2-normalised per position, so every block weighs the same whatever its
  width; a block wider than ``PROJECTED`` channels is first projected to that many by a fixed random matrix (seeded;
  distances are kept in expectation), which bounds memory at any image size.
- Clustering: k-means (k-means++ seeding from a seeded generator, Lloyd iterations until no label changes), each
  image of a batch on its own, 8 segments by default (the paper's 8 clusters).
- "The 100 most attended pixels" were counted on a 512 px image (a 64x64 latent grid): here a fraction of the grid,
  ``top_fraction`` = 100 / 4096 by default, at least one pixel, so a 1024 px or a 128 px image keeps the share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

PROJECTED = 64  # channels kept per decoder block (random projection) before the blocks are joined
PAPER_TOP_FRACTION = 100 / 4096  # the paper's 100 most attended pixels of a 64x64 latent (512 px)


class SegmentError(ValueError):
    """Bad input to the segmentation (wrong shapes, no features)."""


def fuse_features(features: Sequence[torch.Tensor], height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Join per-block feature maps ``[B, C_i, h_i, w_i]`` into ``[B, sum C'_i, height, width]``: each resampled to
    the grid, wide blocks projected to ``PROJECTED`` channels by a fixed random matrix, each L2-normalised per
    position (a block with all-zero features at a position contributes zeros there)."""
    if not features:
        raise SegmentError("no decoder-block features were recorded; the model ran no decoder block.")
    batch = features[0].shape[0]
    g = torch.Generator().manual_seed(int(seed))
    parts = []
    for f in features:
        if f.ndim != 4 or f.shape[0] != batch:
            raise SegmentError(f"feature maps must be [batch, channels, h, w] with one batch size; got "
                               f"{list(f.shape)} next to batch {batch}.")
        f = f.float()
        if f.shape[1] > PROJECTED:
            proj = torch.randn(PROJECTED, f.shape[1], generator=g) / math.sqrt(PROJECTED)
            f = torch.einsum("oc,bchw->bohw", proj.to(f.device), f)
        if f.shape[-2:] != (height, width):
            f = F.interpolate(f, size=(height, width), mode="bilinear", align_corners=False)
        parts.append(F.normalize(f, dim=1))
    return torch.cat(parts, dim=1)


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, max_iters: int = 100) -> torch.Tensor:
    """Labels ``[N]`` of the rows of ``x`` ``[N, C]`` in ``min(k, N)`` clusters: k-means++ seeding, then Lloyd
    iterations until no label changes (or ``max_iters``). Deterministic for a given generator."""
    n = x.shape[0]
    if n == 0:
        raise SegmentError("nothing to cluster.")
    k = max(1, min(int(k), n))
    x = x.float()
    first = int(torch.randint(0, n, (1,), generator=generator))
    centres = [x[first]]
    d2 = (x - centres[0]).pow(2).sum(dim=1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # every point sits on a centre already: fewer distinct points than clusters
            break
        nxt = int(torch.multinomial((d2 / total).cpu(), 1, generator=generator))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, (x - x[nxt]).pow(2).sum(dim=1))
    c = torch.stack(centres)
    labels = torch.cdist(x, c).argmin(dim=1)
    for _ in range(max_iters):
        for j in range(c.shape[0]):
            members = labels == j
            if members.any():
                c[j] = x[members].mean(dim=0)
        new = torch.cdist(x, c).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def segment(features: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Segment labels ``[B, H, W]`` from fused features ``[B, C, H, W]``, each image clustered on its own."""
    b, c, h, w = features.shape
    out = []
    for i in range(b):
        g = torch.Generator().manual_seed(int(seed) + i)
        out.append(kmeans(features[i].reshape(c, h * w).T, k, g).reshape(h, w))
    return torch.stack(out)


def top_points(attention: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean ``[B, H, W]``: each map's ``ceil(fraction * H * W)`` most attended pixels (at least one)."""
    b, h, w = attention.shape
    count = max(1, min(h * w, math.ceil(float(fraction) * h * w)))
    flat = attention.reshape(b, -1).float()
    idx = flat.topk(count, dim=1).indices
    picked = torch.zeros_like(flat, dtype=torch.bool)
    picked.scatter_(1, idx, True)
    return picked.reshape(b, h, w)


def region_of_interest(labels: torch.Tensor, attention: torch.Tensor, fraction: float = PAPER_TOP_FRACTION
                       ) -> torch.Tensor:
    """The RoI ``[B, H, W]`` (0 / 1): the union of the segments in which the words' most attended pixels fall.
    ``labels`` and ``attention`` share the grid (resample the map before calling)."""
    if labels.shape != attention.shape:
        raise SegmentError(f"segments {list(labels.shape)} and attention map {list(attention.shape)} must share "
                           "the grid.")
    points = top_points(attention, fraction)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    for i in range(labels.shape[0]):
        chosen = labels[i][points[i]].unique()
        out[i] = torch.isin(labels[i], chosen).float()
    return out


class FeatureRecorder:
    """A UNet ``output_block_patch`` that leaves the block's input alone and sums it (positive rows only, on the
    CPU) per decoder block over the calls of a pass: the features :func:`fuse_features` joins."""

    def __init__(self):
        self.total: dict = {}
        self.count: dict = {}

    def __call__(self, h, hsp, transformer_options):
        from .runtime import positive_rows

        rows = positive_rows(transformer_options, h.shape[0])
        if rows:
            key = transformer_options.get("block", ("output", len(self.total)))
            f = h[torch.tensor(rows, device=h.device)].detach().float().cpu()
            if key in self.total and self.total[key].shape != f.shape:
                raise SegmentError("the decoder features changed shape within one pass.")
            self.total[key] = self.total.get(key, 0) + f
            self.count[key] = self.count.get(key, 0) + 1
        return h, hsp

    def features(self) -> list[torch.Tensor]:
        """Mean input of each decoder block, in a fixed order (the blocks' keys sorted as text; each block's random
        projection in :func:`fuse_features` follows this order)."""
        return [self.total[k] / self.count[k] for k in sorted(self.total, key=lambda k: tuple(map(str, k)))]


def region_mask(roi: torch.Tensor, height: int, width: int, blur: float) -> torch.Tensor:
    """The region ``[B, h, w]`` (0 / 1) at pixel size: each grid cell a block of pixels (nearest), then, with
    ``blur`` > 0 (pixels), a Gaussian blur cut at 0.5, which rounds the blocky edges without growing the region."""
    from .word_attention import gaussian_blur

    up = F.interpolate(roi.unsqueeze(1).float(), size=(height, width), mode="nearest").squeeze(1)
    return up if blur <= 0 else (gaussian_blur(up, blur) >= 0.5).float()
