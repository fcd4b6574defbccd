"""LIME Localized Editing through real ComfyUI on tiny SD1.5 / SDXL layouts with their real CLIP tokenizers:
off-switch exactness, what reaches the attention layers (a spy around the patch: positive rows, inside the mask,
inside the window), non-square sizes and masks of other sizes, batches, named errors, stacking with Directed
Diffusion and Regional Prompting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .harness import node_class, run_node, run_sampling, tiny_model
from .test_word_attention import FAMILIES, PROMPT, kit  # noqa: F401  (fixture and prompts shared with the word-attention tests)


def box_mask(h=96, w=96, batch=1, x0=0.0, x1=0.5, y0=0.0, y1=1.0):
    m = torch.zeros(batch, h, w)
    m[:, int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = 1.0
    return m


def lime(m, clip, mask=None, words="cat", strength=1.0, end=0.5, prompt=PROMPT, keep_start=False):
    mask = box_mask() if mask is None else mask
    return run_node("PreprintLIME", model=m, clip=clip, prompt=prompt, words=words, mask=mask, strength=strength,
                    end_percent=end, keep_start_token=keep_start)[0]


def sample(m, family, pos, neg, h=12, w=12, **kw):
    return run_sampling(m, family, steps=4, height=h, width=w, positive=pos, negative=neg, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_all_zero_mask_zero_strength_or_an_empty_window_is_bitwise_the_unpatched_model(kit, family):
    m, clip, pos, neg = kit[family]
    plain = sample(m, family, pos, neg)
    assert torch.equal(sample(lime(m, clip, mask=torch.zeros(1, 96, 96)), family, pos, neg), plain)
    assert torch.equal(sample(lime(m, clip, strength=0.0), family, pos, neg), plain)
    assert torch.equal(sample(lime(m, clip, end=0.0), family, pos, neg), plain)
    edited = sample(lime(m, clip), family, pos, neg)
    assert not torch.equal(edited, plain)
    assert torch.equal(sample(lime(m, clip), family, pos, neg), edited)  # deterministic
    assert not torch.equal(sample(lime(m, clip, keep_start=True), family, pos, neg), edited)


def _spied(model, log: list):
    """A clone whose every attn2 replacement is wrapped by a spy recording (sigma, cond_or_uncond, grid, the patch's
    output, the plain attention of the same q, k, v)."""
    from preprint.nodes._host import attention

    m = model.clone()
    for key, patch in list(model.model_options["transformer_options"]["patches_replace"]["attn2"].items()):
        def spy(q, k, v, extra, patch=patch):
            out = patch(q, k, v, extra)
            plain = attention(q, k, v, extra["n_heads"], transformer_options=extra)
            log.append((float(extra["sigmas"].max()), list(extra["cond_or_uncond"]),
                        tuple(int(n) for n in extra["activations_shape"][-2:]), out.clone(), plain))
            return out
        m.set_model_attn2_replace(spy, *key)
    return m


@pytest.mark.parametrize("family", FAMILIES)
def test_only_positive_rows_change_only_inside_the_mask_and_the_window(kit, family):
    """Non-square latent (13 x 22) and a mask of another size and aspect (40 x 24), resampled to every grid."""
    m, clip, pos, neg = kit[family]
    mask = box_mask(40, 24, x0=0.0, x1=0.5, y0=0.25, y1=0.75)
    log = []
    sample(_spied(lime(m, clip, mask=mask, end=0.3), log), family, pos, neg, h=13, w=22, batch=2)
    edge = m.get_model_object("model_sampling").percent_to_sigma(0.3)
    grids, inside_rows = set(), 0
    for sigma, cou, (h, w), out, plain in log:
        per = out.shape[0] // len(cou)
        region = F.adaptive_avg_pool2d(mask.unsqueeze(1), (h, w)).flatten() > 0
        for j, c in enumerate(cou):
            rows = slice(j * per, (j + 1) * per)
            if c == 1 or sigma < edge:
                assert torch.equal(out[rows], plain[rows])
                continue
            inside_rows += 1
            grids.add((h, w))
            assert torch.equal(out[rows][:, ~region], plain[rows][:, ~region])  # outside: bitwise
            changed = (out[rows][:, region] != plain[rows][:, region]).any(dim=-1)
            assert bool(changed.all())  # every position inside the region is regularised
    assert inside_rows > 0 and len(grids) >= 2  # several levels, each on its own grid (13 x 22, 7 x 11, ...)


def test_batches_with_a_mask_per_image_and_a_wrong_mask_batch(kit):
    m, clip, pos, neg = kit["sd15"]
    two = torch.cat([box_mask(x0=0.0, x1=0.5), box_mask(x0=0.5, x1=1.0)])
    out = sample(lime(m, clip, mask=two), "sd15", pos, neg, batch=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert not torch.equal(out, sample(lime(m, clip), "sd15", pos, neg, batch=2))
    with pytest.raises(ValueError, match=r"LIME Localized Editing \(Preprint\): the mask has a batch of 3 but the "
                                         r"latent batch is 2"):
        sample(lime(m, clip, mask=box_mask(batch=3)), "sd15", pos, neg, batch=2)


def test_lime_names_its_errors(kit):
    m, clip, _, _ = kit["sd15"]
    with pytest.raises(ValueError, match=r'LIME Localized Editing \(Preprint\): "dog" is not in the prompt'):
        lime(m, clip, words="cat, dog")
    with pytest.raises(ValueError, match=r"LIME Localized Editing \(Preprint\): this model's diffusion network is a "
                                         r"Flux.*SD1.x, SD2.x and SDXL only"):
        lime(tiny_model("flux"), clip)
    with pytest.raises(ValueError, match=r"LIME Localized Editing \(Preprint\): no words given"):
        lime(m, clip, words=" , ")
    with pytest.raises(ValueError, match=r"LIME Localized Editing \(Preprint\): the mask must be"):
        lime(m, clip, mask=torch.ones(1, 1, 8, 8))
    msg = node_class("PreprintLIME").validate_inputs(strength=1.5)
    assert isinstance(msg, str) and msg.startswith("LIME Localized Editing (Preprint): strength")


def test_a_prompt_other_than_the_positive_one_is_named(kit):
    m, clip, pos, neg = kit["sd15"]
    long = "a photo of " + ", ".join(["a tall green tree"] * 20) + ", and a cat"  # the word lands in chunk two
    with pytest.raises(ValueError, match=r"LIME Localized Editing \(Preprint\): the edit words sit at token"):
        sample(lime(m, clip, prompt=long), "sd15", pos, neg)


def _directed(m, clip, strength=1.0, end=0.5):
    return run_node("PreprintDirectedDiffusion", model=m, clip=clip, prompt=PROMPT, words="sofa", strength=strength,
                    trailing_tokens=20, end_percent=end, x=0.5, y=0.0, width=0.5, height=1.0, mask=None)[0]


def test_stacks_with_directed_diffusion_in_either_order(kit):
    m, clip, pos, neg = kit["sd15"]
    only_lime = sample(lime(m, clip), "sd15", pos, neg)
    only_dd = sample(_directed(m, clip), "sd15", pos, neg)
    lime_over_dd = sample(lime(_directed(m, clip), clip), "sd15", pos, neg)
    dd_over_lime = sample(_directed(lime(m, clip), clip), "sd15", pos, neg)
    for out in (lime_over_dd, dd_over_lime):
        assert torch.isfinite(out).all()
        assert not torch.equal(out, only_lime) and not torch.equal(out, only_dd)
    # switched off, either layer hands on exactly what the other made
    assert torch.equal(sample(lime(_directed(m, clip), clip, strength=0.0), "sd15", pos, neg), only_dd)
    assert torch.equal(sample(lime(_directed(m, clip), clip, mask=torch.zeros(1, 8, 8)), "sd15", pos, neg), only_dd)
    assert torch.equal(sample(_directed(lime(m, clip), clip, strength=0.0), "sd15", pos, neg), only_lime)


def test_stacks_with_regional_prompting(kit):
    m, clip, pos, neg = kit["sd15"]
    other = clip.encode_from_tokens_scheduled(clip.tokenize("a green dog"))
    region = run_node("PreprintRegion", conditioning=other, mask=box_mask(x0=0.5, x1=1.0), strength=1.0,
                      regions=None)[0]

    def regional(model):
        return run_node("PreprintRegionalPrompting", model=model, regions=region, base_ratio=0.0,
                        start_percent=0.0, end_percent=1.0)[0]

    only_regional = sample(regional(m), "sd15", pos, neg)
    both = sample(lime(regional(m), clip), "sd15", pos, neg)
    assert not torch.equal(both, only_regional) and not torch.equal(both, sample(lime(m, clip), "sd15", pos, neg))
    assert torch.equal(sample(lime(regional(m), clip, end=0.0), "sd15", pos, neg), only_regional)


def test_lime_follows_tiled_diffusions_tiles(kit):
    """Under Tiled Diffusion each tile's rows get the tile's part of the region: with two side-by-side tiles and
    the region over the left one, the right half is tiled plain sampling bit for bit and the left half is edited."""
    m, clip, pos, neg = kit["sd15"]
    halves = run_node("PreprintTiledDiffusion", model=m, tile_width=48, tile_height=96,
                      mode="overlapping (MultiDiffusion)", overlap=0, weighting="uniform", tile_batch_size=1)[0]
    plain = sample(halves, "sd15", pos, neg)
    edited = sample(lime(halves, clip, mask=box_mask(), end=1.0), "sd15", pos, neg)
    assert torch.equal(edited[..., 6:], plain[..., 6:])
    assert not torch.equal(edited[..., :6], plain[..., :6])
