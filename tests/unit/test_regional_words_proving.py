"""Scoring helpers of ``benchmarks/regional_words_proving.py``: IoU, ground-truth object masks, grown boxes, halves,
and where an object of a colour was found, on masks and generator scenes with known answers."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from preprint.proving.scenes import Background, Scene, SceneObject, render

TOOL = Path(__file__).parents[2] / "benchmarks" / "regional_words_proving.py"
_spec = importlib.util.spec_from_file_location("preprint_regional_words_bench", TOOL)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def _scene(*objects: SceneObject, bg: str = "white") -> Scene:
    return Scene(tuple(objects), Background((bg,)))


def test_iou_known_overlaps():
    a = torch.zeros(10, 10)
    a[:, :5] = 1  # 50 pixels
    b = torch.zeros(10, 10)
    b[:, 3:8] = 1  # 50 pixels, 20 shared, union 80
    assert bench.iou(a, a) == 1.0
    assert bench.iou(a, b) == pytest.approx(20 / 80)
    assert bench.iou(a, 1 - a) == 0.0
    # booleans and soft values: >= 0.5 is in
    assert bench.iou(a.bool(), b.bool()) == pytest.approx(0.25)
    assert bench.iou(a * 0.6, b * 0.7) == pytest.approx(0.25)
    assert bench.iou(a * 0.4, b) == 0.0
    # the whole image against an object: the object's share of the frame
    assert bench.iou(torch.ones(10, 10), b) == pytest.approx(0.5)


def test_iou_empty_and_mismatched_masks():
    empty = torch.zeros(4, 4)
    assert bench.iou(empty, empty) == 1.0
    one = empty.clone()
    one[0, 0] = 1
    assert bench.iou(empty, one) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        bench.iou(torch.zeros(4, 4), torch.zeros(4, 5))


def test_object_mask_is_that_object_only():
    circle = SceneObject("red", "circle", (0.25, 0.5), 0.25)
    square = SceneObject("blue", "square", (0.75, 0.5), 0.25)
    scene = _scene(circle, square)
    m = bench.object_mask(scene, 0, 128, 128)
    assert m.dtype == torch.bool and m.shape == (128, 128)
    r = 0.25 * 128 / 2
    assert int(m.sum()) == pytest.approx(math.pi * r * r, rel=0.03)
    ys, xs = torch.nonzero(m, as_tuple=True)
    assert float(xs.float().mean() + 0.5) == pytest.approx(32, abs=0.5)
    assert float(ys.float().mean() + 0.5) == pytest.approx(64, abs=0.5)
    sq = bench.object_mask(scene, 1, 128, 128)
    assert int(sq.sum()) == 32 * 32
    assert not (m & sq).any()
    # exactly the pixels of the render that carry the object's colour
    red = (render(scene, 128, 128, antialias=False) - torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)).abs().sum(0) < 1e-6
    assert torch.equal(m, red)


def test_object_mask_on_other_backgrounds_and_sizes():
    obj = SceneObject("yellow", "triangle", (0.5, 0.5), 0.3)
    for bg in ("white", "black", "grey"):
        m = bench.object_mask(_scene(obj, bg=bg), 0, 96, 64)
        assert m.shape == (64, 96)
        # an upright triangle fills half its bounding box
        side = 0.3 * 64
        assert int(m.sum()) == pytest.approx(0.5 * side * side * math.sqrt(3) / 2, rel=0.06)


def test_grown_box():
    m = torch.zeros(20, 30, dtype=torch.bool)
    m[5:8, 10:12] = True
    box = bench.grown_box(m, 2)
    assert box.shape == (1, 20, 30)
    want = torch.zeros(1, 20, 30)
    want[:, 3:10, 8:14] = 1
    assert torch.equal(box, want)
    edge = torch.zeros(20, 30, dtype=torch.bool)
    edge[0, 29] = True
    assert torch.equal(torch.nonzero(bench.grown_box(edge, 3)[0]).amin(0), torch.tensor([0, 26]))
    assert int(bench.grown_box(edge, 3).sum()) == 4 * 4  # clipped at the top and right
    with pytest.raises(ValueError, match="empty"):
        bench.grown_box(torch.zeros(4, 4, dtype=torch.bool), 1)


def test_half_masks_split_the_frame():
    left, right = bench.half_mask("left", 128), bench.half_mask("right", 128)
    assert left[:, :64].eq(1).all() and left[:, 64:].eq(0).all()
    assert torch.equal(left + right, torch.ones(128, 128))


def test_placed_in_finds_the_colour_and_its_half():
    # x and y halves disagree for both objects: the left / right halves are read along x
    scene = _scene(SceneObject("red", "circle", (0.2, 0.75), 0.25), SceneObject("blue", "square", (0.8, 0.25), 0.2))
    image = render(scene, 128, 128)
    assert bench.placed_in(image, "red", "left") == (True, True)
    assert bench.placed_in(image, "red", "right") == (True, False)
    assert bench.placed_in(image, "blue", "right") == (True, True)
    assert bench.placed_in(image, "green", "left") == (False, False)


def test_largest_of_takes_the_largest_and_respects_shape_and_region():
    scene = _scene(SceneObject("red", "circle", (0.2, 0.3), 0.16), SceneObject("red", "square", (0.75, 0.7), 0.3))
    image = render(scene, 128, 128)
    big = bench.largest_of(image, "red")
    assert big.shape == "square" and big.centre[0] > 0.5
    assert bench.largest_of(image, "red", "circle").centre[0] < 0.5
    assert bench.largest_of(image, "red", within=bench.half_mask("left", 128)).shape == "circle"
    assert bench.largest_of(image, "red", "square", within=bench.half_mask("left", 128)) is None
    assert bench.largest_of(image, "blue") is None


def test_absent_colour_and_recoloured():
    scene = _scene(SceneObject("red", "circle", (0.2, 0.3), 0.2), SceneObject("green", "square", (0.7, 0.7), 0.2))
    assert bench.absent_colour(scene, 0) not in {"red", "green"}
    assert bench.absent_colour(scene, 1) not in {"red", "green"}
    changed = bench.recoloured(scene, 1, "blue")
    assert [o.colour for o in changed.objects] == ["red", "blue"]
    assert changed.objects[1].centre == scene.objects[1].centre and scene.objects[1].colour == "green"


def test_two_object_scenes_have_distinct_words():
    scenes = bench.two_object_scenes(12, seed=3)
    assert len(scenes) == 12
    for s in scenes:
        a, b = s.objects
        assert a.colour != b.colour and a.shape != b.shape
        assert len(s.background.colours) == 1
    assert scenes == bench.two_object_scenes(12, seed=3)  # seeded


def test_grid_ceiling_grows_with_the_grid_and_fits_cell_aligned_objects():
    # a square filling exactly one latent/4 cell (32 px at 128 px: a 4x4 grid) against one straddling four cells
    aligned = torch.zeros(128, 128, dtype=torch.bool)
    aligned[32:64, 32:64] = True
    straddling = torch.zeros(128, 128, dtype=torch.bool)
    straddling[48:80, 48:80] = True
    a, s = bench.grid_ceiling(aligned, 128), bench.grid_ceiling(straddling, 128)
    assert 0.3 < a <= 1.0 and 0.0 < s < a
    # the same object at 256 px sits on an 8x8 grid: a finer grid fits it better
    big = torch.zeros(256, 256, dtype=torch.bool)
    big[96:160, 96:160] = True
    assert bench.grid_ceiling(big, 256) > s


def test_background_share():
    scene = _scene(SceneObject("red", "square", (0.5, 0.5), 0.25), bg="grey")
    image = render(scene, 128, 128, antialias=False)
    assert bench.background_share(image, "grey") == pytest.approx(1 - 32 * 32 / 128 ** 2)
    assert bench.background_share(image, "white") == 0.0
    assert bench.background_share(torch.rand(3, 64, 64) * 0.1 + 0.45, "grey") == 1.0
