"""PAG / SoftPAG / SEG on Qwen-Image, Wan and HunyuanVideo, checked at the attention call itself.

A recording block patch, installed before the guidance node, sees every attention call of one block and what the
guidance made of it: the perturbed copy's rows must equal the perturbed map written out from scratch (an explicit
L x L mask over the family's own token order: Qwen-Image [text | image], HunyuanVideo [image | text], Wan image
alone, video frames blurred one by one), every other row and every cross-attention call must be ComfyUI's own result.
The families' end-to-end behaviour (changes the result, scale 0 exact) is in ``test_dit_families.py``.
"""

from __future__ import annotations

import comfy.sample
import pytest
import torch

from preprint.guidance.attention_perturbation import blur_tokens, split_heads
from preprint.guidance.pag_runtime import PAG, SEG, SOFT_PAG, chunks_of, rows_of

from .harness import make_conds, run_node, tiny_model
from .test_dit_families import conds, tiny

NODES = {"pag": ("PreprintPerturbedAttentionGuidance", PAG), "softpag": ("PreprintSoftPAG", SOFT_PAG),
         "seg": ("PreprintSmoothedEnergyGuidance", SEG)}
SEG_SIGMA = 1.5


@pytest.fixture(scope="module")
def models():
    return {**{f: tiny(f) for f in ("qwen_image", "wan", "hunyuan_video")}, "flux": tiny_model("flux")}


def recorder(calls: list):
    """A 'dit' block patch that wraps whatever attention override the block receives and records each call into
    ``calls`` (a plain function: ComfyUI copies patch objects when it clones a model, functions it shares)."""

    def patch(args, extra):
        topts = args["transformer_options"]
        outer = topts.get("optimized_attention_override")

        def record(func, *a, **kw):
            out = outer(func, *a, **kw) if outer is not None else func(*a, **kw)
            calls.append({"a": a, "kw": kw, "out": out, "plain": func(*a, **kw), "topts": topts})
            return out

        options = {**topts, "optimized_attention_override": record}
        return extra["original_block"]({**args, "transformer_options": options})
    return patch


def heads(t, n, skip):
    return t if skip else split_heads(t.reshape(t.shape[0], t.shape[1], -1), n)


def explicit_identity(q, k, v, image: list[int]):
    """PAG's map written out: an image query sees every text key and its own image key; text queries see all."""
    length = q.shape[-2]
    logits = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
    idx = torch.tensor(image)
    block = torch.zeros(length, length)
    block[idx[:, None], idx[None, :]] = float("-inf")
    block[idx, idx] = 0.0
    return torch.softmax(logits + block, -1) @ v.float()


def explicit_seg(q, k, v, image_start: int, grid, frames: int):
    q = q.clone()
    n = grid[0] * grid[1]
    for f in range(frames):  # each frame's queries blurred on that frame's grid alone
        s = image_start + f * n
        q[:, :, s:s + n] = blur_tokens(q[:, :, s:s + n], grid, SEG_SIGMA)
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v.float()


def run(model, family, node, layer, shape, extra_topts=None):
    """One CFG step with the node on ``layer`` ('double:1'); returns the recorder's calls."""
    node_id, tech = NODES[node]
    m = model.clone()
    calls: list = []
    group, idx = layer.split(":")
    m.set_model_patch_replace(recorder(calls), "dit", "single_block" if group == "single" else "double_block", int(idx))
    if extra_topts:
        m.model_options["transformer_options"].update(extra_topts)
    extra = {"blur_sigma": SEG_SIGMA} if node == "seg" else {"softness": 1.0} if node == "softpag" else {}
    patched = run_node(node_id, model=m, scale=3.0, layers=layer, adaptive_scale=0.0, sigma_start=-1.0,
                       sigma_end=-1.0, rescale=0.0, **extra)[0]
    latent = torch.zeros(1, *shape)
    pos, neg = make_conds("flux") if family == "flux" else conds(family)
    comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 0), 1, 3.0, "euler", "simple", pos, neg, latent,
                        seed=0, disable_pbar=True)
    return calls, tech


def perturbed_rows(call, tech, batch):
    topts = call["topts"]
    info = topts.get(tech.marker)
    cou = topts["cond_or_uncond"]
    return rows_of(chunks_of(cou, info.cond_index), batch, len(cou))


def check_calls(calls, tech, expected, n_heads):
    """Every call: perturbed rows == ``expected(q, k, v)`` (None: not an attention to perturb); other rows bitwise
    ComfyUI's own. Returns how many calls were perturbed."""
    perturbed = 0
    for c in calls:
        a, kw = c["a"], c["kw"]
        skip = kw.get("skip_reshape", False)
        q, k, v = (heads(t, n_heads, skip) for t in a[:3])
        rows = perturbed_rows(c, tech, q.shape[0])
        assert rows, "the perturbed copy rides in the same call"
        out, plain = c["out"], c["plain"]
        out_h = out if kw.get("skip_output_reshape") else split_heads(out, n_heads)
        plain_h = plain if kw.get("skip_output_reshape") else split_heads(plain, n_heads)
        others = [r for r in range(q.shape[0]) if r not in rows]
        assert torch.equal(out_h[others], plain_h[others])
        want = expected(q[rows], k[rows], v[rows])
        if want is None:
            assert torch.equal(out, plain)
            continue
        perturbed += 1
        torch.testing.assert_close(out_h[rows].float(), want, atol=2e-5, rtol=2e-4)
        assert not torch.allclose(out_h[rows], plain_h[rows], atol=1e-4)
    return perturbed


# Qwen-Image: latent 9 x 13 (odd, non-square: grid 5 x 7 after padding), joint [text | image] of 6 + 35 tokens
@pytest.mark.parametrize("node", ["pag", "softpag"])
def test_qwen_image_perturbs_the_image_rows_of_its_joint_attention(models, node):
    calls, tech = run(models["qwen_image"], "qwen_image", node, "double:1", (16, 1, 9, 13))
    n_txt, n_img = 6, 5 * 7
    done = check_calls(calls, tech, lambda q, k, v: explicit_identity(q, k, v, list(range(n_txt, n_txt + n_img)))
                       if q.shape[2] == n_txt + n_img else None, 2)
    assert done == 1


def test_qwen_image_seg_blurs_the_image_queries(models):
    calls, tech = run(models["qwen_image"], "qwen_image", "seg", "double:1", (16, 1, 9, 13))
    assert check_calls(calls, tech, lambda q, k, v: explicit_seg(q, k, v, 6, (5, 7), 1), 2) == 1


# HunyuanVideo: 2 latent frames of 8 x 12 (grid 4 x 6 each): [image | text] = 48 + 6 tokens, in both block kinds
@pytest.mark.parametrize("layer", ["double:1", "single:1"])
def test_hunyuan_video_perturbs_image_tokens_that_come_first(models, layer):
    calls, tech = run(models["hunyuan_video"], "hunyuan_video", "pag", layer, (16, 2, 8, 12))
    n_img, n_txt = 48, 6
    done = check_calls(calls, tech, lambda q, k, v: explicit_identity(q, k, v, list(range(n_img)))
                       if q.shape[2] == n_txt + n_img else None, 4)
    assert done == 1


def test_hunyuan_video_seg_blurs_each_frame_on_its_own(models):
    calls, tech = run(models["hunyuan_video"], "hunyuan_video", "seg", "double:0", (16, 2, 8, 12))
    assert check_calls(calls, tech, lambda q, k, v: explicit_seg(q, k, v, 0, (4, 6), 2), 4) == 1


# Wan: self-attention over 2 frames x 5 x 7 tokens (latent 9 x 13); its text cross-attention must stay untouched
@pytest.mark.parametrize("node", ["pag", "seg"])
def test_wan_perturbs_self_attention_and_leaves_cross_attention(models, node):
    calls, tech = run(models["wan"], "wan", node, "double:1", (16, 2, 9, 13))
    n_img = 2 * 5 * 7

    def expected(q, k, v):
        if k.shape[2] != n_img:
            return None  # cross-attention over the text
        return explicit_seg(q, k, v, 0, (5, 7), 2) if node == "seg" else v.float()
    assert check_calls(calls, tech, expected, 2) == 1
    assert len(calls) == 2  # the block's self- and cross-attention were both seen


def test_single_block_reads_the_hosts_image_span_when_it_gives_one(models):
    """Newer ComfyUI states ``block_type`` and ``img_slice`` in the single blocks; when present they decide the
    split, not the text length the pack records. Simulated here with a span that disagrees with the text length."""
    n_txt, n_img = 8, 4 * 6  # tiny Flux: 8 text tokens, latent 8 x 12
    claimed = [n_txt + 4, n_txt + n_img]
    calls, tech = run(models["flux"], "flux", "pag", "single:1", (16, 8, 12),
                      {"block_type": "single", "img_slice": claimed})
    done = check_calls(calls, tech, lambda q, k, v: explicit_identity(q, k, v, list(range(*claimed))), 4)
    assert done == 1


def test_lumina2_is_refused_with_the_reason(models):
    lumina = tiny("lumina2")
    for node_id, _ in NODES.values():
        with pytest.raises(TypeError, match=r"Lumina2 / Z-Image \(NextDiT\).*no per-block patch point"):
            run_node(node_id, model=lumina, scale=3.0, layers="", adaptive_scale=0.0, sigma_start=-1.0,
                     sigma_end=-1.0, rescale=0.0)


def test_sag_refuses_a_video_dit_naming_its_family(models):
    with pytest.raises(ValueError, match=r"which Wan video DiT models do not have"):
        run_node("PreprintSelfAttentionGuidance", model=models["wan"], scale=0.75, blur_sigma=1.0, threshold=1.0,
                 layer="", sigma_start=-1.0, sigma_end=-1.0)
