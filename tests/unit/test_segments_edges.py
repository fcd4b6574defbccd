"""LIME's automatic region (regional/segments.py) at its edges: the projection width, the resampling grid, k-means++
seeding and the Lloyd loop's stopping rules, the paper's share of attended pixels and batched pixel-size masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from preprint.regional.segments import (
    PAPER_TOP_FRACTION,
    SegmentError,
    fuse_features,
    kmeans,
    region_mask,
    segment,
    top_points,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blobs(scale: float = 1.0):
    """Three groups of 20 points in 5 dimensions, centres 10 apart and spread 0.1, all times ``scale``."""
    centres = torch.tensor([[0.0] * 5, [10.0] + [0.0] * 4, [0.0, 10.0, 0.0, 0.0, 0.0]])
    truth = torch.arange(3).repeat_interleave(20)
    return scale * (centres[truth] + 0.1 * torch.randn(60, 5, generator=gen(0))), truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


# ------------------------------------------------------------------------------------------------ feature fusion


def test_blocks_up_to_64_channels_are_only_normalised_wider_ones_are_projected_to_64():
    """The projection keeps 64 channels: a 64-channel block is not projected (it comes back L2-normalised as it
    is), a 65-channel one is reduced to 64 channels."""
    f64 = torch.randn(2, 64, 4, 4, generator=gen(1))
    out = fuse_features([f64], 4, 4)
    torch.testing.assert_close(out, F.normalize(f64, dim=1), rtol=0, atol=1e-6)
    f65 = torch.randn(2, 65, 4, 4, generator=gen(2))
    wide = fuse_features([f65], 4, 4)
    assert wide.shape == (2, 64, 4, 4)
    assert not torch.allclose(wide, F.normalize(f65[:, :64], dim=1), atol=0.1)  # mixed, not cut
    assert torch.allclose(wide.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)


def test_blocks_of_any_width_and_resolution_join_into_one_segmentation():
    """A wide low-resolution block and a narrow full-resolution one that both split the image into left and right
    halves fuse into features whose segments are those halves."""
    wide = torch.zeros(1, 320, 4, 4)
    wide[:, :160, :, :2] = 1.0  # left half of the coarse grid
    wide[:, 160:, :, 2:] = 1.0
    narrow = torch.zeros(1, 8, 8, 8)
    narrow[:, 0, :, :4] = 1.0
    narrow[:, 1, :, 4:] = 1.0
    fused = fuse_features([wide, narrow], 8, 8)
    assert fused.shape == (1, 64 + 8, 8, 8)
    labels = segment(fused, 2)
    assert same_partition(labels[0].flatten(), (torch.arange(8) >= 4).repeat(8).long())


def test_the_batch_error_names_the_block_that_differs_from_the_first():
    """Blocks must share the first block's batch size; the error shows the odd block and that batch size."""
    first, other = torch.randn(2, 8, 4, 4), torch.randn(1, 8, 4, 4)
    with pytest.raises(SegmentError, match=r"got \[1, 8, 4, 4\] next to batch 2"):
        fuse_features([first, other], 4, 4)


def test_resampling_keeps_pixel_centres_aligned():
    """Bilinear resampling with half-pixel centres: upsampling a 3-column ramp by 2 gives the values at the fine
    pixels' centres, i - 0.25 stepped by 0.5 and held at the borders (not a ramp stretched corner to corner)."""
    f = torch.ones(1, 2, 2, 3)
    f[:, 0] = torch.arange(3.0)  # channel 0: the ramp 0, 1, 2 along the width; channel 1: ones
    fused = fuse_features([f], 4, 6)
    ramp = fused[0, 0] / fused[0, 1]  # the normalisation divides both channels alike
    want = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.0]).expand(4, 6)
    torch.testing.assert_close(ramp, want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ k-means


def test_a_single_point_is_one_cluster():
    """One point (a 1x1 grid) is clustered, into cluster 0, whatever k."""
    for k in (1, 4):
        assert kmeans(torch.ones(1, 3), k, gen(0)).tolist() == [0]
    assert segment(torch.randn(2, 5, 1, 1), 8).tolist() == [[[0]], [[0]]]


def test_seeding_draws_the_first_centre_uniformly_and_never_a_chosen_point_twice():
    """k-means++: the first centre is any point with the same chance; later ones are drawn by squared distance to
    the centres so far, so a point already chosen (distance 0) is never drawn again. With as many clusters as
    distinct points every point is its own cluster, and cluster 0 is the first centre drawn."""
    x = torch.tensor([[20.0, 0.0], [0.0, 20.0], [-20.0, 0.0], [0.0, -20.0]])
    first = torch.zeros(4, dtype=torch.long)
    for s in range(400):
        labels = kmeans(x, 4, gen(s))
        assert sorted(labels.tolist()) == [0, 1, 2, 3]
        first[int((labels == 0).nonzero())] += 1
    assert ((first >= 70) & (first <= 130)).all(), first.tolist()  # 100 each expected; sd about 9


@pytest.mark.parametrize("scale", [1e-3, 1e9])
def test_clustering_does_not_depend_on_the_scale_of_the_features(scale):
    """Shrinking or growing every feature by one factor gives the same segments (tiny and huge spreads alike)."""
    x, truth = blobs(scale)
    assert same_partition(kmeans(x, 3, gen(0)), truth)


def counting_cdist(monkeypatch, flip: bool = False) -> list[int]:
    """Count the calls of ``torch.cdist`` (one per assignment of the points); with ``flip``, reverse the order
    of the centres it reports, so the labels swap at every assignment and never settle."""
    calls = [0]
    real = torch.cdist

    def cdist(a, b, *args, **kwargs):
        calls[0] += 1
        d = real(a, b, *args, **kwargs)
        return d.flip(-1) if flip else d

    monkeypatch.setattr(torch, "cdist", cdist)
    return calls


def test_lloyd_iterations_stop_once_no_label_changes(monkeypatch):
    """Separated groups are found by the seeding's own assignment; one Lloyd iteration sees no label change and
    the loop ends there, not at the iteration cap."""
    x, truth = blobs()
    calls = counting_cdist(monkeypatch)
    labels = kmeans(x, 3, gen(0))
    assert same_partition(labels, truth)
    assert calls[0] <= 3  # the seeding's assignment and one or two iterations


def test_lloyd_iterations_stop_at_the_cap_when_labels_keep_changing(monkeypatch):
    """Labels that never settle end the loop after ``max_iters`` iterations, 100 by default."""
    x = torch.tensor([[0.0], [1.0]])
    calls = counting_cdist(monkeypatch, flip=True)
    kmeans(x, 2, gen(0), max_iters=7)
    assert calls[0] == 1 + 7
    calls[0] = 0
    kmeans(x, 2, gen(0))
    assert calls[0] == 1 + 100


def test_segment_without_a_seed_uses_seed_0():
    """The default seed is 0 (the node's default): the same labels as seed 0, on an input where the seed matters."""
    f = torch.randn(1, 6, 8, 8, generator=gen(4))
    labels = segment(f, 5)
    assert torch.equal(labels, segment(f, 5, seed=0))
    assert not torch.equal(labels, segment(f, 5, seed=1))
    assert not torch.equal(labels, segment(f, 5, seed=-1))


# ------------------------------------------------------------------------------------------------ attended pixels


def test_the_paper_share_of_pixels_rounds_up_on_any_grid():
    """100 of 4096 pixels: an 832 px square image (104 x 104 latent, 10816 pixels) keeps ceil(264.06) = 265."""
    att = torch.rand(1, 104, 104, generator=gen(0))
    assert int(top_points(att, PAPER_TOP_FRACTION).sum()) == 265


# ------------------------------------------------------------------------------------------------ pixel masks


def test_region_mask_keeps_each_image_of_a_batch():
    """A batch of two regions becomes two pixel masks ``[2, h, w]``, each its own region's blocks."""
    roi = torch.zeros(2, 2, 3)
    roi[0, 0, 0] = 1.0
    roi[1, 1, 2] = 1.0
    for blur in (0.0, 0.5):
        mask = region_mask(roi, 8, 12, blur)
        assert mask.shape == (2, 8, 12)
        assert torch.equal(mask, roi.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2))


def test_a_one_pixel_blur_rounds_exactly_the_corners_of_a_block():
    """A blur of 1 px already rounds a rectangle: its four corner pixels drop out (each sees under half of its
    neighbourhood inside), every other pixel stays as the blocks have it."""
    roi = torch.zeros(1, 4, 6)
    roi[0, 1:3, 2:5] = 1.0
    sharp = region_mask(roi, 32, 48, 0.0)
    want = sharp.clone()
    for r, c in ((8, 16), (8, 39), (23, 16), (23, 39)):
        want[0, r, c] = 0.0
    assert torch.equal(region_mask(roi, 32, 48, 1.0), want)
