"""Proving-ground scenes: seeded layouts without overlaps, truthful captions, rasterising at any size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from preprint.proving.palette import OBJECT_COLOURS, cell_of
from preprint.proving.scenes import (
    Background,
    ObjectSpec,
    Relation,
    Scene,
    SceneObject,
    from_comfy_image,
    parse_caption,
    relation_between,
    render,
    sample_batch,
    sample_scene,
    scene_from_spec,
    to_comfy_image,
)

from .conftest import gen

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = sample_scene(gen(3)), sample_scene(gen(3))
    assert a == b
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len({sample_scene(gen(s)) for s in range(20)}) == 20


def test_random_scenes_cover_the_vocabulary():
    g = gen(0)
    scenes = [sample_scene(g) for _ in range(200)]
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    assert {o.shape for s in scenes for o in s.objects} == {"circle", "square", "triangle"}
    assert {o.colour for s in scenes for o in s.objects} == set(OBJECT_COLOURS)
    assert {s.background.colours[0] for s in scenes} == {"white", "black", "grey"}
    assert any(len(s.background.colours) == 2 for s in scenes)
    for s in scenes:  # distinct colours per scene, so captions name each object unambiguously
        assert len({o.colour for o in s.objects}) == len(s.objects)


@pytest.mark.parametrize("size", [(128, 128), (192, 128), (96, 160)])
def test_objects_never_touch_at_any_aspect(size):
    width, height = size
    g = gen(1)
    for _ in range(30):
        scene = sample_scene(g, n_objects=4)
        masks = []
        for o in scene.objects:
            alone = render(Scene((o,), Background(("black",))), width, height)
            covered = (alone.sum(0) > 0).float()
            # Dilated by a pixel: neighbours must not even share an anti-aliased edge.
            masks.append(F.max_pool2d(covered[None, None], 3, 1, 1)[0, 0] > 0)
            assert covered.sum() > 50
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert not (masks[i] & masks[j]).any()


def test_render_range_layout_and_round_circles_on_wide_frames():
    circle = Scene((SceneObject("red", "circle", (0.5, 0.5), 0.5),), Background(("white",)))
    image = render(circle, 192, 128)
    assert image.shape == (3, 128, 192) and 0 <= image.min() and image.max() <= 1
    red = (image - torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)).abs().sum(0) < 0.05
    ys, xs = torch.nonzero(red, as_tuple=True)
    # size is relative to the shorter side: 0.5 * 128 = 64 px across in both directions
    assert abs((xs.max() - xs.min() + 1) - 64) <= 1 and abs((ys.max() - ys.min() + 1) - 64) <= 1
    assert abs(float(xs.float().mean()) + 0.5 - 96) < 0.5
    hard = render(circle, 64, 64, antialias=False)
    assert hard.flatten(1).unique(dim=1).shape[1] == 2  # no anti-aliasing: background and red only


def test_two_tone_background_splits_where_it_says():
    image = render(Scene((), Background(("white", "black"), "vertical")), 40, 20)
    assert image[:, :, :20].min() == 1 and image[:, :, 20:].max() == 0
    image = render(Scene((), Background(("grey", "white"), "horizontal")), 20, 40)
    assert torch.allclose(image[:, :20], torch.tensor(0.5)) and image[:, 20:].min() == 1


def test_captions_tell_the_truth():
    g = gen(2)
    for _ in range(100):
        scene = sample_scene(g)
        spec = parse_caption(scene.caption())
        assert [(o.colour, o.shape) for o in spec.objects] == [(o.colour, o.shape) for o in scene.objects]
        assert spec.background == scene.background
        if len(scene.objects) == 2:
            (rel,) = spec.relations
            assert relation_between(scene.objects[0], scene.objects[1]) == rel.relation
        else:
            assert [o.cell for o in spec.objects] == [cell_of(*o.centre) for o in scene.objects]


def test_parse_caption_grammar():
    spec = parse_caption("Two red circles in the top left and a magenta square on a gray background.")
    assert spec.objects == (ObjectSpec("red", "circle", (0, 0)),) * 2 + (ObjectSpec("purple", "square"),)
    assert spec.background == Background(("grey",))
    spec = parse_caption("a red circle above a blue square on a white over black background")
    assert spec.relations == (Relation(0, "above", 1),)
    assert spec.background == Background(("white", "black"), "horizontal")
    assert parse_caption("a green triangle").background is None
    with pytest.raises(ValueError, match="cannot read"):
        parse_caption("a red hexagon in the top left")


def test_scene_from_spec_honours_cells_and_relations():
    g = gen(4)
    cells = parse_caption("a red circle in the top right, a blue square at the bottom and a cyan triangle on the left")
    for _ in range(10):
        scene = scene_from_spec(cells, g)
        assert [cell_of(*o.centre) for o in scene.objects] == [(0, 2), (2, 1), (1, 0)]
    pair = parse_caption("a yellow square below a green circle on a black background")
    for _ in range(10):
        scene = scene_from_spec(pair, g)
        assert scene.objects[0].centre[1] > scene.objects[1].centre[1]
        assert scene.background == Background(("black",))
    crowded = parse_caption("four orange squares in the centre")
    assert len(scene_from_spec(crowded, g).objects) == 4


def test_batches_and_comfy_layout():
    images, captions, scenes = sample_batch(3, gen(5), width=64, height=48)
    assert images.shape == (3, 3, 48, 64) and len(captions) == len(scenes) == 3
    comfy = to_comfy_image(images)
    assert comfy.shape == (3, 48, 64, 3)
    assert torch.equal(from_comfy_image(comfy), images)
    assert to_comfy_image(images[0]).shape == (1, 48, 64, 3)
