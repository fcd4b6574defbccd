"""Procedural captioned scenes: flat-coloured shapes on a plain or two-tone background (pure torch).

A :class:`Scene` is the ground truth (objects with colour, shape, centre and size; the background),
laid out in normalised coordinates so the same scene rasterises at any width x height. Captions are
plain English ("a red circle to the left of a blue square on a white background"); :func:`parse_caption`
turns such a caption (or a hand-written prompt in the same words) into a :class:`SceneSpec` that the
scorers check images against, and :func:`scene_from_spec` draws a scene that satisfies a spec.

Conventions: x grows to the right and y downwards, both in ``[0, 1]`` of the frame's width and height;
an object's ``size`` is its bounding-box width as a fraction of the frame's shorter side (a circle's
diameter, a square's side, an upright equilateral triangle's base), so shapes never stretch with the
aspect ratio. All randomness comes from the ``torch.Generator`` passed in, never the global RNG.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .palette import (
    BACKGROUND_COLOURS,
    CELL_PHRASES,
    COLOUR_SYNONYMS,
    OBJECT_COLOURS,
    PHRASE_CELLS,
    RELATIONS,
    SHAPES,
    cell_of,
    rgb,
)

TRAINING_SIZE = 128
TRIANGLE_HEIGHT = math.sqrt(3) / 2  # of its base: an upright equilateral triangle
SIZE_RANGE = (0.16, 0.34)
# Gap kept between bounding boxes (fraction of the shorter side): anti-aliased edges of two
# neighbours must never touch, or the scorers would see one object.
GAP = 0.04
MARGIN = 0.02


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    centre: tuple[float, float]  # bounding-box centre, normalised (x, y)
    size: float  # bounding-box width over the frame's shorter side

    @property
    def height(self) -> float:
        return self.size * TRIANGLE_HEIGHT if self.shape == "triangle" else self.size


@dataclass(frozen=True)
class Background:
    colours: tuple[str, ...] = ("white",)  # one colour, or two for a split background
    split: str | None = None  # "vertical" (left | right) or "horizontal" (top / bottom) when two-tone

    def phrase(self) -> str:
        if len(self.colours) == 1:
            return f"a {self.colours[0]} background"
        joiner = "and" if self.split == "vertical" else "over"
        return f"a {self.colours[0]} {joiner} {self.colours[1]} background"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Background = field(default_factory=Background)

    def caption(self) -> str:
        return caption_of(self)

    def spec(self) -> SceneSpec:
        return parse_caption(self.caption())


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    cell: tuple[int, int] | None = None  # asked 3x3 cell (row, col), if the prompt names one


@dataclass(frozen=True)
class Relation:
    first: int  # index into SceneSpec.objects
    relation: str  # one of palette.RELATIONS
    second: int


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt asks for: objects (one entry per instance), pairwise relations, a background."""

    objects: tuple[ObjectSpec, ...]
    relations: tuple[Relation, ...] = ()
    background: Background | None = None


# ----------------------------------------------------------------------------------------- captions


def relation_between(a: SceneObject, b: SceneObject) -> str:
    """The relation word for "a <relation> b", along the axis where they are furthest apart."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _object_phrase(o: SceneObject | ObjectSpec) -> str:
    return f"a {o.colour} {o.shape}"


def caption_of(scene: Scene) -> str:
    objs = scene.objects
    bg = f"on {scene.background.phrase()}"
    if len(objs) == 2:
        return f"{_object_phrase(objs[0])} {relation_between(objs[0], objs[1])} {_object_phrase(objs[1])} {bg}"
    parts = [f"{_object_phrase(o)} {CELL_PHRASES[cell_of(*o.centre)]}" for o in objs]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body} {bg}"


_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_COLOUR_WORDS = "|".join(sorted([*OBJECT_COLOURS, *COLOUR_SYNONYMS], key=len, reverse=True))
_BG_WORDS = "white|black|grey|gray"
_OBJ = rf"({'|'.join(_COUNTS)})\s+({_COLOUR_WORDS})\s+({'|'.join(SHAPES)})s?"
_POS = "|".join(re.escape(p) for p in sorted(PHRASE_CELLS, key=len, reverse=True))
_REL = "|".join(re.escape(r) for r in RELATIONS)
_BG_RE = re.compile(rf"\s+on\s+an?\s+({_BG_WORDS})(?:\s+(and|over)\s+({_BG_WORDS}))?\s+background$")
_SINGLE_RE = re.compile(rf"^{_OBJ}(?:\s+({_POS}))?$")
_PAIR_RE = re.compile(rf"^{_OBJ}\s+({_REL})\s+{_OBJ}$")


def _canonical(colour: str) -> str:
    return COLOUR_SYNONYMS.get(colour, colour)


def parse_caption(text: str) -> SceneSpec:
    """Read a caption in the generator's grammar into a :class:`SceneSpec`.

    Accepted: ``<objects> [on a <bg> background]`` where ``<objects>`` is either one object phrase with an
    optional position ("two red circles in the top left"), a pair with a relation ("a red circle above
    a blue square"), or a list of positioned phrases joined by commas and "and". A two-tone background
    reads "a white and grey background" (left | right) or "a white over grey background" (top / bottom).
    """
    s = " ".join(text.lower().strip().rstrip(".").split())
    background = None
    m = _BG_RE.search(s)
    if m:
        first, joiner, second = m.groups()
        if second is None:
            background = Background((_canonical(first),))
        else:
            split = "vertical" if joiner == "and" else "horizontal"
            background = Background((_canonical(first), _canonical(second)), split)
        s = s[: m.start()]
    pair = _PAIR_RE.match(s)
    if pair:
        n1, c1, s1, rel, n2, c2, s2 = pair.groups()
        if _COUNTS[n1] != 1 or _COUNTS[n2] != 1:
            raise ValueError(f"caption {text!r}: a relation needs single objects on both sides")
        objects = (ObjectSpec(_canonical(c1), s1), ObjectSpec(_canonical(c2), s2))
        return SceneSpec(objects, (Relation(0, rel, 1),), background)
    objects: list[ObjectSpec] = []
    for part in re.split(r",\s*|\s+and\s+", s):
        single = _SINGLE_RE.match(part.strip())
        if not single:
            raise ValueError(
                f"caption {text!r}: cannot read {part!r}; expected e.g. 'a red circle in the top left', "
                f"colours {sorted(OBJECT_COLOURS)}, shapes {list(SHAPES)}"
            )
        count, colour, shape, pos = single.groups()
        cell = PHRASE_CELLS[pos] if pos else None
        objects.extend(ObjectSpec(_canonical(colour), shape, cell) for _ in range(_COUNTS[count]))
    return SceneSpec(tuple(objects), (), background)


# ---------------------------------------------------------------------------------------- sampling


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _choice(g: torch.Generator, items: tuple | list):
    return items[int(torch.randint(len(items), (), generator=g))]


def _separated(a: SceneObject, b: SceneObject) -> bool:
    # Checked in units of the shorter side on a square frame: a wider or taller frame only moves
    # centres further apart in those units while sizes stay, so a layout valid here is valid at any aspect.
    dx, dy = abs(a.centre[0] - b.centre[0]), abs(a.centre[1] - b.centre[1])
    return dx >= (a.size + b.size) / 2 + GAP or dy >= (a.height + b.height) / 2 + GAP


def _centre_range(extent: float, cell: int | None) -> tuple[float, float]:
    lo, hi = extent / 2 + MARGIN, 1 - extent / 2 - MARGIN
    if cell is not None:
        lo, hi = max(lo, cell / 3), min(hi, (cell + 1) / 3)
    return lo, hi


def _satisfies(objs: list[SceneObject], relations: tuple[Relation, ...]) -> bool:
    return all(relation_between(objs[r.first], objs[r.second]) == r.relation for r in relations)


def sample_background(g: torch.Generator, two_tone_probability: float = 0.25) -> Background:
    names = list(BACKGROUND_COLOURS)
    if float(torch.rand((), generator=g)) < two_tone_probability:
        order = torch.randperm(len(names), generator=g)
        split = _choice(g, ("vertical", "horizontal"))
        return Background((names[int(order[0])], names[int(order[1])]), split)
    return Background((_choice(g, names),))


def scene_from_spec(spec: SceneSpec, generator: torch.Generator, max_tries: int = 500) -> Scene:
    """A scene that satisfies ``spec`` (cells, relations, background), laid out without overlaps.

    Rejection sampling, drawing only from ``generator``; sizes shrink after every 100 failed layouts so
    crowded specs (four objects in one cell) still find room.
    """
    background = spec.background or sample_background(generator)
    lo, hi = SIZE_RANGE
    for attempt in range(max_tries):
        scale = 0.85 ** (attempt // 100)
        objs: list[SceneObject] = []
        for o in spec.objects:
            size = _uniform(generator, lo, hi) * scale
            height = size * TRIANGLE_HEIGHT if o.shape == "triangle" else size
            xr = _centre_range(size, o.cell[1] if o.cell else None)
            yr = _centre_range(height, o.cell[0] if o.cell else None)
            for _ in range(50):
                cand = SceneObject(o.colour, o.shape, (_uniform(generator, *xr), _uniform(generator, *yr)), size)
                if all(_separated(cand, p) for p in objs):
                    objs.append(cand)
                    break
            else:
                break
        if len(objs) == len(spec.objects) and _satisfies(objs, spec.relations):
            return Scene(tuple(objs), background)
    raise ValueError(f"no layout found for {spec} in {max_tries} tries")


def sample_scene(generator: torch.Generator, n_objects: int | None = None) -> Scene:
    """A random scene of 1-4 objects with distinct colours, random shapes, sizes and a background."""
    n = n_objects if n_objects is not None else int(torch.randint(1, 5, (), generator=generator))
    names = list(OBJECT_COLOURS)
    order = torch.randperm(len(names), generator=generator)[:n]
    spec = SceneSpec(tuple(ObjectSpec(names[int(i)], _choice(generator, SHAPES)) for i in order))
    return scene_from_spec(spec, generator)


def sample_captioned(generator: torch.Generator, width: int = TRAINING_SIZE, height: int = TRAINING_SIZE,
                     antialias: bool = True) -> tuple[str, Scene, torch.Tensor]:
    """One random (caption, scene, image ``[3, H, W]``) triple."""
    scene = sample_scene(generator)
    return scene.caption(), scene, render(scene, width, height, antialias)


def sample_batch(n: int, generator: torch.Generator, width: int = TRAINING_SIZE, height: int = TRAINING_SIZE,
                 antialias: bool = True) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """``n`` random scenes: images ``[n, 3, H, W]``, captions, scenes."""
    scenes = [sample_scene(generator) for _ in range(n)]
    images = torch.stack([render(s, width, height, antialias) for s in scenes])
    return images, [s.caption() for s in scenes], scenes


# ------------------------------------------------------------------------------------ rasterising


def _signed_distance(o: SceneObject, px: torch.Tensor, py: torch.Tensor, unit: float, width: int,
                     height: int) -> torch.Tensor:
    """Signed distance in pixels to the shape's edge (negative inside). Exact for circles and inside the
    others; outside corners it is the max of edge distances, which only matters beyond the AA band."""
    cx, cy = o.centre[0] * width, o.centre[1] * height
    half = o.size * unit / 2
    dx, dy = px - cx, py - cy
    if o.shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - half
    if o.shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - half
    if o.shape == "triangle":
        h = o.size * unit * TRIANGLE_HEIGHT
        length = math.hypot(h, half)
        base = dy - h / 2  # below the base is outside
        # Slanted edges run from the apex (0, -h/2) to the base corners (+-half, h/2); outward normals
        # (+-h, -half) / length.
        right = (h * dx - half * (dy + h / 2)) / length
        left = (-h * dx - half * (dy + h / 2)) / length
        return torch.maximum(base, torch.maximum(right, left))
    raise ValueError(f"unknown shape {o.shape!r}: expected one of {SHAPES}")


def render(scene: Scene, width: int = TRAINING_SIZE, height: int = TRAINING_SIZE,
           antialias: bool = True) -> torch.Tensor:
    """Rasterise a scene at ``width`` x ``height``: float ``[3, H, W]`` in ``[0, 1]``.

    Anti-aliasing takes each pixel's coverage as ``clamp(0.5 - d, 0, 1)`` of its centre's signed distance
    ``d``: a one-pixel ramp, cheap at any resolution.
    """
    unit = min(width, height)
    py = (torch.arange(height, dtype=torch.float32) + 0.5).view(-1, 1).expand(height, width)
    px = (torch.arange(width, dtype=torch.float32) + 0.5).view(1, -1).expand(height, width)
    image = _background(scene.background, width, height)
    for o in scene.objects:
        d = _signed_distance(o, px, py, unit, width, height)
        alpha = (0.5 - d).clamp(0, 1) if antialias else (d <= 0).float()
        colour = torch.tensor(rgb(o.colour)).view(3, 1, 1)
        image = image * (1 - alpha) + colour * alpha
    return image.clamp(0, 1)


def _background(bg: Background, width: int, height: int) -> torch.Tensor:
    first = torch.tensor(rgb(bg.colours[0])).view(3, 1, 1).expand(3, height, width).clone()
    if len(bg.colours) == 2:
        second = torch.tensor(rgb(bg.colours[1]))
        if bg.split == "vertical":
            first[:, :, width // 2:] = second.view(3, 1, 1)
        else:
            first[:, height // 2:, :] = second.view(3, 1, 1)
    return first


def to_comfy_image(images: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` or ``[B, 3, H, W]`` -> ComfyUI's IMAGE layout ``[B, H, W, 3]``."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    return images.permute(0, 2, 3, 1).contiguous()


def from_comfy_image(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI's IMAGE ``[B, H, W, 3]`` -> ``[B, 3, H, W]``."""
    return images[..., :3].permute(0, 3, 1, 2).contiguous()
