"""Block noise (Relay Diffusion, arXiv:2309.03350): the definition, its statistics, the mixing option, the NOISE
source's seeding and batch indices, and the errors."""

from __future__ import annotations

import pytest
import torch

from preprint.highres.block_noise import BlockNoiseError, BlockNoiseSource, block_noise, block_sum


def rolled_definition(white: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's description read literally: the sum of the k^2 copies shifted down / right by 0..k-1, over k."""
    out = torch.zeros_like(white, dtype=torch.float64)
    for dy in range(k):
        for dx in range(k):
            out += torch.roll(white.double(), shifts=(dy, dx), dims=(-2, -1))
    return out / k


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("size", [(7, 12), (9, 5), (16, 16)])
def test_block_sum_is_the_sum_of_rolled_copies_over_k(k, size):
    white = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(k))
    got = block_sum(white, k)
    assert got.shape == white.shape and got.dtype == white.dtype
    torch.testing.assert_close(got.double(), rolled_definition(white, k), rtol=0, atol=1e-5)


def test_block_size_one_is_the_generators_white_noise_bitwise():
    g1, g2 = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    assert torch.equal(block_noise((2, 4, 9, 13), g1, 1), torch.randn((2, 4, 9, 13), generator=g2))


def _big(k: int, fraction: float = 1.0) -> torch.Tensor:
    return block_noise((64, 4, 48, 48), torch.Generator().manual_seed(7), k, fraction)


def _corr(x: torch.Tensor, dy: int, dx: int) -> float:
    return float((x * torch.roll(x, shifts=(dy, dx), dims=(-2, -1))).mean())


@pytest.mark.parametrize("k", [2, 3])
def test_unit_variance_and_the_block_correlation(k):
    x = _big(k)
    assert abs(float(x.var()) - 1.0) < 0.01
    for dy, dx in [(0, 1), (1, 0), (1, 1), (0, k - 1), (k - 1, k - 1), (0, k), (k, 1)]:
        expected = max(k - abs(dy), 0) * max(k - abs(dx), 0) / k**2
        assert abs(_corr(x, dy, dx) - expected) < 0.01, (dy, dx)


@pytest.mark.parametrize("k", [2, 4])
def test_block_means_keep_the_papers_share_of_the_power(k):
    # the coarse picture of an upscaled latent: white noise leaves its k x k means 1/k^2 of the power
    means = torch.nn.functional.avg_pool2d(_big(k), k)
    expected = (k * (2 * k * k + 1) / 3) ** 2 / k**6
    white = torch.nn.functional.avg_pool2d(_big(1), k)
    assert abs(float(means.var()) - expected) < 0.02 * expected
    assert abs(float(white.var()) - 1 / k**2) < 0.03 / k**2


def test_fraction_mixes_white_noise_at_unit_variance():
    x = _big(2, 0.25)
    assert abs(float(x.var()) - 1.0) < 0.01
    assert abs(_corr(x, 0, 1) - 0.25 * 0.5) < 0.01  # block part's correlation, scaled by its variance share
    assert abs(_corr(_big(2, 0.0), 0, 1)) < 0.01


def test_fraction_one_draws_no_second_noise():
    g = torch.Generator().manual_seed(3)
    block_noise((1, 1, 8, 8), g, 2, 1.0)
    g2 = torch.Generator().manual_seed(3)
    torch.randn((1, 1, 8, 8), generator=g2)
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=g2))


def test_five_dimensional_latents_get_blocks_over_height_and_width():
    white = torch.randn(1, 2, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(block_sum(white, 2).double(), rolled_definition(white, 2), rtol=0, atol=1e-5)


def test_half_precision_noise_keeps_its_dtype():
    x = block_noise((1, 4, 8, 8), torch.Generator().manual_seed(0), 2, dtype=torch.float16)
    assert x.dtype == torch.float16


@pytest.mark.parametrize("k, fraction", [(0, 1.0), (2.5, 1.0), (2, -0.1), (2, 1.5), (2, float("nan"))])
def test_impossible_settings_are_refused(k, fraction):
    with pytest.raises(BlockNoiseError):
        block_noise((1, 1, 8, 8), torch.Generator(), k, fraction)


def test_a_block_larger_than_the_latent_is_refused_with_the_largest_that_fits():
    with pytest.raises(BlockNoiseError, match="at most 3"):
        block_sum(torch.zeros(1, 4, 3, 10), 4)
    assert block_sum(torch.zeros(1, 4, 3, 10), 3).shape == (1, 4, 3, 10)


def test_source_seeds_a_fresh_generator_per_call():
    src = BlockNoiseSource(5, 2, 1.0)
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    a, b = src.generate_noise(latent), src.generate_noise(latent)
    assert torch.equal(a, b)
    assert not torch.equal(a, BlockNoiseSource(6, 2, 1.0).generate_noise(latent))
    assert src.seed == 5


def test_source_batch_indices_draw_each_row_in_turn():
    src = BlockNoiseSource(9, 2, 0.5)
    rows = src.generate_noise({"samples": torch.zeros(3, 4, 8, 8), "batch_index": [0, 1, 2]})
    g = torch.Generator().manual_seed(9)
    alone = [block_noise((1, 4, 8, 8), g, 2, 0.5) for _ in range(3)]
    assert torch.equal(rows, torch.cat(alone))
    picked = src.generate_noise({"samples": torch.zeros(2, 4, 8, 8), "batch_index": [2, 0]})
    assert torch.equal(picked, torch.cat([alone[2], alone[0]]))
