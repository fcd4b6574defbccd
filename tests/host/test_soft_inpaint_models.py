"""Differential Diffusion with inpainting models: the concat mask and masked image the network sees follow the
change map thresholded at every call's sigma (SD1.5 inpaint layout, 9 input channels; Flux Fill, 16 + 64 concat
channels), an all-ones map is core's plain inpainting run bitwise, and a model without a concat input keeps the
plain path."""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.supported_models
import pytest
import torch

from preprint.runner.tiny_models import _flux_config, _sd15_config, randomise_, tiny_vae

from .harness import make_conds, make_noise, node_class, run_node, tiny_model

WMP = comfy.patcher_extension.WrappersMP
CHANGE = (0.0, 0.3, 0.5, 0.8, 1.0)  # one stripe of 4 latent columns each, then 0
JOIN = (None, 7, 5, 2, 0)  # first step (of 10) a stripe is regenerated: img2img of denoise m starts at 10 (1 - m)


def _patcher(config):
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomise_(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


@pytest.fixture(scope="module")
def sd15_inpaint():
    # ComfyUI takes an SD model with more than 4 input channels for an inpainting model (set_inpaint)
    m = _patcher(comfy.supported_models.SD15({**_sd15_config(), "in_channels": 9}))
    assert m.model.concat_keys == ("mask", "masked_image")
    return m


@pytest.fixture(scope="module")
def flux_fill():
    return _patcher(comfy.supported_models.Flux({**_flux_config(), "in_channels": 16 + 16 + 64}))


def core(node_id: str, **inputs):
    """Run one of core's (V1) nodes by its FUNCTION."""
    cls = node_class(node_id)
    return getattr(cls(), cls.FUNCTION)(**inputs)


def dd(m):
    return run_node("PreprintDifferentialDiffusion", model=m)[0]


def stripes(h: int, w: int, scale: int) -> torch.Tensor:
    """The change map: CHANGE in stripes of 4 latent columns, as a ``[1, h * scale, w * scale]`` mask."""
    row = torch.zeros(w)
    row[: 4 * len(CHANGE)] = torch.tensor(CHANGE).repeat_interleave(4)
    return row.repeat_interleave(scale).view(1, 1, -1).expand(1, h * scale, w * scale).clone()


def spy(m, seen: list):
    """A DIFFUSION_MODEL wrapper recording the network's input (noisy latent and concat input, as _apply_model
    joined them) and the call's sigma."""

    def record(executor, x, *args, **kwargs):
        to = kwargs.get("transformer_options")
        if to is None:
            to = next(a for a in args if isinstance(a, dict) and "sigmas" in a)
        seen.append((x.detach().clone(), float(to["sigmas"][0])))
        return executor(x, *args, **kwargs)

    m = m.clone()
    m.add_wrapper_with_key(WMP.DIFFUSION_MODEL, "zz_spy", record)
    return m


def inpaint_conditioning(family, mask, h, w, seed=5):
    """Core's InpaintModelConditioning on a random picture with a tiny VAE: conditionings with the masked-image
    latent and the mask, and the latent of the whole picture carrying the mask as its noise mask."""
    pos, neg = make_conds(family)
    pixels = torch.rand(1, h * 8, w * 8, 3, generator=torch.Generator().manual_seed(seed))
    vae = tiny_vae(latent_channels=4 if family == "sd15" else 16)
    pos, neg, latent = core("InpaintModelConditioning", positive=pos, negative=neg, vae=vae, pixels=pixels,
                                mask=mask, noise_mask=True)
    return pos, neg, latent


def sample(m, pos, neg, latent, steps=10, sampler="euler"):
    samples = latent["samples"]
    return comfy.sample.sample(m, make_noise(samples, 0), steps, 4.0, sampler, "karras", pos, neg, samples,
                               noise_mask=latent["noise_mask"], seed=0, disable_pbar=True)


@pytest.mark.parametrize("h, w", [(12, 20), (13, 22)])
def test_an_all_ones_map_on_an_inpainting_model_is_bitwise_core_inpainting(sd15_inpaint, h, w):
    pos, neg, latent = inpaint_conditioning("sd15", torch.ones(1, h * 8, w * 8), h, w)
    assert torch.equal(sample(dd(sd15_inpaint), pos, neg, latent), sample(sd15_inpaint, pos, neg, latent))


def _check_calls(seen, h, w, expected_masked):
    """Every call: mask channel == the thresholded stripes at its step; masked image as ``expected_masked``."""
    cols = [4 * k + c for k in range(len(CHANGE)) for c in (1, 2)]  # inside each stripe, away from resampled edges
    assert len(seen) == 10
    for step, (x, _) in enumerate(seen):
        want = torch.tensor([j is not None and step >= j for j in JOIN]).repeat_interleave(2).float()
        got = x[:, 4, :, cols]
        assert torch.equal(got, want.expand_as(got)), f"step {step}: mask input {got[0, 0]} != {want}"
        assert torch.equal(x[:, 4, :, 4 * len(CHANGE):], torch.zeros_like(x[:, 4, :, 4 * len(CHANGE):]))
        expected_masked(step, x[:, 5:9])


@pytest.mark.parametrize("h, w", [(12, 20), (13, 22)])
def test_the_inpainting_models_mask_and_masked_image_follow_the_change_map_every_step(sd15_inpaint, h, w):
    mask = stripes(h, w, 8)
    pos, neg, latent = inpaint_conditioning("sd15", mask, h, w)
    inner = sd15_inpaint.model
    # core hides where the mask rounds to 1: the stripes above 0.5 (torch rounds 0.5 to even, to 0)
    given = inner.process_latent_in(pos[0][1]["concat_latent_image"])
    original = inner.process_latent_in(latent["samples"])
    blank = inner.blank_inpaint_image_like(original)
    seen = []
    sample(spy(dd(sd15_inpaint), seen), pos, neg, latent)

    def masked(step, image):
        for k, (m, j) in enumerate(zip(CHANGE, JOIN, strict=True)):
            cols = slice(4 * k + 1, 4 * k + 3)
            if j is not None and step >= j:  # regenerated: hidden, by the conditioning's latent where it hid it
                want = (given if m > 0.5 else blank)[..., cols]
            else:  # held: the picture itself, even where the conditioning hid it
                want = original[..., cols]
            assert torch.allclose(image[..., cols], want.expand_as(image[..., cols]), rtol=0, atol=1e-6), \
                f"step {step}, stripe {m}"

    _check_calls(seen, h, w, masked)
    # and core alone feeds the conditioning's fixed, rounded mask at every step
    seen_core = []
    sample(spy(sd15_inpaint, seen_core), pos, neg, latent)
    assert torch.equal(seen_core[0][0][:, 4:], seen_core[-1][0][:, 4:])


def test_flux_fill_mask_channels_follow_the_change_map(flux_fill):
    h, w = 12, 21  # odd latent width: 6 x 11 tokens after the 2 x 2 patches
    pos, neg = make_conds("flux")
    g = torch.Generator().manual_seed(4)
    image = torch.randn(1, 16, h, w, generator=g)  # stands for the masked picture's latent
    mask = stripes(h, w, 8)
    # laid out as InpaintModelConditioning leaves them: the mask [B, 1, H, W] at pixel size
    pos = [[c, {**d, "concat_latent_image": image, "concat_mask": mask.unsqueeze(1)}] for c, d in pos]
    neg = [[c, {**d, "concat_latent_image": image, "concat_mask": mask.unsqueeze(1)}] for c, d in neg]
    latent = {"samples": torch.randn(1, 16, h, w, generator=g), "noise_mask": mask}
    seen = []
    sample(spy(dd(flux_fill), seen), pos, neg, latent)
    inner = flux_fill.model
    given, original = inner.process_latent_in(image), inner.process_latent_in(latent["samples"])
    blank = inner.process_latent_in(torch.zeros_like(original))
    assert len(seen) == 10
    for step, (x, _) in enumerate(seen):
        assert x.shape[1] == 16 + 16 + 64
        for k, (m, j) in enumerate(zip(CHANGE, JOIN, strict=True)):
            cols = slice(4 * k + 1, 4 * k + 3)
            on = j is not None and step >= j
            got = x[:, 32:, :, cols]
            assert torch.equal(got, torch.full_like(got, float(on))), f"step {step}, stripe {m}"
            want = (given if m > 0.5 else blank) if on else original
            assert torch.allclose(x[:, 16:32, :, cols], want[..., cols].expand_as(x[:, 16:32, :, cols]), atol=1e-6)
    # all ones with a full conditioning mask: core's Flux Fill run, bitwise
    ones = torch.ones(1, 1, h * 8, w * 8)
    pos1 = [[c, {**d, "concat_mask": ones}] for c, d in pos]
    neg1 = [[c, {**d, "concat_mask": ones}] for c, d in neg]
    full = {"samples": latent["samples"], "noise_mask": ones}
    assert torch.equal(sample(dd(flux_fill), pos1, neg1, full), sample(flux_fill, pos1, neg1, full))


def test_a_model_without_a_concat_input_keeps_the_plain_path():
    """On a plain SD1.5 the node is the change map alone: the same result as the denoise mask function by itself
    (the wrappers pass the call through untouched)."""
    from preprint.nodes.soft_inpaint import _ChangeMap

    sd15 = tiny_model("sd15")
    h, w = 13, 22
    g = torch.Generator().manual_seed(3)
    latent = {"samples": torch.randn(1, 4, h, w, generator=g), "noise_mask": stripes(h, w, 8)}
    pos, neg = make_conds("sd15")
    mask_only = sd15.clone()
    mask_only.set_model_denoise_mask_function(_ChangeMap())
    seen = []
    ours = sample(spy(dd(sd15), seen), pos, neg, latent)
    assert seen[0][0].shape[1] == 4
    assert torch.equal(ours, sample(mask_only, pos, neg, latent))


def test_a_cropped_model_call_is_refused_by_name(sd15_inpaint):
    """Area conditioning crops the concat input: the per-step mask cannot be placed, and the error says so."""
    h, w = 12, 20
    pos, neg, latent = inpaint_conditioning("sd15", stripes(h, w, 8), h, w)
    area = core("ConditioningSetArea", conditioning=pos, width=64, height=64, x=0, y=0, strength=1.0)[0]
    with pytest.raises(ValueError, match="Differential Diffusion, sigma space \\(Preprint\\): a model call covers"):
        sample(dd(sd15_inpaint), area, neg, latent)
