"""Host tier: the perturbed-attention family on tiny SD1.5, SDXL, Flux (and SD3) models in real ComfyUI."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from dataclasses import dataclass, field

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.supported_models
import pytest
import torch

from preprint.runner.tiny_models import randomise_

from .harness import make_conds, run_custom_sampling, run_node, run_sampling, tiny_model

FAMILIES = ["sd15", "sdxl", "flux"]
STEPS = 2
PAG = "PreprintPerturbedAttentionGuidance"


@dataclass
class Calls:
    """Model forward calls, their batch rows and chunk labels, counted at APPLY_MODEL (one per model call)."""

    rows: list[int] = field(default_factory=list)
    chunks: list[list[int]] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.rows)

    def wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        self.rows.append(int(x.shape[0]))
        self.chunks.append(list((transformer_options or {}).get("cond_or_uncond", [])))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)


@contextlib.contextmanager
def count_calls(model):
    counter = Calls()
    counter.model = model.clone()
    counter.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "preprint_test_calls",
                                       counter.wrapper)
    yield counter


def pag(model, scale=3.0, layers="", adaptive_scale=0.0, sigma_start=-1.0, sigma_end=-1.0, rescale=0.0,
        joint_attention="image-to-image"):
    return run_node(PAG, model=model, scale=scale, layers=layers, adaptive_scale=adaptive_scale,
                    sigma_start=sigma_start, sigma_end=sigma_end, rescale=rescale,
                    joint_attention=joint_attention)[0]


def core_pag(model, scale=3.0):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    out = PerturbedAttentionGuidance.execute(model, scale)
    return out.result[0] if hasattr(out, "result") else out[0]


def sample(model, family, cfg=5.0, **kw):
    # 16x16 latents: the SD1.5 middle block then sees a 2x2 grid (at 8x8 it is a single token, where identity
    # attention and attention coincide)
    kw.setdefault("height", 16)
    kw.setdefault("width", 16)
    return run_sampling(model, family, steps=STEPS, cfg=cfg, **kw)


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f, seed=0) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_zero_is_the_unpatched_model(models, family):
    base = sample(models[family], family)
    with count_calls(pag(models[family], scale=0.0)) as c:
        out = sample(c.model, family)
    assert torch.equal(out, base)
    assert c.rows == [2] * STEPS  # no perturbed rows are run at scale 0


@pytest.mark.parametrize("family", FAMILIES)
def test_one_forward_per_step_with_cfg_and_pag(models, family):
    base = sample(models[family], family)
    with count_calls(pag(models[family])) as c:
        out = sample(c.model, family)
    assert c.calls == STEPS
    assert c.rows == [3] * STEPS
    assert all(sorted(ch) == [0, 1, 2] for ch in c.chunks)
    assert (out - base).abs().max() > 1e-3
    with count_calls(core_pag(models[family])) as core:
        sample(core.model, family)
    assert core.calls == 2 * STEPS


def test_flux_pag_changes_output_where_core_does_not(models):
    base = sample(models["flux"], "flux")
    core = sample(core_pag(models["flux"]), "flux")
    ours = sample(pag(models["flux"]), "flux")
    # core's PAG patches the UNet middle block, which Flux lacks: its pass is a full copy of the positive one
    torch.testing.assert_close(core, base, rtol=1e-4, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3


def test_flux_joint_modes_differ(models):
    a = sample(pag(models["flux"], layers="double:0"), "flux")
    b = sample(pag(models["flux"], layers="double:0", joint_attention="all tokens"), "flux")
    assert (a - b).abs().max() > 1e-5


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_cfg_one_pag_alone(models, family):
    base = sample(models[family], family, cfg=1.0)
    with count_calls(pag(models[family])) as c:
        out = sample(c.model, family, cfg=1.0)
    assert c.rows == [2] * STEPS  # positive + perturbed, no uncond
    assert (out - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_split_batches_give_the_same_result(models, family, monkeypatch):
    patched = pag(models[family])
    together = sample(patched, family)
    # as if memory were short when calc_cond_batch sizes its batches: it then runs every chunk as its own call
    real = patched.model.memory_required

    def memory_required(*a, **k):
        return float("inf") if sys._getframe(1).f_code.co_name == "_calc_cond_batch" else real(*a, **k)
    monkeypatch.setattr(patched.model, "memory_required", memory_required)
    with count_calls(patched) as c:
        split = sample(c.model, family)
    assert c.rows == [1] * (3 * STEPS)  # ComfyUI ran cond, uncond and the perturbed copy separately
    torch.testing.assert_close(split, together, rtol=1e-4, atol=1e-5)


def test_batch_two(models):
    base = sample(models["sd15"], "sd15", batch=2)
    with count_calls(pag(models["sd15"])) as c:
        out = sample(c.model, "sd15", batch=2)
    assert c.rows == [6] * STEPS
    assert (out - base).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_interval_and_adaptive_scale_skip_perturbed_rows(models):
    sigmas = comfy.samplers.calculate_sigmas(models["sd15"].get_model_object("model_sampling"), "karras", STEPS)
    start = float(sigmas[1]) + 1e-3  # skip the first step only
    with count_calls(pag(models["sd15"], sigma_start=start)) as c:
        sample(c.model, "sd15")
    assert c.rows == [2] + [3] * (STEPS - 1)
    with count_calls(pag(models["sd15"], adaptive_scale=0.01)) as c:  # 3 - 0.01 (1000 - t) > 0 only at t = 999
        sample(c.model, "sd15")
    assert c.rows == [3] + [2] * (STEPS - 1)


def test_rescale_changes_result(models):
    a = sample(pag(models["sd15"], scale=5.0), "sd15")
    b = sample(pag(models["sd15"], scale=5.0, rescale=0.7), "sd15")
    assert (a - b).abs().max() > 1e-4


def test_second_pag_node_replaces_the_first(models):
    twice = pag(pag(models["sd15"], scale=2.0), scale=3.0)
    with count_calls(twice) as c:
        out = sample(c.model, "sd15")
    assert c.rows == [3] * STEPS
    torch.testing.assert_close(out, sample(pag(models["sd15"], scale=3.0), "sd15"))


def seg(model, scale=3.0, layers="", blur_sigma=1.5):
    return run_node("PreprintSmoothedEnergyGuidance", model=model, scale=scale, layers=layers, adaptive_scale=0.0,
                    sigma_start=-1.0, sigma_end=-1.0, rescale=0.0, blur_sigma=blur_sigma)[0]


def softpag(model, scale=3.0, layers="", softness=0.5):
    return run_node("PreprintSoftPAG", model=model, scale=scale, layers=layers, adaptive_scale=0.0, sigma_start=-1.0,
                    sigma_end=-1.0, rescale=0.0, softness=softness, joint_attention="image-to-image")[0]


@pytest.mark.parametrize("other", ["seg", "softpag"])
def test_pag_and_another_family_node_stack(models, other):
    """PAG with SEG or SoftPAG on one model: both perturbed copies ride in the one CFG call, and with a single
    Euler step to sigma 0 (the output is then the guided prediction itself) the two guidance terms add."""
    m = models["sd15"]
    second = seg if other == "seg" else softpag
    both = second(pag(m, scale=2.0), scale=1.5)
    with count_calls(both) as c:
        out = sample(c.model, "sd15")
    assert c.rows == [4] * STEPS and all(sorted(ch) == [0, 1, 2, 3] for ch in c.chunks)
    for single in (pag(m, scale=2.0), second(m, scale=1.5)):
        assert (out - sample(single, "sd15")).abs().max() > 1e-3

    def one_step(model):
        return run_sampling(model, "sd15", steps=1, cfg=5.0, height=16, width=16)
    base = one_step(m)
    term_pag, term_other = one_step(pag(m, scale=2.0)) - base, one_step(second(m, scale=1.5)) - base
    assert min(term_pag.abs().max(), term_other.abs().max()) > 1e-2
    # 1e-5 of the latent's scale: float rounding of the batched call, far below either term
    tol = 1e-5 * base.abs().max().item()
    torch.testing.assert_close(one_step(both) - base, term_pag + term_other, rtol=0, atol=tol)


def test_stacked_family_nodes_mark_their_own_streams(models):
    """Inside the stacked call every perturbed copy is listed in preprint_perturbed under a uuid of its own."""
    from preprint.guidance.pag_runtime import perturbed_uuid

    seen = []

    def spy(executor, *args, **kwargs):
        topts = args[-1] if isinstance(args[-1], dict) else kwargs["transformer_options"]
        seen.append((list(topts["cond_or_uncond"]), list(topts["uuids"]), set(topts.get("preprint_perturbed", ()))))
        return executor(*args, **kwargs)

    m = seg(pag(models["sd15"]))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "preprint_test_spy", spy)
    sample(m, "sd15")
    assert len(seen) == STEPS
    for cou, uuids, perturbed in seen:
        assert perturbed == {cou.index(2), cou.index(3)}
        pos = uuids[cou.index(0)]
        assert {uuids[cou.index(2)], uuids[cou.index(3)]} == {perturbed_uuid(pos), perturbed_uuid(pos, "seg")}


@pytest.mark.parametrize(("family", "a", "b"), [
    ("sd15", "input:4", "output:5"),
    ("sdxl", "input:4-8, output:0-2.1", "middle:0"),
    ("flux", "double:0-1", "single:0-2"),
    ("flux", "double:1, single:1", "double:0-1"),
])
def test_different_layer_lists_give_different_results(models, family, a, b):
    """Both runs carry the same three chunks, so only the layer choice separates them: sampling is bitwise
    deterministic (noise floor 0); the measured differences are 1.3-5.0 (latents of magnitude 12-460), each list
    also 0.56-5.2 away from the unpatched result. Which layers really ran is checked below
    (test_exactly_the_listed_layers_perturb_exactly_the_copy_rows); this is what a user sees of it."""
    base = sample(models[family], family)
    out_a, out_b = sample(pag(models[family], layers=a), family), sample(pag(models[family], layers=b), family)
    assert torch.equal(out_a, sample(pag(models[family], layers=a), family))
    assert (out_a - out_b).abs().max() > 0.1
    assert min((out_a - base).abs().max(), (out_b - base).abs().max()) > 0.1


@pytest.mark.parametrize(("family", "layers", "valid"), [
    ("sd15", "input:3", "middle:0"),
    ("sd15", "double:0", "input, middle, output"),
    ("sdxl", "middle:0.12", "transformer indices 0-9"),
    ("flux", "double:25", "double:0-18"),
    ("flux", "middle:0", "double, single"),
])
def test_bad_layer_list_lists_valid_layers(models, family, layers, valid):
    with pytest.raises(ValueError) as e:
        pag(models[family], layers=layers)
    assert valid in str(e.value)
    assert "Perturbed-Attention Guidance" in str(e.value)


def test_model_without_self_attention_is_rejected():
    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "in_channels": 4, "use_temporal_attention": False, "use_temporal_resblock": False,
           "adm_in_channels": None, "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 0],
           "channel_mult": [1, 2], "transformer_depth_middle": -1, "use_linear_in_transformer": False,
           "context_dim": 64, "transformer_depth_output": [0, 0, 0, 0], "num_head_channels": 16}
    mc = comfy.supported_models.SD15(cfg)
    model = mc.get_model({}, device=torch.device("cpu"))
    randomise_(model.diffusion_model, 0)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    with pytest.raises(TypeError, match="no self-attention"):
        pag(patcher)


def test_softpag_head_selection_on_flux(models):
    def soft(layers, u):
        return run_node("PreprintSoftPAG", model=models["flux"], scale=3.0, layers=layers, adaptive_scale=0.0,
                        sigma_start=-1.0, sigma_end=-1.0, rescale=0.0, softness=u,
                        joint_attention="image-to-image")[0]
    base = sample(models["flux"], "flux")
    full = sample(pag(models["flux"], layers="double:1"), "flux")
    assert torch.allclose(sample(soft("double:1", 1.0), "flux"), full, rtol=1e-5, atol=1e-6)
    head = sample(soft("double:1[2]", 1.0), "flux")
    half = sample(soft("double:1", 0.5), "flux")
    for out in (head, half):
        assert (out - base).abs().max() > 1e-5
        assert (out - full).abs().max() > 1e-5
    with pytest.raises(ValueError, match="heads 0-3"):
        soft("double:1[4]", 1.0)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_smoothed_energy_guidance(models, family):
    seg = run_node("PreprintSmoothedEnergyGuidance", model=models[family], scale=3.0, layers="", adaptive_scale=0.0,
                   sigma_start=-1.0, sigma_end=-1.0, rescale=0.0, blur_sigma=1.5)[0]
    base = sample(models[family], family, height=10, width=6)
    with count_calls(seg) as c:
        out = sample(c.model, family, height=10, width=6)
    assert c.rows == [3] * STEPS
    assert (out - base).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_seg_blur_sigma_zero_is_the_unguided_result(models, family):
    """Blur sigma 0 leaves the queries as they are: the perturbed copy is the positive prediction and the SEG term
    vanishes. Not bitwise: the copy still rides in the call, so cond and uncond are computed in a batch of 3
    instead of 2 and the copy's attention by another kernel. Measured at the default layer, 16x16 latents: that
    noise floor is 1e-7 of the latent's magnitude (3e-5 of 329 on SD1.5, 3e-6 of 12 on Flux); the faintest blur
    that acts on these grids, sigma 0.3 (neighbour weight 4e-3), moves the result by 3e-6 (SD1.5) and 9e-5 (Flux)
    of it, sigma 1 by 2e-4 and 4e-3. The tolerance, 1e-6 of the magnitude, sits between floor and faint blur."""
    m = models[family]
    base = sample(m, family)
    tol = 1e-6 * float(base.abs().max())
    with count_calls(seg(m, blur_sigma=0.0)) as c:
        zero = sample(c.model, family)
    assert c.rows == [3] * STEPS  # the copy did run: its prediction is what must equal the positive's
    torch.testing.assert_close(zero, base, rtol=0, atol=tol)
    faint = sample(seg(m, blur_sigma=0.3), family)
    assert (faint - base).abs().max() > tol  # the tolerance would see the smallest real blur


@pytest.mark.parametrize(("family", "layers"), [("sd15", "middle:0"), ("sd15", "input:4-8, output:3-5"),
                                                 ("flux", "single:9"), ("flux", "double:0-1, single:0-2")])
def test_seg_is_not_pag_on_the_same_layers(models, family, layers):
    """Blurred queries (SEG) are another perturbation than identity attention (PAG): on the same layers, at the
    same scale and in the same three-chunk call (so the noise floor is 0, both runs being bitwise deterministic)
    the results differ by 0.17-1.9 (measured; latents of magnitude 12-329). Each also differs from no guidance."""
    m = models[family]
    base = sample(m, family)
    out_seg, out_pag = sample(seg(m, layers=layers), family), sample(pag(m, layers=layers), family)
    assert (out_seg - out_pag).abs().max() > 1e-2
    assert min((out_seg - base).abs().max(), (out_pag - base).abs().max()) > 1e-2


def test_stacks_with_post_cfg_patch_and_cfg_guider(models):
    """PAG after a core post-CFG patch (CFGZero*, list hook) on top of a core cfg-function patch (RescaleCFG,
    single slot), sampled through CFGGuider: one call per step with the copy, and the PAG term arrives whole.
    With one Euler step to sigma 0 the output is the guided prediction itself; D_c and D_p are raw model outputs
    the core patches do not touch, so PAG-after-core minus core equals PAG minus nothing. Measured: that identity
    holds to 6e-5 (2e-7 of the latent's magnitude 329: the batch of 3 against 2), the PAG term is 0.22; the
    tolerance is 2e-6 of the magnitude (6.6e-4)."""
    def post(m):
        return cfg_zero_star(rescale_cfg(m))

    m = models["sd15"]
    both = pag(post(m))
    assert len(both.model_options["sampler_post_cfg_function"]) == 2
    sampler = comfy.samplers.sampler_object("euler")
    ms = m.get_model_object("model_sampling")

    def run(model, steps=STEPS):
        sigmas = comfy.samplers.calculate_sigmas(ms, "karras", steps)
        return run_custom_sampling(model, "sd15", sampler, sigmas, height=16, width=16)

    with count_calls(both) as c:
        out = run(c.model)
    assert c.rows == [3] * STEPS
    assert (out - run(post(m))).abs().max() > 1e-3
    ref, base = run(post(m), 1), run(m, 1)
    term = run(pag(m), 1) - base
    assert term.abs().max() > 1e-1
    torch.testing.assert_close(run(both, 1) - ref, term, rtol=0, atol=2e-6 * float(base.abs().max()))


def rescale_cfg(m, multiplier=0.7):
    from comfy_extras.nodes_model_advanced import RescaleCFG

    return RescaleCFG().patch(m, multiplier)[0]


def cfg_zero_star(m):
    from comfy_extras.nodes_cfg import CFGZeroStar

    out = CFGZeroStar.execute(m)
    return out.result[0] if hasattr(out, "result") else out[0]


@pytest.mark.parametrize("core", ["rescale_cfg", "cfg_zero_star", "both"])
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_scale_zero_after_core_cfg_patches_is_bitwise_those_patches_alone(models, family, core):
    """PAG at scale 0 stacked after core RescaleCFG (single-slot cfg function) and / or CFGZero* (post-CFG list):
    the very numbers of the core patches alone, with no extra rows run. The core patches are not no-ops here:
    each moves the result by more than 1e-2 (checked), so a PAG node that dropped one would be caught even
    if the comparison were not bitwise."""
    m = models[family]
    patch = {"rescale_cfg": rescale_cfg, "cfg_zero_star": cfg_zero_star,
             "both": lambda x: cfg_zero_star(rescale_cfg(x))}[core]
    ref = sample(patch(m), family)
    assert (ref - sample(m, family)).abs().max() > 1e-2
    if core == "both":
        for one in (rescale_cfg, cfg_zero_star):
            assert (ref - sample(one(m), family)).abs().max() > 1e-2
    with count_calls(pag(patch(m), scale=0.0)) as c:
        out = sample(c.model, family)
    assert c.rows == [2] * STEPS
    assert torch.equal(out, ref)


def test_dual_cfg_guider(models):
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    pos, neg = make_conds("sd15")
    mid, _ = make_conds("sd15", seed=5)
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(models["sd15"].get_model_object("model_sampling"), "karras", STEPS)

    def run(m):
        g = Guider_DualCFG(m)
        g.set_conds(pos, mid, neg)
        g.set_cfg(4.0, 2.0)
        return run_custom_sampling(m, "sd15", sampler, sigmas, guider=g, height=16, width=16)
    with count_calls(pag(models["sd15"])) as c:
        out = run(c.model)
    assert c.rows == [4] * STEPS
    assert (out - run(models["sd15"])).abs().max() > 1e-3


def _tiny_sd3():
    return tiny_model("sd3")


def test_sd3_joint_blocks():
    model = _tiny_sd3()
    pos, neg = make_conds("sd3")
    kw = dict(positive=pos, negative=neg, height=8, width=8)
    latent_family = "flux"  # 16 latent channels, like SD3
    base = run_sampling(model, latent_family, steps=STEPS, cfg=4.0, **kw)
    for layers in ("joint:0", "joint:1"):  # block 1 also has SD3.5's image-only self-attention
        with count_calls(pag(model, layers=layers)) as c:
            out = run_sampling(c.model, latent_family, steps=STEPS, cfg=4.0, **kw)
        assert c.rows == [3] * STEPS
        assert (out - base).abs().max() > 1e-4
    assert torch.equal(run_sampling(pag(model, scale=0.0), latent_family, steps=STEPS, cfg=4.0, **kw), base)
    with pytest.raises(ValueError, match="joint:0-1"):
        pag(model, layers="joint:2")


def test_sd3_scale_hint(caplog):
    """The scale widget's default is about four times the only published SD3 value: the node says so."""
    model = _tiny_sd3()
    with caplog.at_level(logging.INFO, logger="preprint"):
        pag(model, scale=0.7)
        assert "0.7" not in caplog.text
        pag(model, scale=3.0)
    assert "diffusers' SD3 PAG uses 0.7" in caplog.text


def test_perturbed_chunk_is_labelled_for_other_patches(models):
    """The convention other families rely on: inside the model call, preprint_perturbed lists the chunk
    positions of the perturbed copy, whose uuid is uuid5 of the positive's and never the positive's own."""
    from preprint.guidance.pag_runtime import perturbed_uuid

    seen = []

    def spy(executor, *args, **kwargs):
        topts = args[-1] if isinstance(args[-1], dict) else kwargs["transformer_options"]
        seen.append((list(topts["cond_or_uncond"]), list(topts["uuids"]), set(topts.get("preprint_perturbed", ()))))
        return executor(*args, **kwargs)

    m = pag(models["sd15"])
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "preprint_test_spy", spy)
    sample(m, "sd15")
    assert len(seen) == STEPS
    for cou, uuids, perturbed in seen:
        assert perturbed == {cou.index(2)}
        pos = uuids[cou.index(0)]
        assert uuids[cou.index(2)] == perturbed_uuid(pos) != pos


# ---------------------------------------------------------------------------------------------- which layers

class IdentityRows:
    """Forward hooks on every self-attention layer of the (shared) diffusion model that record, per model call
    and layer, the batch rows whose attention output is bit for bit the layer's values ``v``: the identity
    attention map, PAG's perturbation. No other row of a random-weight model outputs exactly its values.

    UNet: ``attn1.to_v``'s output against ``attn1.to_out``'s input (both run with and without a replace patch).
    Flux double blocks: the image part of ``img_attn.qkv``'s output against ``img_attn.proj``'s input; single
    blocks: ``linear1``'s v part against the attention part of ``linear2``'s input. With joint_attention "all
    tokens" the whole joint sequence outputs v, so the image rows are compared.
    """

    def __init__(self, model):
        self.dm = model.get_model_object("diffusion_model")
        self.calls: list[dict] = []  # per model call: cond_or_uncond and {layer: identity rows}
        self.handles = []
        self.model = model.clone()
        self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "preprint_test_rows",
                                        self.wrapper)
        for name, mod in self.dm.named_modules():
            layer = self.layer_of(name)
            if layer is None:
                continue
            values: dict = {}
            if layer[0] in ("input", "middle", "output"):
                self.hook(mod.to_v, mod.to_out, layer, values, lambda out: out, lambda a: a)
            elif layer[0] == "double":
                heads = mod.num_heads
                self.hook(mod.qkv, mod.proj, layer, values,
                          lambda out, h=heads: out.view(*out.shape[:2], 3, h, -1)[:, :, 2].flatten(2), lambda a: a)
            else:
                hidden, heads = mod.hidden_size, mod.num_heads
                self.hook(mod.linear1, mod.linear2, layer, values,
                          lambda out, hd=hidden, h=heads: out[..., :3 * hd].reshape(*out.shape[:2], 3, h, -1)[:, :, 2]
                          .flatten(2), lambda a, hd=hidden: a[..., :hd])

    @staticmethod
    def layer_of(name: str):
        m = re.fullmatch(r"(input|output)_blocks\.(\d+)\.\d+\.transformer_blocks\.(\d+)\.attn1", name)
        if m:
            return m.group(1), int(m.group(2)), int(m.group(3))
        m = re.fullmatch(r"middle_block\.\d+\.transformer_blocks\.(\d+)\.attn1", name)
        if m:
            return "middle", 0, int(m.group(1))
        m = re.fullmatch(r"double_blocks\.(\d+)\.img_attn", name)
        if m:
            return "double", int(m.group(1)), None
        m = re.fullmatch(r"single_blocks\.(\d+)", name)
        if m:
            return "single", int(m.group(1)), None
        return None

    def hook(self, v_mod, out_mod, layer, values, v_of, attn_of):
        def record_v(_mod, _inp, out):
            values["v"] = v_of(out)

        def compare(_mod, inp):
            v, a = values.pop("v"), attn_of(inp[0])
            if layer[0] == "single":  # the joint sequence [text | image]: compare the image tokens
                v, a = v[:, -self.image_tokens:], a[:, -self.image_tokens:]
            rows = {r for r in range(a.shape[0]) if torch.equal(a[r], v[r])}
            self.calls[-1]["layers"][layer] = rows
        self.handles.append(v_mod.register_forward_hook(record_v))
        self.handles.append(out_mod.register_forward_pre_hook(compare))

    def wrapper(self, executor, *args, **kwargs):
        x = args[0]
        topts = args[-1] if isinstance(args[-1], dict) else kwargs["transformer_options"]
        self.image_tokens = (x.shape[-2] // 2) * (x.shape[-1] // 2)  # Flux: 2x2 patches
        self.calls.append({"cou": list(topts["cond_or_uncond"]), "layers": {}})
        return executor(*args, **kwargs)

    def perturbed(self) -> set:
        """Every layer that ran identity attention on some row, after checking that in every call those rows
        were exactly the rows of PAG's copy (cond index 2, one row per chunk at batch 1)."""
        seen = set()
        for call in self.calls:
            for layer, rows in call["layers"].items():
                if rows:
                    assert rows == {call["cou"].index(2)}, (layer, rows, call["cou"])
                    seen.add(layer)
        return seen

    def close(self):
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def identity_rows(model):
    rec = IdentityRows(model)
    try:
        yield rec
    finally:
        rec.close()


def _unet(group, blocks, transformers):
    return {(group, b, t) for b in blocks for t in transformers}


@pytest.mark.parametrize(("family", "layers", "expected"), [
    ("sd15", "", {("middle", 0, 0)}),  # the default layer
    ("sd15", "input:4-8, output:3-5", _unet("input", (4, 5, 7, 8), (0,)) | _unet("output", (3, 4, 5), (0,))),
    ("sdxl", "input:4-8, output:0-2.1",
     _unet("input", (4, 5), (0, 1)) | _unet("input", (7, 8), range(10)) | _unet("output", (0, 1, 2), (1,))),
    ("sdxl", "middle:0.3-4", _unet("middle", (0,), (3, 4))),
    ("flux", "", {("single", 9, None)}),  # the default layer
    ("flux", "double:0-1", {("double", 0, None), ("double", 1, None)}),
    ("flux", "single:0-2", {("single", i, None) for i in range(3)}),
    ("flux", "double:1, single:1", {("double", 1, None), ("single", 1, None)}),
])
def test_exactly_the_listed_layers_perturb_exactly_the_copy_rows(models, family, layers, expected):
    """Which self-attention layers really ran PAG's identity map, and on which rows: exactly the listed layers,
    on exactly the perturbed copy's rows (never the positive's or the negative's), at every step."""
    with identity_rows(pag(models[family], layers=layers, joint_attention="all tokens")) as rec:
        sample(rec.model, family)
    assert len(rec.calls) == STEPS
    n_layers = {"sd15": 16, "sdxl": 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2, "flux": 19 + 38}[family]
    assert all(len(call["layers"]) == n_layers for call in rec.calls)  # every layer was observed every call
    assert rec.perturbed() == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatched_layers_never_output_their_values(models, family):
    """The recorder's premise: without PAG no layer outputs its values on any row, so the identity rows seen
    above are PAG's doing."""
    with identity_rows(models[family]) as rec:
        sample(rec.model, family)
    assert len(rec.calls) == STEPS and all(call["layers"] for call in rec.calls)
    assert all(not rows for call in rec.calls for rows in call["layers"].values())
