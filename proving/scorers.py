"""Find the objects in an image: colour segmentation, connected components, shape classification.

The pipeline reads any RGB image ``[3, H, W]`` in ``[0, 1]`` (a generator scene or a decoded model
sample): every pixel takes its nearest palette colour when it lies within ``threshold`` of it, pixels of
one object colour that touch (8-connected) form a component, components too small to be an object are
dropped as speckle, and each survivor is named a circle, square or triangle by how much of its bounding
box it fills (square 1, circle pi/4, upright triangle 1/2). :mod:`.metrics` builds the scores on this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .palette import BACKGROUND_COLOURS, OBJECT_COLOURS, palette_names, palette_tensor
from .scenes import Background

UNMATCHED = -1
# Half the closest object-colour pair's distance (orange-yellow, ~0.35) would make the threshold a strict
# Voronoi guard; a little more lets slightly-off decoded colours count while anti-aliased edge blends,
# which sit further out, stay unmatched.
DEFAULT_THRESHOLD = 0.25
DEFAULT_MIN_AREA = 0.002  # of the frame: the smallest generated object covers ~0.01
WORK_SIDE = 512  # larger images are average-pooled down to about this before labelling
# Fill-ratio boundaries between the ideal values 1/2 (triangle), pi/4 (circle) and 1 (square).
SQUARE_FILL = (1 + math.pi / 4) / 2
TRIANGLE_FILL = (0.5 + math.pi / 4) / 2
MIN_FILL = 0.3  # below: rings of edge blends or streaks, not a shape


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str  # "circle", "square", "triangle" or "unknown"
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in input pixels, end exclusive
    area: float  # fraction of the frame
    centre: tuple[float, float]  # bounding-box centre, normalised (x, y): the scenes' placement point
    centroid: tuple[float, float]  # mass centre, normalised (x, y)
    fill: float  # area over bounding-box area
    aspect: float  # bounding-box width over height


def segment(image: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Palette index per pixel (``palette_names()`` order), ``UNMATCHED`` where no colour is within
    ``threshold`` (Euclidean RGB). ``[3, H, W]`` -> long ``[H, W]``."""
    palette = palette_tensor(image.dtype).to(image.device)
    dist = torch.cdist(image.flatten(1).T, palette)  # [H*W, K]
    best, label = dist.min(dim=1)
    label = torch.where(best <= threshold, label, torch.full_like(label, UNMATCHED))
    return label.view(image.shape[1:])


def object_classes(labels: torch.Tensor) -> torch.Tensor:
    """Keep object-colour labels, set background colours and unmatched pixels to ``UNMATCHED``."""
    n_obj = len(OBJECT_COLOURS)
    return torch.where((labels >= 0) & (labels < n_obj), labels, torch.full_like(labels, UNMATCHED))


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shift(t: torch.Tensor, dy: int, dx: int, fill: int) -> torch.Tensor:
    """``t`` moved so that out[y, x] = t[y + dy, x + dx], ``fill`` beyond the border."""
    h, w = t.shape
    out = torch.full_like(t, fill)
    out[max(0, -dy): h - max(0, dy), max(0, -dx): w - max(0, dx)] = \
        t[max(0, dy): h - max(0, -dy), max(0, dx): w - max(0, -dx)]
    return out


def connected_components(classes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """8-connected components of equal, non-negative class values.

    Label propagation with pointer jumping: every pixel starts labelled with its own flat index and
    repeatedly takes the smallest label among same-class neighbours, then follows its label's label
    (``lab = lab[lab]``), which halves chain lengths each round, so compact shapes settle in a few dozen
    rounds instead of one round per pixel of diameter. Returns ``([H, W]`` long, 0 = none, 1..n; ``n)``.
    """
    h, w = classes.shape
    big = h * w
    fg = classes >= 0
    lab = torch.where(fg, torch.arange(big, device=classes.device).view(h, w), torch.full_like(classes, big))
    shifted_classes = [(_shift(classes, dy, dx, UNMATCHED), dy, dx) for dy, dx in _NEIGHBOURS]
    while True:
        new = lab
        for cls, dy, dx in shifted_classes:
            same = fg & (cls == classes)
            new = torch.where(same, torch.minimum(new, _shift(lab, dy, dx, big)), new)
        lookup = torch.cat([new.flatten(), new.new_full((1,), big)])
        for _ in range(4):
            new = lookup[new]
            lookup = torch.cat([new.flatten(), new.new_full((1,), big)])
        if torch.equal(new, lab):
            break
        lab = new
    roots, inverse = torch.unique(lab, return_inverse=True)
    has_bg = bool(roots[-1] == big) if roots.numel() else False
    n = roots.numel() - int(has_bg)
    out = (inverse + 1).view(h, w)
    return torch.where(fg, out, torch.zeros_like(out)), n


def classify_shape(fill: float, aspect: float) -> str:
    """Name a component by geometry: fill ratio of its bounding box, and a near-1 aspect for all three."""
    if fill < MIN_FILL or not 0.5 <= aspect <= 2.0:
        return "unknown"
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= TRIANGLE_FILL:
        return "circle"
    return "triangle"


def _working_copy(image: torch.Tensor, work_side: int | None) -> tuple[torch.Tensor, int]:
    factor = 1 if work_side is None else max(1, math.ceil(max(image.shape[1:]) / work_side))
    if factor == 1:
        return image, 1
    return F.avg_pool2d(image.unsqueeze(0), factor, ceil_mode=True).squeeze(0), factor


def detect_objects(image: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, min_area: float = DEFAULT_MIN_AREA,
                   work_side: int | None = WORK_SIDE) -> list[DetectedObject]:
    """Objects in ``image`` ``[3, H, W]``, largest first."""
    height, width = image.shape[1:]
    work, factor = _working_copy(image.float(), work_side)
    classes = object_classes(segment(work, threshold))
    comps, n = connected_components(classes)
    if n == 0:
        return []
    h, w = classes.shape
    flat = comps.flatten()
    ys = torch.arange(h).view(-1, 1).expand(h, w).flatten()
    xs = torch.arange(w).view(1, -1).expand(h, w).flatten()
    keep = flat > 0
    idx, ys, xs, cls = flat[keep] - 1, ys[keep], xs[keep], classes.flatten()[keep]
    area = torch.bincount(idx, minlength=n)
    big = max(h, w) + 1

    def reduce(values: torch.Tensor, how: str, init: int) -> torch.Tensor:
        return torch.full((n,), init, dtype=torch.long).scatter_reduce(0, idx, values, how, include_self=True)

    x0, x1 = reduce(xs, "amin", big), reduce(xs, "amax", -1) + 1
    y0, y1 = reduce(ys, "amin", big), reduce(ys, "amax", -1) + 1
    sx = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, xs.double() + 0.5)
    sy = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, ys.double() + 0.5)
    colour_of = torch.zeros(n, dtype=torch.long).scatter_(0, idx, cls)
    names = palette_names()
    found: list[DetectedObject] = []
    for k in range(n):
        a = int(area[k])
        if a < min_area * h * w:
            continue
        bw, bh = int(x1[k] - x0[k]), int(y1[k] - y0[k])
        fill, aspect = a / (bw * bh), bw / bh
        bbox = (min(int(x0[k]) * factor, width), min(int(y0[k]) * factor, height),
                min(int(x1[k]) * factor, width), min(int(y1[k]) * factor, height))
        found.append(DetectedObject(
            colour=names[int(colour_of[k])],
            shape=classify_shape(fill, aspect),
            bbox=bbox,
            area=a / (h * w),
            centre=(float(x0[k] + x1[k]) / 2 / w, float(y0[k] + y1[k]) / 2 / h),
            centroid=(float(sx[k]) / a / w, float(sy[k]) / a / h),
            fill=fill,
            aspect=aspect,
        ))
    return sorted(found, key=lambda o: -o.area)


def _dominant_background(labels: torch.Tensor) -> tuple[str | None, float]:
    """Most frequent background colour among ``labels`` and its share of the background pixels there."""
    names = palette_names()
    first = len(OBJECT_COLOURS)
    counts = torch.bincount(labels[labels >= first].flatten() - first, minlength=len(BACKGROUND_COLOURS))
    total = int(counts.sum())
    if total == 0:
        return None, 0.0
    best = int(counts.argmax())
    return names[first + best], int(counts[best]) / total


def detect_background(image: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> Background | None:
    """The plain or two-tone background: a split is reported when the two halves along one axis are each
    dominated (over 80 % of their background pixels) by different colours; None when no background
    colour is seen at all."""
    labels = segment(image.float(), threshold)
    h, w = labels.shape
    for split, (a, b) in (("vertical", (labels[:, : w // 2], labels[:, w // 2:])),
                          ("horizontal", (labels[: h // 2], labels[h // 2:]))):
        ca, sa = _dominant_background(a)
        cb, sb = _dominant_background(b)
        if ca and cb and ca != cb and sa > 0.8 and sb > 0.8:
            return Background((ca, cb), split)
    colour, _ = _dominant_background(labels)
    return Background((colour,)) if colour else None
