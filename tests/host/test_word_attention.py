"""Masks from words and Directed Diffusion through real ComfyUI on tiny SD1.5 / SDXL layouts with their real CLIP
tokenizers: mask size and determinism, named errors, off-switch exactness, what reaches the attention layers (via
spies around the patch), non-square sizes, stacking with Regional Prompting."""

from __future__ import annotations

import pytest
import torch

from preprint.runner.tiny_models import tiny_clip

from .harness import node_class, run_node, run_sampling, tiny_model

PROMPT = "a red cat sitting on a blue sofa, photo"
FAMILIES = ("sd15", "sdxl")


@pytest.fixture(scope="module")
def kit():
    out = {}
    for f in FAMILIES:
        clip = tiny_clip(family=f)
        enc = clip.encode_from_tokens_scheduled
        out[f] = (tiny_model(f), clip, enc(clip.tokenize(PROMPT)), enc(clip.tokenize("blurry")))
    return out


def mask_from_words(m, clip, latent, words="cat", seed=0, prompt=PROMPT, **kw):
    args = {"noise_level": 0.5, "steps": 2, "layers": "1/4 resolution", "refine": True, "threshold": 0.2,
            "blur": 2.0, **kw}
    return run_node("PreprintMaskFromWords", model=m, clip=clip, latent={"samples": latent}, prompt=prompt,
                    words=words, seed=seed, **args)


def directed(m, clip, words="cat", strength=1.0, end=0.5, prompt=PROMPT, mask=None, **box):
    b = {"x": 0.5, "y": 0.0, "width": 0.5, "height": 1.0, **box}
    return run_node("PreprintDirectedDiffusion", model=m, clip=clip, prompt=prompt, words=words, strength=strength,
                    trailing_tokens=20, end_percent=end, mask=mask, **b)[0]


def image_latent(h, w, batch=1, seed=5):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))


def sample(m, family, pos, neg, h=12, w=12, **kw):
    return run_sampling(m, family, steps=4, height=h, width=w, positive=pos, negative=neg, **kw)


# -- Mask From Words ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_mask_is_binary_at_pixel_size_and_deterministic_by_seed(kit, family):
    m, clip, _, _ = kit[family]
    lat = image_latent(13, 22, batch=2)  # non-square, not a multiple of 8 in latent cells
    mask, preview = mask_from_words(m, clip, lat, words="Cat, blue sofa", seed=3)
    assert mask.shape == (2, 104, 176) and preview.shape == (2, 104, 176, 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < float(mask.mean()) < 1
    again, preview_again = mask_from_words(m, clip, lat, words="Cat, blue sofa", seed=3)
    assert torch.equal(mask, again) and torch.equal(preview, preview_again)
    _, other = mask_from_words(m, clip, lat, words="Cat, blue sofa", seed=4)
    assert not torch.equal(preview, other)  # the seed is the pass's noise


def test_the_mask_follows_the_words_attention_and_the_threshold(kit):
    m, clip, _, _ = kit["sd15"]
    lat = image_latent(16, 16)
    _, cat = mask_from_words(m, clip, lat, words="cat", refine=False, blur=0.0)
    _, sofa = mask_from_words(m, clip, lat, words="sofa", refine=False, blur=0.0)
    assert not torch.equal(cat, sofa)  # different words, different maps
    _, refined = mask_from_words(m, clip, lat, words="cat", refine=True, blur=0.0)
    assert not torch.equal(cat, refined)  # the refinement takes part
    low = mask_from_words(m, clip, lat, threshold=0.1)[0]
    high = mask_from_words(m, clip, lat, threshold=0.6)[0]
    assert bool((high <= low).all()) and float(high.sum()) < float(low.sum())
    every = mask_from_words(m, clip, lat, layers="all resolutions")[0]
    assert every.shape == low.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_lime_region_is_the_union_of_feature_segments_holding_the_most_attended_pixels(kit, family, monkeypatch):
    import sys

    wa = sys.modules[node_class("PreprintMaskFromWords").__module__]  # the module ComfyUI loaded
    seen = {}
    real_fuse, real_roi = wa.fuse_features, wa.region_of_interest

    def fuse(features, h, w, seed=0):
        seen["features"] = features
        return real_fuse(features, h, w, seed=seed)

    def roi(labels, attention, fraction):
        seen.update(labels=labels, attention=attention, fraction=fraction)
        seen["roi"] = real_roi(labels, attention, fraction)
        return seen["roi"]

    monkeypatch.setattr(wa, "fuse_features", fuse)
    monkeypatch.setattr(wa, "region_of_interest", roi)
    m, clip, _, _ = kit[family]
    lat = image_latent(13, 22, batch=2)
    mask, preview = mask_from_words(m, clip, lat, words="cat", blur=0.0, region="feature segments (LIME)",
                                    segments=4, top_fraction=0.05)
    dm = m.get_model_object("diffusion_model")
    # every decoder block's input was recorded, one row per image (the pass runs the prompt alone)
    assert len(seen["features"]) == len(dm.output_blocks) and all(f.shape[0] == 2 for f in seen["features"])
    labels, attention = seen["labels"], seen["attention"]
    assert labels.shape == attention.shape == (2, 13, 22) and int(labels.max()) == 3 and seen["fraction"] == 0.05
    for i in range(2):  # whole segments, the one holding the most attended pixel among them
        chosen = labels[i][seen["roi"][i] > 0].unique()
        assert torch.equal(seen["roi"][i], torch.isin(labels[i], chosen).float())
        assert int(labels[i].flatten()[attention[i].argmax()]) in chosen.tolist()
    # blur 0: the mask is the region, each latent cell an 8x8 block of pixels
    assert mask.shape == (2, 104, 176) and preview.shape == (2, 104, 176, 3)
    assert torch.equal(mask, seen["roi"].repeat_interleave(8, dim=1).repeat_interleave(8, dim=2))
    plain = mask_from_words(m, clip, lat, words="cat", blur=0.0)[0]
    assert not torch.equal(mask, plain)  # not the thresholded attention map


def test_mask_from_words_names_its_errors(kit):
    m, clip, _, _ = kit["sd15"]
    lat = image_latent(8, 8)
    with pytest.raises(ValueError, match=r'Mask From Words \(InstDiffEdit\) \(Preprint\): "dog" is not in the prompt'):
        mask_from_words(m, clip, lat, words="cat, dog")
    with pytest.raises(ValueError, match="UNet.*SD1.x, SD2.x and SDXL only"):
        mask_from_words(tiny_model("flux"), clip, torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="latent is empty"):
        mask_from_words(m, clip, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="no words given"):
        mask_from_words(m, clip, lat, words=" , ")
    msg = node_class("PreprintMaskFromWords").validate_inputs(threshold=1.5)
    assert isinstance(msg, str) and msg.startswith("Mask From Words (InstDiffEdit) (Preprint): threshold")


# -- Directed Diffusion --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_strength_zero_or_an_empty_window_is_bitwise_the_plain_model(kit, family):
    m, clip, pos, neg = kit[family]
    plain = sample(m, family, pos, neg)
    assert torch.equal(sample(directed(m, clip, strength=0.0), family, pos, neg), plain)
    assert torch.equal(sample(directed(m, clip, end=0.0), family, pos, neg), plain)
    assert not torch.equal(sample(directed(m, clip), family, pos, neg), plain)


def _layer_keys(model) -> dict:
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


def _spied(model, outer_log: list):
    """A clone whose every attn2 replacement is wrapped by a spy recording (sigma, cond_or_uncond, output)."""
    m = model.clone()
    for key, prev in list(_layer_keys(model).items()):
        def spy(q, k, v, extra, prev=prev):
            out = prev(q, k, v, extra)
            outer_log.append((float(extra["sigmas"].max()), list(extra["cond_or_uncond"]), out.clone()))
            return out
        m.set_model_attn2_replace(spy, *key)
    return m


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_positive_rows_change_and_only_inside_the_window(kit, family):
    """Spies below and above the Directed Diffusion patch of every layer, in one run: what the patch hands on
    equals what it got on the negative rows always, and on the positive rows outside its window."""
    from preprint.nodes._host import attention
    from preprint.nodes.regional import _unet_cross_attention_layers

    m, clip, pos, neg = kit[family]
    below, above = [], []
    base = m.clone()
    for key in _unet_cross_attention_layers(m.get_model_object("diffusion_model")):
        def inner(q, k, v, extra):
            out = attention(q, k, v, extra["n_heads"], transformer_options=extra)
            below.append(out.clone())
            return out
        base.set_model_attn2_replace(inner, *key)
    ms = m.get_model_object("model_sampling")
    patched = _spied(directed(base, clip, end=0.3), above)
    sample(patched, family, pos, neg)
    assert len(below) == len(above) > 0
    edge = ms.percent_to_sigma(0.3)
    inside = changed = 0
    for got, (sigma, cou, out) in zip(below, above, strict=True):
        per = out.shape[0] // len(cou)
        for j, c in enumerate(cou):
            rows = slice(j * per, (j + 1) * per)
            if c == 1 or sigma < edge:
                assert torch.equal(out[rows], got[rows])
            else:
                inside += 1
                changed += not torch.equal(out[rows], got[rows])
    assert inside > 0 and changed == inside


def test_non_square_sizes_a_mask_instead_of_a_box_and_batches(kit):
    m, clip, pos, neg = kit["sd15"]
    plain = sample(m, "sd15", pos, neg, h=13, w=22, batch=2)
    mask = torch.zeros(1, 104, 176)
    mask[:, 20:80, 100:170] = 1.0
    by_mask = sample(directed(m, clip, mask=mask), "sd15", pos, neg, h=13, w=22, batch=2)
    by_box = sample(directed(m, clip, x=0.1, y=0.1, width=0.3, height=0.5), "sd15", pos, neg, h=13, w=22, batch=2)
    assert by_mask.shape == plain.shape and torch.isfinite(by_mask).all()
    assert not torch.equal(by_mask, plain) and not torch.equal(by_mask, by_box)
    with pytest.raises(ValueError, match=r"Directed Diffusion \(Preprint\): the mask is empty"):
        directed(m, clip, mask=torch.zeros(1, 8, 8))


def test_stacks_with_regional_prompting_in_either_order(kit):
    m, clip, pos, neg = kit["sd15"]
    other = clip.encode_from_tokens_scheduled(clip.tokenize("a green dog"))
    left = torch.zeros(1, 96, 96)
    left[:, :, :48] = 1.0
    region = run_node("PreprintRegion", conditioning=other, mask=left, strength=1.0, regions=None)[0]

    def regional(model):
        return run_node("PreprintRegionalPrompting", model=model, regions=region, base_ratio=0.0,
                        start_percent=0.0, end_percent=1.0)[0]

    only_regional = sample(regional(m), "sd15", pos, neg)
    only_directed = sample(directed(m, clip), "sd15", pos, neg)
    dd_over_rp = sample(directed(regional(m), clip), "sd15", pos, neg)
    rp_over_dd = sample(regional(directed(m, clip)), "sd15", pos, neg)
    for out in (dd_over_rp, rp_over_dd):
        assert not torch.equal(out, only_regional) and not torch.equal(out, only_directed)
    # switched off, the directed layer hands on exactly what regional prompting made, in either order
    assert torch.equal(sample(directed(regional(m), clip, strength=0.0), "sd15", pos, neg), only_regional)
    assert torch.equal(sample(regional(directed(m, clip, end=0.0)), "sd15", pos, neg), only_regional)


def test_directed_diffusion_names_its_errors(kit):
    m, clip, _, _ = kit["sd15"]
    with pytest.raises(ValueError, match=r'Directed Diffusion \(Preprint\): "dog" is not in the prompt'):
        directed(m, clip, words="dog")
    with pytest.raises(ValueError, match="is a Flux.*SD1.x, SD2.x and SDXL only"):
        directed(tiny_model("flux"), clip)
    with pytest.raises(ValueError, match="empty or outside the frame"):
        directed(m, clip, x=1.0)
    msg = node_class("PreprintDirectedDiffusion").validate_inputs(strength=-1.0)
    assert isinstance(msg, str) and msg.startswith("Directed Diffusion (Preprint): strength")


def test_sdxl_l_and_g_tokenizations_place_words_alike(kit):
    from preprint.nodes.word_attention import _token_ids, word_positions

    _, clip, _, _ = kit["sdxl"]
    ids = _token_ids(clip, PROMPT)
    assert set(ids) == {"g", "l"}
    groups, _ = word_positions("X", clip, PROMPT, ["cat", "blue sofa"])
    assert groups == [[3], [7, 8]]  # <start> a red cat sitting on a blue sofa
