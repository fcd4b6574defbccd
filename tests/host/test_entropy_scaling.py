"""Attention entropy scaling through real ComfyUI: exact at the training size, the paper's factor on
self-attention queries only, joint attention counting text tokens, chaining an earlier override."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from .harness import node_class, run_node, run_sampling, tiny_model


def entropy(m, width, height):
    return run_node("PreprintAttentionEntropyScaling", model=m, training_width=width, training_height=height)[0]


def _glue():
    return sys.modules[node_class("PreprintAttentionEntropyScaling").__module__]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_training_size_is_bitwise_the_unpatched_model(family):
    m = tiny_model(family)
    base = run_sampling(m, family, steps=3, height=8, width=8)
    assert torch.equal(run_sampling(entropy(m, 64, 64), family, steps=3, height=8, width=8), base)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_other_sizes_change_the_result(family):
    m = tiny_model(family)
    base = run_sampling(m, family, steps=3, height=16, width=12)
    out = run_sampling(entropy(m, 64, 64), family, steps=3, height=16, width=12)
    assert torch.isfinite(out).all() and not torch.allclose(out, base)


def _override(m):
    return m.model_options["transformer_options"]["optimized_attention_override"]


def test_self_attention_queries_scale_by_the_papers_factor_and_cross_attention_is_untouched():
    glue = _glue()
    m = entropy(tiny_model("sd15"), 64, 64)  # training latent 8 x 8
    o = _override(m)
    to = {glue.LATENT_KEY: (16, 12)}  # now 16 x 12: 192 tokens at full resolution
    q = torch.randn(2, 48, 32)  # a layer 2x down: 48 tokens now, 16 at the training size
    got = o(lambda q, k, v, heads, **kw: q, q, q.clone(), q.clone(), 4, transformer_options=to)
    assert torch.allclose(got, q * math.sqrt(math.log(48) / math.log(16)))
    cross = o(lambda q, k, v, heads, **kw: q, q, torch.randn(2, 8, 32), torch.randn(2, 8, 32), 4,
              transformer_options=to)
    assert torch.equal(cross, q)


def test_joint_attention_counts_text_tokens_and_patches():
    glue = _glue()
    m = entropy(tiny_model("flux"), 64, 64)  # 8 x 8 latent = 16 image tokens of 2x2 patches
    o = _override(m)
    q = torch.randn(1, 4, 8 + 48, 16)  # [B, heads, text + image, d] as Flux passes it (skip_reshape)
    got = o(lambda q, k, v, heads, **kw: q, q, q.clone(), q.clone(), 4, skip_reshape=True,
            transformer_options={glue.LATENT_KEY: (16, 12)})  # 8 x 6 = 48 image tokens now
    assert torch.allclose(got, q * math.sqrt(math.log(56) / math.log(8 + 16)))


def test_an_earlier_override_still_runs():
    seen = []

    def earlier(func, *args, **kwargs):
        seen.append(args[0].shape)
        return func(*args, **kwargs)

    m = tiny_model("sd15").clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = earlier
    out = run_sampling(entropy(m, 64, 64), "sd15", steps=2, height=12, width=12)
    assert seen and torch.isfinite(out).all()
