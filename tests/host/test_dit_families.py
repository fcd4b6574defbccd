"""The DiT nodes on the model families beyond Flux / SD3, on tiny random-weight layouts this ComfyUI can build.

Each family is either served (the node runs and changes the result; switched off it is bitwise the unpatched
model) or refused with a message that names the node and says what would work. Families whose class this ComfyUI
lacks (Flux.2, HunyuanVideo 1.5's newer layout) are covered by the README's table, not here.
"""

from __future__ import annotations

import math
import re

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension as pe
import comfy.sample
import comfy.supported_models
import pytest
import torch

from preprint.runner.tiny_models import randomise_

from .harness import run_node

# -- tiny layouts -------------------------------------------------------------------------------------------------
# Each: (model config, latent shape (c, [t,] h, w), context width, extra cond entries). Widths are shrunk, block
# structure kept short; every block kind the family has is present.
CONTEXT_TOKENS = 6


def _configs():
    sm = comfy.supported_models
    return {
        "chroma": (sm.Chroma({"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 32,
                              "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 2,
                              "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2,
                              "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 1}),
                   (16, 8, 12), 32, {"pooled_output": 4}),
        "qwen_image": (sm.QwenImage({"image_model": "qwen_image", "patch_size": 2, "in_channels": 64,
                                     "out_channels": 16, "num_layers": 3, "attention_head_dim": 16,
                                     "num_attention_heads": 2, "joint_attention_dim": 32,
                                     "axes_dims_rope": (4, 6, 6)}),
                       (16, 1, 8, 12), 32, {}),
        "lumina2": (sm.Lumina2({"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64,
                                "n_layers": 2, "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4,
                                "multiple_of": 16, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "qk_norm": True,
                                "cap_feat_dim": 32, "axes_dims": [4, 6, 6], "axes_lens": [300, 64, 64]}),
                    (16, 8, 12), 32, {"attention_mask": CONTEXT_TOKENS}),
        "wan": (sm.WAN21_T2V({"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2),
                              "text_len": CONTEXT_TOKENS, "in_dim": 16, "dim": 48, "ffn_dim": 64, "freq_dim": 32,
                              "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 3}),
                (16, 2, 8, 12), 32, {}),
        "hunyuan_video": (sm.HunyuanVideo({"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16,
                                           "vec_in_dim": 16, "context_in_dim": 32, "hidden_size": 64,
                                           "mlp_ratio": 2.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2,
                                           "axes_dim": [4, 6, 6], "theta": 256, "patch_size": [1, 2, 2],
                                           "qkv_bias": True, "guidance_embed": True, "byt5": False,
                                           "meanflow": False}),
                          (16, 2, 8, 12), 32, {"pooled_output": 16}),
    }


def tiny(family: str, seed: int = 0):
    config, _, _, _ = _configs()[family]
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomise_(model.diffusion_model, seed)
    model.diffusion_model.float()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def conds(family: str):
    _, _, width, extra = _configs()[family]
    g = torch.Generator().manual_seed(1)

    def one():
        opts = {k: (torch.ones(1, n, dtype=torch.long) if k == "attention_mask" else torch.randn(1, n, generator=g))
                for k, n in extra.items()}
        return [[torch.randn(1, CONTEXT_TOKENS, width, generator=g), opts]]
    return one(), one()


def sample(model, family: str, steps: int = 4, cfg: float = 3.0, scale_hw: int = 1):
    _, shape, _, _ = _configs()[family]
    shape = (*shape[:-2], shape[-2] * scale_hw, shape[-1] * scale_hw)
    latent = torch.zeros(1, *shape)
    noise = comfy.sample.prepare_noise(latent, 0)
    pos, neg = conds(family)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent, seed=0,
                               disable_pbar=True)


FAMILIES = ("chroma", "qwen_image", "lumina2", "wan", "hunyuan_video")
PAG_NODES = {"PreprintPerturbedAttentionGuidance": "Perturbed-Attention Guidance (Preprint)",
             "PreprintSoftPAG": "SoftPAG / Head Selection (Preprint)",
             "PreprintSmoothedEnergyGuidance": "Smoothed Energy Guidance (Preprint)"}
SERVED = {  # node -> families served on this ComfyUI; the rest are refused
    "pag": ("chroma", "qwen_image", "wan", "hunyuan_video"), "cache": ("chroma", "qwen_image", "wan", "hunyuan_video"),
    "entropy": FAMILIES, "rope": ("chroma", "hunyuan_video")}


@pytest.fixture(scope="module")
def models():
    return {f: tiny(f) for f in FAMILIES}


def pag(node_id, m, scale=3.0):
    extra = {"blur_sigma": 10.0} if node_id == "PreprintSmoothedEnergyGuidance" else {}
    return run_node(node_id, model=m, scale=scale, layers="", adaptive_scale=0.0, sigma_start=-1.0, sigma_end=-1.0,
                    rescale=0.0, **extra)[0]


def ditcache(m, threshold):
    return run_node("PreprintDiTBlockCache", model=m, threshold=threshold, extrapolation_order=1,
                    max_consecutive_skips=3, start_percent=0.0, end_percent=1.0)[0]


def entropy(m, width, height):
    return run_node("PreprintAttentionEntropyScaling", model=m, training_width=width, training_height=height)[0]


def rope(m, width, height):
    return run_node("PreprintRoPEScaling", model=m, mode="NTK-aware", training_width=width,
                    training_height=height)[0]


def training_px(family):
    """The pixel size of the tiny layout's latent (8 x 12 at a downscale of 8), so the node is at training size."""
    return 12 * 8, 8 * 8


# -- perturbed-attention guidance ---------------------------------------------------------------------------------
@pytest.mark.parametrize("node_id", PAG_NODES)
@pytest.mark.parametrize("family", SERVED["pag"])
def test_pag_family_served_changes_the_result_and_scale_0_is_exact(models, family, node_id):
    m = models[family]
    base = sample(m, family)
    assert torch.equal(sample(pag(node_id, m, scale=0.0), family), base)
    out = sample(pag(node_id, m), family)
    assert torch.isfinite(out).all() and not torch.allclose(out, base)


@pytest.mark.parametrize("node_id", PAG_NODES)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in SERVED["pag"]])
def test_pag_family_refused_names_the_node_and_what_works(models, family, node_id):
    net = type(models[family].model.diffusion_model).__name__
    with pytest.raises(TypeError, match=rf"^{re.escape(PAG_NODES[node_id])}.*{net}.*no per-block patch point"):
        pag(node_id, models[family])


# -- DiT block cache ----------------------------------------------------------------------------------------------
def cache_report(m):
    return m.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, "preprint_dit_cache")[0].last_report


@pytest.mark.parametrize("family", SERVED["cache"])
def test_dit_cache_family_served_skips_blocks_and_threshold_0_is_exact(models, family):
    m = models[family]
    base = sample(m, family, steps=8)
    assert torch.equal(sample(ditcache(m, 0.0), family, steps=8), base)
    cached = ditcache(m, 2.0)
    out = sample(cached, family, steps=8)
    counts = cache_report(cached)["counts"]
    # every block after the first is skipped on some call (Wan's blocks return only the image stream)
    assert counts.not_run and all(counts.not_run.get(k, 0) > 0 for k in counts.run if k != ("double_block", 0))
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_dit_cache_refuses_lumina2_and_names_what_works(models):
    with pytest.raises(ValueError, match=r"^DiT Block Cache \(Preprint\): this model is a Lumina2 \(NextDiT\);.*Wan"):
        ditcache(models["lumina2"], 0.1)


# -- attention entropy scaling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", SERVED["entropy"])
def test_entropy_family_served_exact_at_training_size_and_changes_above_it(models, family):
    m = models[family]
    w, h = training_px(family)
    assert torch.equal(sample(entropy(m, w, h), family), sample(m, family))
    big = sample(entropy(m, w, h), family, scale_hw=2)
    assert torch.isfinite(big).all() and not torch.allclose(big, sample(m, family, scale_hw=2))


def test_entropy_leaves_a_dit_text_only_self_attention_alone(models):
    """Lumina2's text refiner attends over the text alone: fewer keys than image tokens, so not an image attention."""
    w, h = training_px("lumina2")
    o = entropy(models["lumina2"], w // 2, h // 2).model_options["transformer_options"]["optimized_attention_override"]
    to = {"preprint_entropy_latent": (8, 12)}  # 24 image tokens of 2 x 2 patches
    text = torch.randn(1, 4, CONTEXT_TOKENS, 16)
    joint = torch.randn(1, 4, CONTEXT_TOKENS + 24, 16)
    ident = lambda q, k, v, heads, **kw: q  # noqa: E731
    assert torch.equal(o(ident, text, text, text, 4, skip_reshape=True, transformer_options=to), text)
    assert not torch.equal(o(ident, joint, joint, joint, 4, skip_reshape=True, transformer_options=to), joint)


# -- RoPE scaling -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", SERVED["rope"])
def test_rope_family_served_exact_at_training_size_and_changes_above_it(models, family):
    m = models[family]
    w, h = training_px(family)
    assert torch.equal(sample(rope(m, w, h), family), sample(m, family))
    big = sample(rope(m, w, h), family, scale_hw=2)
    assert torch.isfinite(big).all() and not torch.allclose(big, sample(m, family, scale_hw=2))


@pytest.mark.parametrize(("family", "why"), [("qwen_image", "numbered after the image"),
                                              ("lumina2", "without Flux's three-axis"),
                                              ("wan", "without Flux's three-axis")])
def test_rope_family_refused_with_the_reason(models, family, why):
    with pytest.raises(ValueError, match=rf"^RoPE Scaling \(Preprint\): .*{why}.*"):
        rope(models[family], 64, 64)


def test_entropy_on_a_video_dit_counts_every_frame_as_image(models):
    """Wan's self-attention keys are frames x the frame's tokens; all of them scale with the area, none is text."""
    w, h = training_px("wan")
    o = entropy(models["wan"], w // 2, h // 2).model_options["transformer_options"]["optimized_attention_override"]
    to = {"preprint_entropy_latent": (8, 12)}  # 24 tokens per frame now, 6 at the training size
    q = torch.randn(1, 2 * 24, 32)  # two latent frames
    got = o(lambda q, k, v, heads, **kw: q, q, q.clone(), q.clone(), 2, transformer_options=to)
    assert torch.allclose(got, q * math.sqrt(math.log(48) / math.log(12)))
