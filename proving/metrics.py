"""Scores for generated images against what was asked, built on the detections of :mod:`.scorers`.

* :func:`prompt_adherence`: colours, shapes, counts, positions and background of one image against a
  :class:`~.scenes.SceneSpec`, one number per aspect in ``[0, 1]`` and their mean.
* :func:`region_accuracy`: the asked objects appear inside a mask and their colours do not leak out.
* :func:`repetition_count`: how many objects of the asked colours appear (high-resolution repetition).
* :func:`preservation_error`: mean absolute pixel change outside an edit mask.
* :func:`diversity`: mean pairwise distance across a batch, of pixels or of object layouts.
* :func:`distribution_distance`: how far two sets of images are apart in what they show (see there).

Images are ``[3, H, W]`` (or batches ``[B, 3, H, W]``) in ``[0, 1]``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .palette import OBJECT_COLOURS, RELATIONS, SHAPES, cell_of, in_cell, palette_names
from .scenes import SceneSpec
from .scorers import (
    DEFAULT_THRESHOLD,
    UNMATCHED,
    DetectedObject,
    detect_background,
    detect_objects,
    object_classes,
    segment,
)


@dataclass(frozen=True)
class Adherence:
    colour: float  # share of asked colours that appear
    shape: float  # share of asked objects found with the asked colour and shape (one-to-one)
    count: float  # share of colours (asked or seen) whose object count is exactly what was asked
    position: float | None  # share of asked cells / relations that hold; None when none were asked
    background: float | None  # 1 when the asked background is seen; None when none was asked
    overall: float  # mean of the aspects above that apply


def _match(spec: SceneSpec, found: list[DetectedObject]) -> list[DetectedObject | None]:
    """One detection per asked object: same colour and shape first, then same colour (so a misdrawn
    shape still anchors position checks), largest first; None when nothing is left."""
    free = list(found)
    matched: list[DetectedObject | None] = [None] * len(spec.objects)
    for strict in (True, False):
        for i, want in enumerate(spec.objects):
            if matched[i] is not None:
                continue
            for d in free:
                if d.colour == want.colour and (d.shape == want.shape or not strict):
                    matched[i] = d
                    free.remove(d)
                    break
    return matched


def _positions(spec: SceneSpec, matched: list[DetectedObject | None]) -> list[bool]:
    checks: list[bool] = []
    for want, got in zip(spec.objects, matched, strict=True):
        if want.cell is not None:
            checks.append(got is not None and in_cell(*got.centre, want.cell))
    for r in spec.relations:
        a, b = matched[r.first], matched[r.second]
        checks.append(a is not None and b is not None and _relation_holds(a, r.relation, b))
    return checks


def _relation_holds(a: DetectedObject, relation: str, b: DetectedObject) -> bool:
    # Any displacement in the asked direction counts: the caption names the dominant axis, but a prompt's
    # "above" is still honoured by an object that is above and somewhat to the side.
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    return {RELATIONS[0]: dx < 0, RELATIONS[1]: dx > 0, RELATIONS[2]: dy < 0, RELATIONS[3]: dy > 0}[relation]


def adherence_of(spec: SceneSpec, found: list[DetectedObject], background=None,
                 check_positions: bool = True) -> Adherence:
    """:func:`prompt_adherence` on detections already made (``background`` as :func:`detect_background`)."""
    asked_colours = {o.colour for o in spec.objects}
    seen_colours = {d.colour for d in found}
    colour = len(asked_colours & seen_colours) / len(asked_colours) if asked_colours else 1.0
    matched = _match(spec, found)
    hits = sum(m is not None and m.shape == o.shape for o, m in zip(spec.objects, matched, strict=True))
    shape = hits / max(len(matched), 1)
    asked_n, seen_n = Counter(o.colour for o in spec.objects), Counter(d.colour for d in found)
    keys = asked_n.keys() | seen_n.keys()
    count = sum(asked_n[k] == seen_n[k] for k in keys) / len(keys) if keys else 1.0
    checks = _positions(spec, matched) if check_positions else []
    position = sum(checks) / len(checks) if checks else None
    bg = None if spec.background is None else float(background == spec.background)
    parts = [x for x in (colour, shape, count, position, bg) if x is not None]
    return Adherence(colour, shape, count, position, bg, sum(parts) / len(parts))


def prompt_adherence(image: torch.Tensor, spec: SceneSpec, threshold: float = DEFAULT_THRESHOLD) -> Adherence:
    """How well one image ``[3, H, W]`` shows what ``spec`` asks for."""
    background = detect_background(image, threshold) if spec.background is not None else None
    return adherence_of(spec, detect_objects(image, threshold), background)


def _mask_like(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A boolean ``[H, W]`` from a mask of any size (``[H, W]``, ``[1, H, W]`` or ``[1, 1, H, W]``), resized
    explicitly (nearest) and thresholded at 0.5."""
    m = mask.float()
    while m.dim() > 2:
        m = m[0]
    if m.shape != (height, width):
        m = F.interpolate(m[None, None], size=(height, width), mode="nearest")[0, 0]
    return m >= 0.5


@dataclass(frozen=True)
class RegionScore:
    inside: float  # adherence (colour, shape, count) of the objects whose centre lies in the mask
    leak: float  # share of the asked colours' pixels that lie outside the mask
    overall: float  # inside * (1 - leak)


def region_accuracy(image: torch.Tensor, mask: torch.Tensor, spec: SceneSpec,
                    threshold: float = DEFAULT_THRESHOLD) -> RegionScore:
    """Whether the objects of ``spec`` were drawn inside ``mask`` (1 = the region) and nowhere else.
    Positions in ``spec`` are ignored: the region is the position."""
    h, w = image.shape[1:]
    region = _mask_like(mask, h, w)
    inside = []
    for d in detect_objects(image, threshold):
        cx, cy = min(int(d.centre[0] * w), w - 1), min(int(d.centre[1] * h), h - 1)
        if region[cy, cx]:
            inside.append(d)
    score = adherence_of(SceneSpec(spec.objects), inside, check_positions=False)
    classes = object_classes(segment(image.float(), threshold))
    names = palette_names()
    asked = torch.zeros_like(region)
    for colour in {o.colour for o in spec.objects}:
        asked |= classes == names.index(colour)
    total = int(asked.sum())
    leak = int((asked & ~region).sum()) / total if total else 0.0
    return RegionScore(score.overall, leak, score.overall * (1 - leak))


@dataclass(frozen=True)
class Repetition:
    asked: int  # objects the spec asks for
    found: int  # objects of the asked colours in the image, any shape
    excess: int  # found - asked, floored at 0: the repeated copies


def repetition_count(image: torch.Tensor, spec: SceneSpec, threshold: float = DEFAULT_THRESHOLD) -> Repetition:
    """Count objects of the asked colours: at a resolution beyond training, a model that tiles its
    training distribution draws the same object several times."""
    colours = {o.colour for o in spec.objects}
    found = sum(d.colour in colours for d in detect_objects(image, threshold))
    return Repetition(len(spec.objects), found, max(found - len(spec.objects), 0))


def preservation_error(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean absolute pixel change outside ``mask`` (1 = the edited region; None: the whole image), over
    channels and batch. 0 means everything outside the edit survived untouched."""
    if before.shape != after.shape:
        raise ValueError(f"preservation_error: images differ in shape, {tuple(before.shape)} vs {tuple(after.shape)}")
    diff = (after.float() - before.float()).abs()
    if diff.dim() == 3:
        diff = diff.unsqueeze(0)
    if mask is None:
        return float(diff.mean())
    keep = ~_mask_like(mask, *diff.shape[-2:])
    if not keep.any():
        return 0.0
    return float(diff[..., keep].mean())


def layout_descriptor(image: torch.Tensor, grid: int = 8, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Share of each grid cell covered by each object colour, ``[C, grid, grid]``: what is where,
    independent of resolution and background."""
    classes = object_classes(segment(image.float(), threshold))
    onehot = torch.stack([(classes == c).float() for c in range(len(OBJECT_COLOURS))])
    return F.adaptive_avg_pool2d(onehot.unsqueeze(0), grid).squeeze(0)


def diversity(images: torch.Tensor, mode: str = "pixels") -> float:
    """Mean pairwise distance across a batch ``[B, 3, H, W]`` (0 when all images are the same).

    ``"pixels"``: mean absolute difference of the images pooled to 32x32. ``"layout"``: the Bray-Curtis
    distance ``sum|a - b| / sum(a + b)`` of :func:`layout_descriptor`, 0 for the same objects in the same
    places, 1 for nothing in common.
    """
    if images.shape[0] < 2:
        raise ValueError("diversity needs at least two images")
    if mode == "pixels":
        feats = F.adaptive_avg_pool2d(images.float(), 32).flatten(1)
        dists = torch.cdist(feats, feats, p=1) / feats.shape[1]
    elif mode == "layout":
        feats = torch.stack([layout_descriptor(im) for im in images]).flatten(1)
        sums = feats.sum(1)
        dists = torch.cdist(feats, feats, p=1) / (sums[:, None] + sums[None, :]).clamp_min(1e-8)
    else:
        raise ValueError(f"diversity: unknown mode {mode!r}, expected 'pixels' or 'layout'")
    n = images.shape[0]
    return float(dists.sum() / (n * (n - 1)))


SIZE_BINS = (0.01, 0.02, 0.04, 0.08, 0.16)  # object area as a fraction of the frame
MAX_COUNT = 6  # images with more objects share the last count bin


@dataclass(frozen=True)
class DistributionDistance:
    pixel_colour: float  # palette colour histogram of all pixels (unmatched pixels a bin of their own)
    object_count: float  # objects per image, 0..MAX_COUNT
    object_colour: float
    object_shape: float  # circle / square / triangle / unknown
    object_size: float  # area bins SIZE_BINS
    object_cell: float  # 3x3 cell of the object's centre
    overall: float  # mean of the six


def _histograms(images: torch.Tensor, threshold: float) -> list[torch.Tensor]:
    n_pal = len(palette_names())
    shapes = [*SHAPES, "unknown"]
    obj_names = list(OBJECT_COLOURS)
    hists = [torch.zeros(n_pal + 1), torch.zeros(MAX_COUNT + 1), torch.zeros(len(obj_names)),
             torch.zeros(len(shapes)), torch.zeros(len(SIZE_BINS) + 1), torch.zeros(9)]
    for image in images:
        labels = segment(image.float(), threshold)
        hists[0] += torch.bincount(torch.where(labels == UNMATCHED, n_pal, labels).flatten(),
                                   minlength=n_pal + 1).float() / labels.numel()
        found = detect_objects(image, threshold)
        hists[1][min(len(found), MAX_COUNT)] += 1
        for d in found:
            hists[2][obj_names.index(d.colour)] += 1
            hists[3][shapes.index(d.shape)] += 1
            hists[4][sum(d.area >= b for b in SIZE_BINS)] += 1
            row, col = cell_of(*d.centre)
            hists[5][row * 3 + col] += 1
    return hists


def _total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    # An empty histogram (no objects at all in a set) is as far as possible from a non-empty one.
    if p.sum() == 0 or q.sum() == 0:
        return 0.0 if p.sum() == q.sum() else 1.0
    return float(0.5 * (p / p.sum() - q / q.sum()).abs().sum())


def distribution_distance(images_a: torch.Tensor, images_b: torch.Tensor,
                          threshold: float = DEFAULT_THRESHOLD) -> DistributionDistance:
    """How far apart two sets of images ``[N, 3, H, W]`` are in what they show.

    Six histograms are pooled over each set: the palette colour of every pixel, the number of objects
    per image, and the colour, shape, size bin and 3x3 cell of every detected object. Each pair of
    histograms is compared by total variation distance (half the L1 distance of the normalised
    histograms: 0 for the same distribution, 1 for disjoint supports), and ``overall`` is their mean. It
    is a coarse, interpretable stand-in for FID on this scene domain: two independent draws of the
    generator land near 0 (sampling noise shrinks with set size), images without palette objects near 1.
    """
    ha, hb = _histograms(images_a, threshold), _histograms(images_b, threshold)
    parts = [_total_variation(p, q) for p, q in zip(ha, hb, strict=True)]
    return DistributionDistance(*parts, overall=sum(parts) / len(parts))
