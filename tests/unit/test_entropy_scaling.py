"""Attention entropy scaling factor (pure torch): the paper's sqrt(log T / log N) and the key counts."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.highres.entropy import entropy_factor, keys_at_training_size


def test_factor_is_the_papers_and_one_at_the_training_size():
    assert entropy_factor(4096, 4096) == 1.0
    assert entropy_factor(16384, 4096) == pytest.approx(math.sqrt(math.log(16384) / math.log(4096)))
    assert entropy_factor(1024, 4096) < 1.0
    assert entropy_factor(1, 4096) == 1.0 and entropy_factor(4096, 1) == 1.0


def test_scaled_logits_keep_the_training_entropy_of_uniform_keys():
    """The motivation, checked: for random keys the mean row entropy at 4x the tokens, with the factor,
    is closer to the training-size entropy than without."""
    g = torch.Generator().manual_seed(0)
    d = 16

    def mean_entropy(n, factor=1.0):
        q, k = torch.randn(64, d, generator=g) * 2, torch.randn(n, d, generator=g) * 2
        p = torch.softmax(factor * q @ k.T / d ** 0.5, dim=-1)
        return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())

    train = mean_entropy(256)
    plain, scaled = mean_entropy(1024), mean_entropy(1024, entropy_factor(1024, 256))
    assert abs(scaled - train) < abs(plain - train)


def test_keys_at_training_size_scale_image_tokens_and_keep_text_tokens():
    assert keys_at_training_size(192, 192, 64) == 64  # UNet top level, 3x the area
    assert keys_at_training_size(48, 192, 64) == 16  # a level 2x down: same ratio
    assert keys_at_training_size(512 + 4096, 4096, 1024) == 512 + 1024  # joint attention: text kept
    with pytest.raises(ValueError):
        keys_at_training_size(10, 0, 64)
