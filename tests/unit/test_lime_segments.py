"""LIME's automatic region (regional/segments.py): feature fusion, k-means, the most attended pixels and the union
of the segments they fall in, by known answers."""

from __future__ import annotations

import pytest
import torch

from preprint.regional.segments import (
    PAPER_TOP_FRACTION,
    PROJECTED,
    FeatureRecorder,
    SegmentError,
    fuse_features,
    kmeans,
    region_of_interest,
    segment,
    top_points,
)


def blobs(seed=0):
    """Three well separated groups of 20 points in 5 dimensions (centres 10 apart, spread 0.1)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0] * 5, [10.0] + [0.0] * 4, [0.0, 10.0, 0.0, 0.0, 0.0]])
    truth = torch.arange(3).repeat_interleave(20)
    return centres[truth] + 0.1 * torch.randn(60, 5, generator=g), truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_kmeans_recovers_separated_groups_and_is_deterministic():
    x, truth = blobs()
    labels = kmeans(x, 3, torch.Generator().manual_seed(0))
    assert same_partition(labels, truth)
    assert torch.equal(labels, kmeans(x, 3, torch.Generator().manual_seed(0)))


def test_kmeans_centres_move_to_the_group_means():
    # two groups on a line: 0, 1 and 9, 10; any seeding ends with the split between 1 and 9
    x = torch.tensor([[0.0], [1.0], [9.0], [10.0]])
    for s in range(5):
        labels = kmeans(x, 2, torch.Generator().manual_seed(s))
        assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]


def test_kmeans_ends_at_a_fixed_point_of_its_iterations():
    # evenly spread points: the seeds alone are not a stable partition; after the iterations every point is
    # nearest to the mean of its own cluster
    x = torch.linspace(0, 19, 20).unsqueeze(1)
    for s in range(6):
        labels = kmeans(x, 3, torch.Generator().manual_seed(s))
        means = torch.stack([x[labels == j].mean(dim=0) for j in range(3)])
        assert torch.equal(torch.cdist(x, means).argmin(dim=1), labels)


def test_kmeans_with_more_clusters_than_distinct_points():
    x = torch.zeros(6, 3)
    x[3:] = 1.0
    labels = kmeans(x, 8, torch.Generator().manual_seed(0))
    assert same_partition(labels, torch.tensor([0, 0, 0, 1, 1, 1]))


def test_fuse_resamples_projects_and_weighs_every_block_alike():
    g = torch.Generator().manual_seed(0)
    small = torch.randn(2, 8, 4, 6, generator=g)
    wide = torch.randn(2, PROJECTED * 3, 8, 12, generator=g)
    fused = fuse_features([small, wide], 8, 12)
    assert fused.shape == (2, 8 + PROJECTED, 8, 12)
    norms = fused[:, :8].norm(dim=1), fused[:, 8:].norm(dim=1)
    assert torch.allclose(norms[0], torch.ones(2, 8, 12), atol=1e-5)
    assert torch.allclose(norms[1], torch.ones(2, 8, 12), atol=1e-5)
    # a block 100x larger in magnitude does not outweigh the other
    assert torch.allclose(fuse_features([small * 100, wide], 8, 12), fused, atol=1e-5)
    assert torch.equal(fuse_features([small, wide], 8, 12, seed=0), fused)  # the projection is fixed by the seed
    with pytest.raises(SegmentError, match="no decoder-block features"):
        fuse_features([], 8, 12)
    with pytest.raises(SegmentError, match="one batch size"):
        fuse_features([small, wide[:1]], 8, 12)


def test_segments_follow_the_features_per_image():
    # image 0: left half / right half differ; image 1: top / bottom differ
    f = torch.zeros(2, 3, 6, 8)
    f[0, 0, :, :4] = 1.0
    f[0, 1, :, 4:] = 1.0
    f[1, 0, :3] = 1.0
    f[1, 2, 3:] = 1.0
    labels = segment(f, 2)
    assert labels.shape == (2, 6, 8)
    assert same_partition(labels[0].flatten(), (torch.arange(8) >= 4).repeat(6).long())
    assert same_partition(labels[1].flatten(), (torch.arange(6) >= 3).repeat_interleave(8).long())


def test_top_points_count_and_floor():
    att = torch.arange(40.0).reshape(1, 5, 8)
    pts = top_points(att, 0.1)  # 4 pixels: the 4 largest values
    assert int(pts.sum()) == 4 and pts.flatten()[-4:].all()
    assert int(top_points(att, 0.11).sum()) == 5  # 4.4 pixels round up
    assert int(top_points(att, 1e-6).sum()) == 1  # at least one
    assert int(top_points(torch.rand(2, 64, 64), PAPER_TOP_FRACTION).sum()) == 2 * 100  # the paper's 100 at 512 px


def test_region_is_the_union_of_segments_holding_the_top_points():
    labels = torch.tensor([[[0, 0, 1, 1],
                            [0, 0, 1, 1],
                            [2, 2, 3, 3],
                            [2, 2, 3, 3]]])
    att = torch.zeros(1, 4, 4)
    att[0, 0, 3] = 1.0  # segment 1
    att[0, 3, 0] = 0.9  # segment 2
    att[0, 3, 3] = 0.1  # segment 3, but not among the two most attended
    roi = region_of_interest(labels, att, fraction=2 / 16)
    expected = torch.isin(labels, torch.tensor([1, 2])).float()
    assert torch.equal(roi, expected)
    assert torch.equal(region_of_interest(labels, att, fraction=1 / 16), (labels == 1).float())
    with pytest.raises(SegmentError, match="share"):
        region_of_interest(labels, att[:, :3], 0.1)


def test_recorder_keeps_positive_rows_per_block_and_averages_calls():
    rec = FeatureRecorder()
    h1 = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    to = {"cond_or_uncond": [0, 1], "block": ("output", 0)}  # row 0 positive, row 1 negative
    out = rec(h1, "hsp", to)
    assert out[0] is h1 and out[1] == "hsp"  # the block's input is handed on untouched
    rec(h1 + 2, None, to)
    rec(torch.ones(2, 5, 1, 1), None, {"cond_or_uncond": [0, 1], "block": ("output", 1)})
    feats = rec.features()
    assert len(feats) == 2 and feats[0].shape == (1, 3, 2, 2) and feats[1].shape == (1, 5, 1, 1)
    assert torch.equal(feats[0], h1[:1] + 1)  # mean of the two calls, positive row only


def test_region_mask_is_blocks_of_pixels_and_blur_only_rounds_edges():
    from preprint.regional.segments import region_mask

    roi = torch.zeros(1, 4, 6)
    roi[0, 1:3, 2:5] = 1.0
    sharp = region_mask(roi, 32, 48, 0.0)
    assert torch.equal(sharp, roi.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2))
    soft = region_mask(roi, 32, 48, 3.0)
    assert set(soft.unique().tolist()) == {0.0, 1.0}
    assert soft[0, 12, 20] == 1 and soft[0, 2, 2] == 0  # inside stays, far outside stays out
    assert soft[0, 8, 16] == 0 and sharp[0, 8, 16] == 1  # the corner pixel is rounded off
    assert abs(float(soft.sum() - sharp.sum())) < 0.1 * float(sharp.sum())  # neither grown nor shrunk much


def test_edges_of_the_inputs():
    with pytest.raises(SegmentError, match="nothing to cluster"):
        kmeans(torch.zeros(0, 3), 4, torch.Generator().manual_seed(0))
    x, _ = blobs()
    assert kmeans(x, 1, torch.Generator().manual_seed(0)).unique().tolist() == [0]  # one cluster asked, one given
    assert kmeans(x, 0, torch.Generator().manual_seed(0)).unique().tolist() == [0]  # fewer than one: one
    assert int(top_points(torch.arange(40.0).reshape(1, 5, 8), 0.0).sum()) == 1  # a zero fraction still picks one
    one = fuse_features([torch.randn(2, 3, 4, 4)], 4, 4)  # a single recorded block
    assert one.shape == (2, 3, 4, 4)


def test_each_image_is_segmented_as_it_would_be_alone_with_its_own_seed():
    """Image i of a batch is clustered with seed + i: the same labels as that image alone at seed + i."""
    f = torch.randn(3, 6, 8, 8, generator=torch.Generator().manual_seed(4))
    batch = segment(f, 5, seed=7)
    for i in range(3):
        assert torch.equal(batch[i], segment(f[i:i + 1], 5, seed=7 + i)[0])
    assert not torch.equal(segment(f[1:2], 5, seed=7)[0], segment(f[1:2], 5, seed=9)[0])  # the seed matters here
