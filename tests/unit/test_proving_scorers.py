"""Proving-ground scorers, calibrated on the generator's own images: ground truth must score (near) perfect,
and each metric must move when what it measures is taken away."""

from __future__ import annotations

import pytest
import torch

from preprint.proving import scorers
from preprint.proving.metrics import (
    distribution_distance,
    diversity,
    preservation_error,
    prompt_adherence,
    region_accuracy,
    repetition_count,
)
from preprint.proving.scenes import Background, Scene, SceneObject, parse_caption, render, sample_batch, sample_scene
from preprint.proving.scorers import classify_shape, connected_components, detect_background, detect_objects

from .conftest import gen

pytestmark = pytest.mark.usefixtures("one_thread")


SIZES = [(128, 128), (192, 128)]


@pytest.mark.parametrize("size", SIZES)
def test_detections_equal_the_ground_truth(size):
    width, height = size
    g = gen(10)
    for _ in range(40):
        scene = sample_scene(g)
        found = detect_objects(render(scene, width, height))
        assert sorted((d.colour, d.shape) for d in found) == sorted((o.colour, o.shape) for o in scene.objects)
        for o in scene.objects:
            (d,) = [d for d in found if d.colour == o.colour]
            assert abs(d.centre[0] - o.centre[0]) * width <= 1.0 and abs(d.centre[1] - o.centre[1]) * height <= 1.0


@pytest.mark.parametrize("size", SIZES)
def test_generated_scenes_adhere_perfectly(size):
    g = gen(11)
    for _ in range(40):
        scene = sample_scene(g)
        score = prompt_adherence(render(scene, *size), scene.spec())
        assert score.overall == 1.0, (scene.caption(), score)
        assert score.colour == score.shape == score.count == score.position == score.background == 1.0


def test_adherence_drops_for_what_is_missing_or_wrong():
    scene = Scene((SceneObject("red", "circle", (0.25, 0.5), 0.3), SceneObject("blue", "square", (0.75, 0.5), 0.3)),
                  Background(("white",)))
    image = render(scene)
    assert prompt_adherence(image, scene.spec()).overall == 1.0
    swapped = prompt_adherence(image, parse_caption("a red circle to the right of a blue square"))
    assert swapped.position == 0.0 and swapped.shape == 1.0
    wrong_shape = prompt_adherence(image, parse_caption("a red triangle to the left of a blue square"))
    assert wrong_shape.shape == 0.5 and wrong_shape.position == 1.0
    missing = prompt_adherence(image, parse_caption("a red circle, a blue square and a green square"))
    assert missing.colour == pytest.approx(2 / 3) and missing.count == pytest.approx(2 / 3)
    extra = prompt_adherence(image, parse_caption("a red circle on a black background"))
    assert extra.count == 0.5 and extra.background == 0.0


def test_shape_classifier_by_fill_ratio():
    assert classify_shape(1.0, 1.0) == "square"
    assert classify_shape(torch.pi / 4, 1.0) == "circle"
    assert classify_shape(0.5, 1.15) == "triangle"
    assert classify_shape(0.1, 1.0) == "unknown" and classify_shape(1.0, 4.0) == "unknown"


def test_connected_components_follow_winding_shapes():
    classes = torch.full((40, 40), -1)
    classes[2:38, 2] = 0  # a snake: long paths need many propagation rounds without pointer jumping
    classes[37, 2:38] = 0
    classes[2:38, 37] = 0
    classes[2, 6:38] = 0
    classes[2:34, 6] = 0
    classes[10, 10] = 1  # diagonal neighbours are one component (8-connectivity)
    classes[11, 11] = 1
    classes[20:25, 20:25] = 2
    classes[20:25, 25:30] = 1  # touching but of another colour: separate
    labels, n = connected_components(classes)
    assert n == 4
    assert labels[2, 2] == labels[33, 6] and labels[10, 10] == labels[11, 11]
    assert labels[22, 22] != labels[22, 27]
    assert (labels > 0).sum() == (classes >= 0).sum()


def test_large_images_are_scored_too():
    objects = (SceneObject("green", "triangle", (0.3, 0.3), 0.25), SceneObject("orange", "circle", (0.7, 0.7), 0.2))
    scene = Scene(objects, Background(("grey",)))
    image = render(scene, 1024, 1024)
    assert prompt_adherence(image, scene.spec()).overall == 1.0
    assert len(detect_objects(image, work_side=None)) == 2


def test_background_detection():
    for bg in (Background(("black",)), Background(("grey", "white"), "vertical"),
               Background(("black", "grey"), "horizontal")):
        scene = Scene((SceneObject("red", "square", (0.5, 0.5), 0.3),), bg)
        assert detect_background(render(scene, 160, 128)) == bg
    assert detect_background(torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1).expand(3, 32, 32)) is None


def test_region_accuracy():
    scene = Scene((SceneObject("red", "circle", (0.25, 0.5), 0.3), SceneObject("blue", "square", (0.75, 0.5), 0.3)),
                  Background(("white",)))
    image = render(scene)
    left = torch.zeros(64, 64)  # any mask size: resized to the image
    left[:, :32] = 1
    score = region_accuracy(image, left, parse_caption("a red circle"))
    assert score.inside == 1.0 and score.leak == 0.0 and score.overall == 1.0
    wrong = region_accuracy(image, left, parse_caption("a blue square"))
    assert wrong.inside < 1.0 and wrong.leak == 1.0 and wrong.overall == 0.0
    half = torch.zeros(128, 128)
    half[:64] = 1  # cuts the red circle in two: half its pixels leak below the mask
    assert region_accuracy(image, half, parse_caption("a red circle")).leak == pytest.approx(0.5, abs=0.03)


def test_repetition_count():
    twice = Scene((SceneObject("red", "circle", (0.25, 0.3), 0.25), SceneObject("red", "circle", (0.75, 0.7), 0.25),
                   SceneObject("blue", "square", (0.75, 0.25), 0.2)), Background(("white",)))
    rep = repetition_count(render(twice, 256, 256), parse_caption("a red circle"))
    assert (rep.asked, rep.found, rep.excess) == (1, 2, 1)
    once = repetition_count(render(Scene(twice.objects[:1]), 256, 256), parse_caption("a red circle"))
    assert (once.found, once.excess) == (1, 0)


def test_preservation_error():
    image = render(sample_scene(gen(12)))
    mask = torch.zeros(128, 128)
    mask[:64] = 1
    assert preservation_error(image, image.clone(), mask) == 0.0
    edited = image.clone()
    edited[:, :64] = 1 - edited[:, :64]  # inside the mask: free to change
    assert preservation_error(image, edited, mask) == 0.0
    changed = image.clone()
    changed[:, 96:, :] = 0.25  # a known change outside
    expected = float((image[:, 96:] - 0.25).abs().sum() / (3 * 64 * 128))
    assert preservation_error(image, changed, mask) == pytest.approx(expected, rel=1e-5)
    assert preservation_error(image, changed) == pytest.approx(expected / 2, rel=1e-5)


def test_diversity():
    images, _, _ = sample_batch(6, gen(13))
    same = images[:1].expand(4, -1, -1, -1)
    assert diversity(same) == 0.0 and diversity(same, "layout") == 0.0
    assert diversity(images) > 0.1 and diversity(images, "layout") > 0.5


def test_distribution_distance_separates_sets():
    # Independent draws differ only by sampling noise, which total variation turns into a small positive
    # bias (about 0.18 at 32 images a set, 0.08 at 64).
    a, _, _ = sample_batch(64, gen(14))
    b, _, _ = sample_batch(64, gen(15))
    assert distribution_distance(a, b).overall < 0.15
    noise = torch.rand(16, 3, 128, 128, generator=gen(16))
    assert distribution_distance(a, noise).overall > 0.8
    flat = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1).expand(16, 3, 128, 128)
    assert distribution_distance(a, flat).overall > 0.6
    assert distribution_distance(a, a).overall == 0.0


def test_scorer_thresholds_are_consistent():
    # The ideal fills of the three shapes sit on the right sides of the classifier's boundaries.
    assert 0.5 < scorers.TRIANGLE_FILL < torch.pi / 4 < scorers.SQUARE_FILL < 1.0
