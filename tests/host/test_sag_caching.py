"""Host tier: Self-Attention Guidance under the Preprint UNet caches (DeepCache, Block Cache, encoder
propagation) on a tiny SD1.5 model in real ComfyUI."""

from __future__ import annotations

import comfy.patcher_extension as pe
import pytest
import torch

from preprint.guidance.pag_runtime import perturbed_uuid

from .harness import run_node, run_sampling, tiny_model

P = {"start_percent": 0.0, "end_percent": 1.0}
STEPS = 8


def sag(model):
    # threshold 0 blurs the whole latent: on the tiny model's 2x2 middle-block grid the thresholded mask flips
    # from step to step, which would measure mask noise instead of the degraded pass
    return run_node("PreprintSelfAttentionGuidance", model=model, scale=0.75, blur_sigma=1.0, threshold=0.0, layer="",
                    sigma_start=-1.0, sigma_end=-1.0)[0]


def deepcache(model):
    # the deep branch below output block 1 (middle block included) is reused every other step
    return run_node("PreprintDeepCache", model=model, cache_interval=2, branch_depth=9, schedule="uniform", **P)[0]


def blockcache(model):
    return run_node("PreprintBlockCache", model=model, mode="online", threshold=0.5, profile_name="sag_test", **P)[0]


def encprop(model):
    return run_node("PreprintEncoderPropagation", model=model, key_steps="non-uniform", key_interval=2, **P)[0]


def sample(model):
    return run_sampling(model, "sd15", steps=STEPS, cfg=5.0, height=16, width=16)


@pytest.fixture(scope="module")
def sd15():
    return tiny_model("sd15", seed=0)


@pytest.fixture(scope="module")
def sag_effect(sd15):
    base = sample(sd15)
    return sample(sag(sd15)) - base


# (cache, tolerance). The error is ||(SAG + cache - cache) - (SAG - plain)|| / ||SAG - plain||. A cache serves
# the degraded pass as it serves every stream, from features of its own last refresh, so under a cache SAG's
# term is the cache's approximation of it; these settings keep that small (measured 0.03, 0.10, 0.04), and each
# tolerance sits between that and what a degraded pass without a stream of its own gave (SAG switched off on
# every cached step, its degraded pass fed the negative prompt's features: 0.37, 0.29, 0.10).
CASES = {"deepcache": (deepcache, 0.1), "blockcache": (blockcache, 0.15), "encoder_propagation": (encprop, 0.06)}


@pytest.mark.parametrize("name", list(CASES))
def test_sag_changes_a_cached_run_as_much_as_an_uncached_one(sd15, sag_effect, name):
    cache, tol = CASES[name]
    cached = sample(cache(sd15))
    assert not torch.equal(cached, sample(sd15))  # the cache does reuse features in this run
    effect = sample(sag(cache(sd15))) - cached
    err = ((effect - sag_effect).norm() / sag_effect.norm()).item()
    assert err < tol, f"{name}: SAG's effect under the cache is off by {err:.3f} of its size"


def test_degraded_pass_is_a_stream_of_its_own(sd15):
    """Every step, also on the steps where DeepCache reuses the mask layer, runs the degraded pass, with a uuid
    of its own (never the negative prompt's) and its chunks listed as perturbed for the caches."""
    calls = []

    def spy(executor, *args, **kwargs):
        topts = args[-1] if isinstance(args[-1], dict) else kwargs["transformer_options"]
        calls.append((list(topts["cond_or_uncond"]), list(topts["uuids"]), set(topts.get("preprint_perturbed", ()))))
        return executor(*args, **kwargs)

    m = sag(deepcache(sd15))
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "preprint_test_spy", spy)
    sample(m)
    assert len(calls) == 2 * STEPS
    for (cou, uuids, perturbed), (d_cou, d_uuids, d_perturbed) in zip(calls[::2], calls[1::2], strict=True):
        assert sorted(cou) == [0, 1] and not perturbed
        negative = uuids[cou.index(1)]
        assert d_cou == [0] and d_uuids == [perturbed_uuid(negative, "sag")] and d_perturbed == {0}
