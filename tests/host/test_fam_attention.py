"""FAM attention modulation through real ComfyUI sampling on tiny SD1.5 and SDXL layouts: off-switch exactness, one
native-size call per model call (cond and uncond batched, the native latent re-noised to the call's sigma with
one seeded noise), the blended layer output against the explicit blended map on a non-square, non-multiple-of-64
size, default layers, stacking with FAM frequency modulation, determinism, and bad input."""

from __future__ import annotations

import logging

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import pytest
import torch

from preprint.highres.fam_attention import CALL_KEY, Resampler

from .harness import make_conds, make_noise, node_class, run_node, tiny_model

H, W = 13, 22  # 104 x 176 px: odd, non-square, not a multiple of 64
NH, NW = 7, 11  # the native latent: about half the size


@pytest.fixture(scope="module")
def sd15():
    return tiny_model("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_model("sdxl")


def latent(seed=11, h=H, w=W, batch=1, channels=4):
    return torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(seed))


def am(m, native, weight=0.7, layers="", start=0.0, end=1.0):
    return run_node("PreprintFAMAttention", model=m, native_latent={"samples": native}, weight=weight,
                    layers=layers, start_percent=start, end_percent=end)[0]


def sample(m, family, start=None, steps=6, seed=0, lat=None, cfg=5.0, batch=1):
    lat = latent(1, batch=batch) if lat is None else lat
    pos, neg = make_conds(family)
    return comfy.sample.sample(m, make_noise(lat, seed), steps, cfg, "euler", "karras", pos, neg, lat,
                               start_step=start, seed=seed, disable_pbar=True)


def model_calls(m):
    """A clone of ``m`` recording every model call inside the node's wrapper: (noisy latent, sigmas)."""
    seen = []
    r = m.clone()

    def wrap(executor, x, t, *args, **kwargs):
        seen.append((x.clone(), t.clone()))
        return executor(x, t, *args, **kwargs)
    r.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_am_calls", wrap)
    return r, seen


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_switched_off_is_bitwise_the_unpatched_model(family, request):
    m = request.getfixturevalue(family)
    native = latent(5, NH, NW)
    plain = sample(m, family, start=2, steps=4)
    assert torch.equal(sample(am(m, native, weight=0.0), family, start=2, steps=4), plain)
    assert torch.equal(sample(am(m, native, start=0.4, end=0.4), family, start=2, steps=4), plain)
    # patched, but the window (the first 1% of the schedule) lies before this run's steps: every layer plain
    late = am(m, native, start=0.0, end=0.01)
    assert late.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert torch.equal(sample(late, family, start=2, steps=4), plain)
    assert not torch.equal(sample(am(m, native), family, start=2, steps=4), plain)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_one_native_size_call_per_model_call_at_the_same_step(family, request):
    m = request.getfixturevalue(family)
    native = latent(5, NH, NW)
    r, seen = model_calls(am(m, native))
    sample(r, family, start=2, steps=6)
    shapes = [tuple(x.shape) for x, _ in seen]
    # cond and uncond batched: the native call first, then the large one, same rows and timesteps
    assert shapes == [(2, 4, NH, NW), (2, 4, H, W)] * 4, shapes
    assert all(torch.equal(seen[i][1], seen[i + 1][1]) for i in range(0, len(seen), 2))
    # the native input is the native latent re-noised to the call's sigma, with one noise for the whole run
    z = m.model.process_latent_in(native)
    noises = []
    for x, sigma in seen[0::2]:
        noises.append((x[:1] - z) / sigma[0])
        assert torch.equal(x[0], x[1])  # cond and uncond rows of one image see one native latent
    assert 0.7 < float(noises[0].std()) < 1.3
    assert all(torch.allclose(n, noises[0], atol=1e-4) for n in noises[1:])


class Recording:
    """Wraps the installed attn1 replacement of one layer: its inputs, output and the call's mode."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, q, k, v, options):
        out = self.inner(q, k, v, options)
        call = options.get(CALL_KEY)
        self.calls.append((call.mode if call else None, q, k, v, out, list(options["activations_shape"])))
        return out


def _maps(q, k, heads):
    b, n, c = q.shape
    qs = q.reshape(b, n, heads, c // heads).transpose(1, 2).double()
    ks = k.reshape(b, k.shape[1], heads, c // heads).transpose(1, 2).double()
    return torch.softmax(qs @ ks.transpose(-1, -2) / qs.shape[-1] ** 0.5, dim=-1)


@pytest.mark.parametrize("family,key,weight", [("sd15", ("output", 4, 0), 0.7), ("sdxl", ("output", 1, 3), 0.4)])
def test_the_blended_layer_is_the_explicit_blended_map_times_the_values(family, key, weight, request):
    m = request.getfixturevalue(family)
    patched = am(m, latent(5, NH, NW), weight=weight)
    replaces = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
    rec = replaces[key] = Recording(replaces[key])
    sample(patched, family, start=3, steps=5)
    native, large = rec.calls[0], rec.calls[1]
    assert (native[0], large[0]) == ("capture", "blend")
    heads = patched.model.diffusion_model.output_blocks[key[1]][1].transformer_blocks[key[2]].attn1.heads
    _, nq, nk, _, _, nshape = native
    _, q, k, v, out, shape = large
    up = Resampler.make(tuple(nshape[-2:]), tuple(shape[-2:]), torch.float64).upsample_map(_maps(nq, nk, heads))
    assert tuple(nshape[-2:]) != tuple(shape[-2:])  # a real up-sampling (2x3 -> 4x6 or 4x6 -> 7x11 cells)
    blended = weight * up + (1 - weight) * _maps(q, k, heads)
    vs = v.reshape(*v.shape[:2], heads, -1).transpose(1, 2).double()
    want = (blended @ vs).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_default_layers_are_the_lowest_resolution_up_level_with_attention(sd15, sdxl):
    def keys(m):
        return set(m.model_options["transformer_options"]["patches_replace"]["attn1"])
    assert keys(am(sd15, latent(5, NH, NW))) == {("output", i, 0) for i in (3, 4, 5)}
    assert keys(am(sdxl, latent(5, NH, NW))) == {("output", i, j) for i in (0, 1, 2) for j in range(10)}
    assert keys(am(sd15, latent(5, NH, NW), layers="output:6-7, input:1")) == {("output", 6, 0), ("output", 7, 0),
                                                                              ("input", 1, 0)}


def test_batch_of_images_each_with_its_own_native_latent_and_determinism(sd15):
    native = latent(5, NH, NW, batch=2)
    lat = latent(1, batch=2)
    r, seen = model_calls(am(sd15, native))
    first = sample(r, "sd15", start=2, steps=4, lat=lat, seed=3)
    assert tuple(seen[0][0].shape) == (4, 4, NH, NW)  # cond and uncond chunks of both images in the native call
    torch.manual_seed(1234)  # the global RNG plays no part
    m = am(sd15, native)
    assert torch.equal(sample(m, "sd15", start=2, steps=4, lat=lat, seed=3), first)
    assert not torch.equal(sample(m, "sd15", start=2, steps=4, lat=lat, seed=4), first)
    # image by image: giving image 1 image 0's native latent changes image 1 only
    same = sample(am(sd15, native[:1].expand(2, -1, -1, -1)), "sd15", start=2, steps=4, lat=lat, seed=3)
    torch.testing.assert_close(same[0], first[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(same[1], first[1], atol=1e-3)


def test_stacks_with_frequency_modulation_without_touching_the_native_pass(sd15, caplog):
    native = latent(5, NH, NW)
    up = torch.nn.functional.interpolate(native, size=(H, W), mode="bicubic")
    def fm(m):
        return run_node("PreprintFAMFrequency", model=m, native_latent={"samples": up}, c=0.5)[0]
    with caplog.at_level(logging.WARNING):
        both = sample(am(fm(sd15), native), "sd15", start=2, steps=4)
        # either order: frequency modulation outside leaves the native pass alone, inside it is told to
        assert torch.equal(sample(fm(am(sd15, native)), "sd15", start=2, steps=4), both)
    assert not [r for r in caplog.records if "unmodulated" in r.getMessage()]
    alone = sample(am(sd15, native), "sd15", start=2, steps=4)
    assert not torch.equal(both, sample(fm(sd15), "sd15", start=2, steps=4)) and not torch.equal(both, alone)
    # a second attention-modulation node replaces the first rather than modulating twice
    twice = am(am(sd15, latent(9, NH, NW), weight=0.3), native)
    assert torch.equal(sample(twice, "sd15", start=2, steps=4), alone)


def test_bad_input_is_refused_with_the_node_name(sd15):
    name = "FAM Attention Modulation \\(Preprint\\)"
    with pytest.raises(ValueError, match=f"{name}.*smaller than the image"):
        sample(am(sd15, latent(5)), "sd15", start=3)  # the upscaled latent, not the native one
    with pytest.raises(ValueError, match=f"{name}.*channels"):
        sample(am(sd15, latent(5, NH, NW, channels=16)), "sd15", start=3)
    with pytest.raises(ValueError, match=f"{name}.*3 images"):
        sample(am(sd15, latent(5, NH, NW, batch=3)), "sd15", start=3, lat=latent(1, batch=2))
    with pytest.raises(ValueError, match=f"{name}.*LATENT"):
        run_node("PreprintFAMAttention", model=sd15, native_latent=None, weight=0.7, layers="", start_percent=0.0,
                 end_percent=1.0)
    with pytest.raises(ValueError, match=f"{name}.*output block 40 has no self-attention"):
        am(sd15, latent(5, NH, NW), layers="output:40")
    cls = node_class("PreprintFAMAttention")
    assert "weight" in cls.validate_inputs(weight=1.5)
    assert "heads" in cls.validate_inputs(layers="output:3[0]")
    assert "cannot read" in cls.validate_inputs(layers="up block 0")
    assert "start_percent" in cls.validate_inputs(start_percent=0.8, end_percent=0.2)
    assert cls.validate_inputs(weight=0.7, layers="output:3-5", start_percent=0.0, end_percent=1.0) is True


def test_a_dit_is_refused_at_the_node():
    with pytest.raises(ValueError, match="FAM Attention Modulation \\(Preprint\\): .*Flux.*not a UNet"):
        am(tiny_model("flux"), latent(5, NH, NW, channels=16))


def test_area_conditioning_crops_are_left_alone_with_a_warning(sd15, caplog):
    pos, neg = make_conds("sd15")
    area = [[pos[0][0], {**pos[0][1], "area": (6, 10, 4, 9), "strength": 1.0, "set_area_to_bounds": False}]]
    lat = latent(1)
    with caplog.at_level(logging.WARNING):
        out = comfy.sample.sample(am(sd15, latent(5, NH, NW)), make_noise(lat, 0), 4, 5.0, "euler", "karras",
                                  pos + area, neg, lat, start_step=1, seed=0, disable_pbar=True)
    assert torch.isfinite(out).all()
    assert [r for r in caplog.records if "left unmodulated" in r.getMessage()]
