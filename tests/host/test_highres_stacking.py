"""Multi-resolution patches inside a full stack: a LoRA on the model, PAG, Scheduled CFG, a cache and one of the
pack's KSampler solvers. Each patch must still act inside the stack (the stack minus the patch gives another
image) and let every other member act (the stack minus any other member gives another image), at a size above
the training size, on the UNet and Flux layouts."""

from __future__ import annotations

import pytest
import torch

from .harness import run_node, run_sampling, tiny_model

H, W = 13, 22  # latent cells: odd, non-square, above the 8 x 8 "training size" given to the size-aware patches


def _lora(m):
    """A random low-rank weight patch on every 2-D attention weight, as a LoRA loader adds one."""
    out = m.clone()
    g = torch.Generator().manual_seed(3)
    patches = {}
    for key, w in out.model.state_dict().items():
        if key.startswith("diffusion_model.") and key.endswith(".weight") and w.ndim == 2 and "attn" in key:
            up, down = torch.randn(w.shape[0], 2, generator=g) * 0.05, torch.randn(2, w.shape[1], generator=g) * 0.05
            patches[key] = ("diff", (up @ down,))
    assert patches
    out.add_patches(patches, 1.0)
    return out


def _pag(m):
    return run_node("PreprintPerturbedAttentionGuidance", model=m, scale=2.0, layers="", adaptive_scale=0.0,
                    sigma_start=-1.0, sigma_end=-1.0, rescale=0.0)[0]


def _scheduled(m):
    return run_node("PreprintScheduledCFG", model=m, schedule="linear", cfg_start=5.0, cfg_end=2.0, exponent=2.0,
                    custom_scales="", sigma_start=-1.0, sigma_end=-1.0)[0]


def _cache(family):
    if family == "sd15":
        return lambda m: run_node("PreprintDeepCache", model=m, cache_interval=2, branch_depth=0,
                                  schedule="uniform", start_percent=0.0, end_percent=1.0)[0]
    return lambda m: run_node("PreprintDiTBlockCache", model=m, threshold=5.0, extrapolation_order=2,
                              max_consecutive_skips=2, start_percent=0.0, end_percent=1.0)[0]


PATCHES = {
    "sd15": {
        "HiDiffusion": lambda m: run_node("PreprintHiDiffusion", model=m, raunet=True, msw_msa=True, t1=0.5,
                                          t2=0.0, preset="custom")[0],
        "entropy scaling": lambda m: run_node("PreprintAttentionEntropyScaling", model=m, training_width=64,
                                              training_height=64)[0],
        "Tiled Diffusion": lambda m: run_node("PreprintTiledDiffusion", model=m, tile_width=96, tile_height=64,
                                              mode="overlapping (MultiDiffusion)", overlap=16,
                                              weighting="gaussian", tile_batch_size=1)[0],
        "DiffuseHigh": lambda m: run_node("PreprintDiffuseHigh", model=m, guide={"samples": _guide("sd15")},
                                          guidance_fraction=0.5, wavelet="haar")[0],
    },
    "flux": {
        "RoPE scaling": lambda m: run_node("PreprintRoPEScaling", model=m, mode="NTK-aware", training_width=64,
                                           training_height=64)[0],
        "entropy scaling": lambda m: run_node("PreprintAttentionEntropyScaling", model=m, training_width=64,
                                              training_height=64)[0],
        # overlapping tiles stay in place from step to step, so a cache can follow each of them
        "Tiled Diffusion": lambda m: run_node("PreprintTiledDiffusion", model=m, tile_width=96, tile_height=64,
                                              mode="overlapping (MultiDiffusion)", overlap=16, weighting="gaussian",
                                              tile_batch_size=2)[0],
    },
}


def _guide(family):
    channels = 4 if family == "sd15" else 16
    return torch.randn(1, channels, H, W, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family,patch", [(f, p) for f, ps in PATCHES.items() for p in ps])
def test_a_multi_resolution_patch_acts_inside_the_whole_stack(family, patch):
    base = tiny_model(family)
    stack = {"lora": _lora, patch: PATCHES[family][patch], "pag": _pag, "scheduled": _scheduled,
             "cache": _cache(family)}

    def sample(skip=None):
        m = base
        for name, apply in stack.items():
            m = m if name == skip else apply(m)
        return run_sampling(m, family, sampler_name="preprint_dpmpp_2m", scheduler="karras", steps=4, height=H,
                            width=W)

    out = sample()
    assert torch.isfinite(out).all() and out.shape[-2:] == (H, W)
    assert torch.equal(sample(), out)  # deterministic inside the stack
    for name in stack:
        assert not torch.equal(sample(skip=name), out), f"{patch}: removing {name} from the stack changed nothing"
