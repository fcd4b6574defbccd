"""Regional prompting at run time, more of its contract: the joint-mask override's ways of being called, the
cached joint text per tile layout, the positive rows of a batch of several prompt chunks, the mask's dtype on a
JointRegional model, and the text-position restart (Flux.2, Qwen-Image) with its warn-once when the embedder is
not called through its module. Fakes of ComfyUI's objects as in test_regional_attention.py."""

from __future__ import annotations

import logging

import pytest
import torch

from preprint.highres.tiling import Tile
from preprint.regional.attention import Region, joint_mask, masks_on_grid
from preprint.regional.runtime import (
    FluxRegional,
    JointMaskOverride,
    JointRegional,
    JointRegionText,
    RegionSet,
    restart_region_positions,
)
from preprint.utils.sigma_window import SigmaWindow

WARNING = "was not called through its module"


def _func(q, k, v, heads=1, mask=None, *rest, **kwargs):
    return {"mask": mask, "rest": rest, "kwargs": kwargs, "q": q}


# ------------------------------------------------------------------------------------------ JointMaskOverride

def test_override_hands_the_mask_by_keyword_when_the_call_names_its_none_mask():
    """``func(q, k, v, heads, mask=None)`` (Flux / SD3 style): the mask replaces the keyword; the call must not
    get it twice (positionally and by name)."""
    mask = torch.zeros(2, 7, 7)
    override = JointMaskOverride(mask, 7)
    q = torch.zeros(2, 7, 4)
    got = override(_func, q, q, q, 2, mask=None)
    assert got["mask"] is mask and got["rest"] == ()
    got = override(_func, q, q, q, 2)  # four positional arguments, no mask at all: by keyword as well
    assert got["mask"] is mask and got["rest"] == ()
    assert override.hits == 2


def test_override_keeps_the_arguments_after_a_positional_mask():
    mask = torch.zeros(2, 7, 7)
    override = JointMaskOverride(mask, 7)
    q = torch.zeros(2, 7, 4)
    got = override(_func, q, q, q, 2, None, "precision", "more")
    assert got["mask"] is mask and got["rest"] == ("precision", "more")


def test_override_recognises_the_joint_call_by_the_querys_length():
    """A call whose query has the joint length gets the mask whatever its keys' length; a query passed alone
    positionally (keys and values by name) is read as well."""
    mask = torch.zeros(2, 7, 7)
    override = JointMaskOverride(mask, 7)
    q, kv = torch.zeros(2, 7, 4), torch.zeros(2, 5, 4)
    assert override(_func, q, kv, kv, 2)["mask"] is mask
    assert override(_func, q, k=kv, v=kv, heads=2)["mask"] is mask
    assert override(_func, kv, q, q, 2)["mask"] is None  # a query of another length: no mask
    assert override.lengths == {7, 5} and override.hits == 2


def test_override_reads_the_token_axis_of_unreshaped_heads():
    """``skip_reshape=True``: q is ``[B, heads, L, head_dim]`` and L is its third axis."""
    mask = torch.zeros(2, 7, 7)
    override = JointMaskOverride(mask, 7)
    q = torch.zeros(2, 3, 7, 4)
    assert override(_func, q, q, q, 3, skip_reshape=True)["mask"] is mask
    assert override.lengths == {7}
    other = torch.zeros(2, 7, 5, 7)  # heads and head_dim of the joint length, tokens not
    assert override(_func, other, other, other, 7, skip_reshape=True)["mask"] is None


# ------------------------------------------------------------------------------------------ JointRegionText cache

def test_joint_region_text_rebuilds_for_tiles_of_another_frame_size():
    """The same tiles over a frame of another height or width are another part of the region: the cached build
    is only reused for the same frame; each build equals a fresh builder's."""
    quadrant = torch.zeros(1, 8, 12)
    quadrant[:, :4, :6] = 1.0  # the frame's top-left quarter
    regions = RegionSet((Region(torch.ones(1, 3, 4), quadrant),))
    joint = JointRegionText(regions, 0.0)
    context = torch.zeros(1, 2, 4)
    group = [Tile(0, 4, 8, 6)]
    results = []
    for frame in [(8, 12), (16, 12), (16, 24)]:
        tiles = (group, *frame)
        _, mask = joint.build((0,), 1, (4, 3), 0, 2, context, torch.float32, torch.device("cpu"), tiles)
        _, fresh = JointRegionText(regions, 0.0).build((0,), 1, (4, 3), 0, 2, context, torch.float32,
                                                       torch.device("cpu"), tiles)
        assert torch.equal(mask, fresh)
        results.append(mask)
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[1], results[2])


# ------------------------------------------------------------------------------------------ fakes

class _Params:
    def __init__(self, txt_ids_dims):
        self.txt_ids_dims = txt_ids_dims


class _Flux2:
    """comfy.ldm.flux.model.Flux on a Flux.2 layout: text numbered 0..L-1 along ``txt_ids_dims``; ``_forward``
    hands the joint ids to ``pe_embedder`` (through its module unless ``compiled``)."""

    def __init__(self, txt_ids_dims=(1, 3), compiled=False, patch_size=2):
        self.params = _Params(list(txt_ids_dims) if txt_ids_dims is not None else None)
        self.patch_size, self.compiled, self.seen = patch_size, compiled, []
        self.pe_embedder = torch.nn.Identity()

    def _forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options={}, **kwargs):  # noqa: B006
        b, n_txt = context.shape[0], context.shape[1]
        n_img = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        ids = torch.zeros(b, n_txt + n_img, 4)
        for a in self.params.txt_ids_dims or []:
            ids[:, :n_txt, a] = torch.arange(float(n_txt))
        ids[:, n_txt:, 1] = 100.0 + torch.arange(float(n_img))
        pe = ids if self.compiled else self.pe_embedder(ids)
        self.seen.append({"context": context, "pe": pe, "ids": ids, **kwargs})
        return "out"


from .test_regional_attention import _Executor  # noqa: E402  (the wrapper executor's stand-in)


def _flux2_case(compiled=False, cou=(0, 1), batch=None):
    g = torch.Generator().manual_seed(7)
    model = _Flux2(compiled=compiled)
    regions = RegionSet((Region(torch.randn(1, 2, 8, generator=g), torch.ones(1, 6, 4)),
                         Region(torch.randn(1, 3, 8, generator=g), torch.ones(1, 6, 4))))
    wrapper = FluxRegional("Regional Prompting (Preprint)", regions, 0.5, SigmaWindow(), family="Flux.2")
    batch = batch or 2 * len(cou)
    x = torch.randn(batch, 16, 6, 4, generator=g)  # 3 x 2 image tokens of 2x2 patches
    context = torch.randn(batch, 5, 8, generator=g)  # 5 tokens: neither the batch nor the width
    to = {"cond_or_uncond": list(cou), "sigmas": torch.tensor([3.0])}
    args = (x, torch.ones(batch), context, torch.zeros(batch, 3), None, None, None, to)
    return model, wrapper, args


def _warnings(caplog) -> int:
    return sum(WARNING in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ FluxRegional

def test_flux2_region_text_is_numbered_from_zero_again_on_the_text_axes():
    """Base prompt of 5 tokens, regions of 2 and 3: the model numbers the text 0..9 along axes 1 and 3; the call's
    embedder sees 0..4, 0..1, 0..2 there, the other axes and the image ids as the model made them."""
    model, wrapper, args = _flux2_case()
    assert wrapper(_Executor(model), *args) == "out"
    got = model.seen[0]
    assert got["context"].shape == (4, 10, 8) and got["attention_mask"].shape == (4, 16, 16)
    want = got["ids"].clone()
    numbering = torch.tensor([0.0, 1, 2, 3, 4, 0, 1, 0, 1, 2])
    for a in (1, 3):
        want[:, :10, a] = numbering
    assert torch.equal(got["pe"], want)
    # the hook is gone after the call
    ids = torch.zeros(4, 16, 4)
    ids[:, :, 1] = torch.arange(16.0)
    assert torch.equal(model.pe_embedder(ids), ids)


def test_flux2_warns_once_when_the_embedder_is_not_called_through_its_module(caplog):
    model, wrapper, args = _flux2_case(compiled=True)
    with caplog.at_level(logging.WARNING):
        wrapper(_Executor(model), *args)
        wrapper(_Executor(model), *args)
    assert _warnings(caplog) == 1
    assert torch.equal(model.seen[0]["pe"], model.seen[0]["ids"])  # positions kept, as the warning says


def test_flux2_does_not_warn_when_the_positions_were_restarted(caplog):
    model, wrapper, args = _flux2_case()
    with caplog.at_level(logging.WARNING):
        wrapper(_Executor(model), *args)
        wrapper(_Executor(model), *args)
    assert _warnings(caplog) == 0


def test_flux_wrapper_reads_the_batch_of_several_prompt_chunks():
    """ComfyUI batches several conditionings' chunks together (``cond_or_uncond`` [0, 0, 1]: three rows of a
    16-channel latent): the two positive rows get the region text, the negative row the padding."""
    model, wrapper, args = _flux2_case(cou=(0, 0, 1), batch=3)
    wrapper(_Executor(model), *args)
    got = model.seen[0]
    region_text = torch.cat([r.context[0] for r in wrapper.regions.regions])
    assert got["context"].shape == (3, 10, 8)
    assert torch.equal(got["context"][0, 5:], region_text) and torch.equal(got["context"][1, 5:], region_text)
    assert torch.equal(got["context"][2, 5:], torch.zeros(5, 8))


# ------------------------------------------------------------------------------------------ JointRegional

class _Diffusion(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pe_embedder = torch.nn.Identity()


class _Joint:
    """A joint-attention model (Qwen-Image style) behind APPLY_MODEL: text numbered ``start + j`` on all three
    rotary axes, ids handed to ``diffusion_model.pe_embedder`` (unless ``compiled``), then one joint attention
    call through the override with the query of the whole sequence."""

    def __init__(self, manual_cast_dtype=None, dtype=torch.float32, compiled=False, start=5):
        self.manual_cast_dtype, self.dtype, self.compiled, self.start = manual_cast_dtype, dtype, compiled, start
        self.diffusion_model = _Diffusion()
        self.seen = []

    def get_dtype(self):
        return self.dtype

    def _apply(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        b, n_txt = c_crossattn.shape[0], c_crossattn.shape[1]
        n_img = (x.shape[-2] // 2) * (x.shape[-1] // 2)
        ids = torch.zeros(b, n_txt + n_img, 3)
        ids[:, :n_txt, :] = (self.start + torch.arange(float(n_txt))).view(1, -1, 1)
        ids[:, n_txt:, 1] = torch.arange(float(n_img))
        pe = ids if self.compiled else self.diffusion_model.pe_embedder(ids)
        q = torch.zeros(b, n_txt + n_img, 4)
        got = transformer_options["optimized_attention_override"](_func, q, q, q, 1)
        self.seen.append({"context": c_crossattn, "ids": ids, "pe": pe, "mask": got["mask"],
                          "options": transformer_options})
        return x


def _joint_case(restart=True, cou=(0, 1), batch=2, **model_kw):
    g = torch.Generator().manual_seed(8)
    regions = RegionSet((Region(torch.randn(1, 2, 8, generator=g), torch.ones(1, 6, 4)),
                         Region(torch.randn(1, 3, 8, generator=g), torch.ones(1, 6, 4))))
    wrapper = JointRegional("Regional Prompting (Preprint)", regions, 0.5, SigmaWindow(), patch=2, lead=0,
                            restart_text_positions=restart)
    model = _Joint(**model_kw)
    x, context = torch.zeros(batch, 16, 6, 4), torch.randn(batch, 4, 8, generator=g)
    to = {"cond_or_uncond": list(cou), "sigmas": torch.tensor([3.0] * batch)}
    call = (x, torch.tensor([3.0] * batch), None, context, None, to)
    return model, wrapper, call


def test_joint_wrapper_restarts_each_regions_text_at_the_first_text_tokens_position():
    model, wrapper, call = _joint_case()
    wrapper(_Executor(model, model._apply), *call)
    got = model.seen[0]
    want = got["ids"].clone()
    want[:, :9, :] = (5.0 + torch.tensor([0.0, 1, 2, 3, 0, 1, 0, 1, 2])).view(1, -1, 1)
    assert torch.equal(got["pe"], want)
    assert got["mask"] is not None and got["mask"].shape == (2, 15, 15)


@pytest.mark.parametrize("restart,compiled,warnings", [(True, True, 1), (True, False, 0), (False, True, 0),
                                                       (False, False, 0)])
def test_joint_wrapper_warns_once_only_when_it_restarts_and_the_embedder_was_bypassed(restart, compiled, warnings,
                                                                                       caplog):
    model, wrapper, call = _joint_case(restart=restart, compiled=compiled)
    with caplog.at_level(logging.WARNING):
        wrapper(_Executor(model, model._apply), *call)
        wrapper(_Executor(model, model._apply), *call)
    assert _warnings(caplog) == warnings
    if not restart or compiled:  # positions as the model made them
        assert torch.equal(model.seen[0]["pe"], model.seen[0]["ids"])


@pytest.mark.parametrize("manual,dtype,want", [(None, torch.float16, torch.float16),
                                               (torch.bfloat16, torch.float16, torch.bfloat16)])
def test_joint_wrapper_builds_the_mask_in_the_models_compute_dtype(manual, dtype, want):
    """The mask's dtype is the model's compute dtype: its manual cast dtype where it has one, else its own."""
    model, wrapper, call = _joint_case(restart=False, manual_cast_dtype=manual, dtype=dtype)
    wrapper(_Executor(model, model._apply), *call)
    override = model.seen[0]["options"]["optimized_attention_override"]
    assert override.mask.dtype == want


def test_joint_wrapper_reads_the_batch_of_several_prompt_chunks():
    model, wrapper, call = _joint_case(restart=False, cou=(0, 0, 1), batch=3)
    wrapper(_Executor(model, model._apply), *call)
    got = model.seen[0]
    region_text = torch.cat([r.context[0] for r in wrapper.joint.regions.regions])
    assert got["context"].shape == (3, 9, 8)
    assert torch.equal(got["context"][1, 4:], region_text) and torch.equal(got["context"][2, 4:], torch.zeros(5, 8))
    per_image = masks_on_grid([r.mask for r in wrapper.joint.regions.regions], 1, 3, 2)
    assert torch.equal(got["mask"][0], joint_mask([4, 2, 3], per_image, 0.5)[0])


# ------------------------------------------------------------------------------------------ the position hook

class _Embedder(torch.nn.Module):
    def forward(self, ids, *rest):
        return ids, rest


def test_position_hook_renumbers_the_first_input_and_passes_the_others_on():
    embedder, fired = _Embedder(), []
    restart_region_positions(embedder, [(3, 5)], 7, None, fired)
    ids = torch.zeros(1, 7, 2)
    ids[:, :5, :] = 10.0 + torch.arange(5.0).view(1, -1, 1)
    scale, shift = torch.tensor([2.0]), torch.tensor([3.0])
    out, rest = embedder(ids, scale, shift)
    want = ids.clone()
    want[:, 3:5, :] = torch.tensor([10.0, 11.0]).view(1, -1, 1)
    assert torch.equal(out, want) and rest == (scale, shift) and fired == [True]
