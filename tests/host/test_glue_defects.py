"""Host tier: the documented numbers of the glue, checked where a one-place slip in the wiring would still give a
plausible picture (the named defects of ``benchmarks/mutation_defects.toml`` that the behaviour tests of each
family did not see): PAG's term and its sign, Scheduled CFG keeping an unconditional pass another node asked for,
Flux regional prompting's base_ratio bias, SAG's blur sigma, and RoPE scaling's row / column axes."""

from __future__ import annotations

import math

import comfy.patcher_extension as pe
import pytest
import torch

from preprint.guidance.sag import degrade
from preprint.highres.rope import scaled_rope

from .harness import make_conds, run_node, run_sampling, tiny_model

STEPS = 2


class Capture:
    """APPLY_MODEL wrapper: every model call's input x, chunk labels and output (the denoised prediction)."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, list[int], torch.Tensor]] = []

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kw):
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
        cou = list((transformer_options or {}).get("cond_or_uncond") or [])
        self.calls.append((x.detach().clone(), cou, out.detach().clone()))
        return out

    @staticmethod
    def chunk(tensor: torch.Tensor, cou: list[int], label: int) -> torch.Tensor:
        per = tensor.shape[0] // len(cou)
        j = cou.index(label)
        return tensor[j * per:(j + 1) * per]


def post_cfg_recorder() -> tuple[object, list[dict[str, torch.Tensor]]]:
    """A post-CFG function that records what it is handed and changes nothing. A plain function: ComfyUI deep-copies
    the model options of a clone, and with them any callable object (and its record) but not a function."""
    seen: list[dict[str, torch.Tensor]] = []

    def record(args):
        seen.append({k: args[k].detach().clone() for k in ("denoised", "cond_denoised", "uncond_denoised")})
        return args["denoised"]
    return record, seen


def capturing(model) -> tuple[object, Capture]:
    cap = Capture()
    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "zz_preprint_test_capture", cap)
    return m, cap


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f, seed=0) for f in ("sd15", "flux")}


# ---------------------------------------------------------------------------------------------- PAG

def pag(model, scale):
    return run_node("PreprintPerturbedAttentionGuidance", model=model, scale=scale, layers="", adaptive_scale=0.0,
                    sigma_start=-1.0, sigma_end=-1.0, rescale=0.0, joint_attention="image-to-image")[0]


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_pag_adds_scale_times_cond_minus_perturbed(models, family, cfg):
    """PAG's output is D_u + w (D_c - D_u) + s (D_c - D_p) (at cfg 1: D_c + s (D_c - D_p)), with D_c and D_p the
    positive and the perturbed copy's predictions of the same model call. A post-CFG function placed after PAG
    sees the guided result; the perturbed prediction is read from the call's output."""
    s = 2.5
    patched, cap = capturing(pag(models[family], s))
    after, after_seen = post_cfg_recorder()
    patched.set_model_sampler_post_cfg_function(after)
    run_sampling(patched, family, steps=STEPS, cfg=cfg, height=16, width=16)
    assert len(cap.calls) == STEPS and len(after_seen) == STEPS
    for step, ((_, cou, out), seen) in enumerate(zip(cap.calls, after_seen, strict=True)):
        perturbed_label = max(cou)  # the copy is appended after the guider's cond lists
        assert perturbed_label == 2 and sorted(cou) == ([0, 2] if cfg == 1.0 else [0, 1, 2])
        d_c, d_p = Capture.chunk(out, cou, 0), Capture.chunk(out, cou, perturbed_label)
        torch.testing.assert_close(seen["cond_denoised"], d_c, rtol=0, atol=0)
        d_u = Capture.chunk(out, cou, 1) if cfg != 1.0 else d_c
        term = s * (d_c.double() - d_p.double())
        want = d_u.double() + cfg * (d_c.double() - d_u.double()) + term
        # float32 rounding of the guided sum (its terms reach (1 + cfg) max |D|, ~60 on the tiny SD1.5 at high sigma)
        tol = 1e-6 * (1 + cfg) * float(max(d_c.abs().max(), d_u.abs().max()))
        if step == 0:  # at the highest sigma the perturbation moves the prediction far beyond that
            assert float(term.abs().max()) > 50 * tol
        torch.testing.assert_close(seen["denoised"].double(), want, rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------- Scheduled CFG

def scheduled(m, cfg_start):
    return run_node("PreprintScheduledCFG", model=m, schedule="constant", cfg_start=cfg_start, cfg_end=cfg_start,
                    exponent=2.0, custom_scales="", sigma_start=-1.0, sigma_end=-1.0)[0]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_scheduled_cfg_keeps_the_unconditional_pass_an_earlier_node_asked_for(models, family):
    """An earlier node set ``disable_cfg1_optimization`` (as core's SAG does, for the unconditional prediction it
    reads): at scale 1 Scheduled CFG must then still run the negative prompt, and the earlier node's post-CFG
    function must see the real D_u (the one a plain cfg-1 run computes), not a copy of D_c."""
    m = models[family]
    steps = 4
    # without such a node, scale 1 means no negative pass at all
    plain_patched, plain_cap = capturing(scheduled(m, 1.0))
    run_sampling(plain_patched, family, steps=steps, cfg=4.0)
    assert [int(x.shape[0]) for x, _, _ in plain_cap.calls] == [1] * steps

    earlier = m.clone()
    record, seen = post_cfg_recorder()
    earlier.set_model_sampler_post_cfg_function(record, disable_cfg1_optimization=True)
    patched, cap = capturing(scheduled(earlier, 1.0))
    run_sampling(patched, family, steps=steps, cfg=4.0)
    assert [int(x.shape[0]) for x, _, _ in cap.calls] == [2] * steps
    assert all(sorted(cou) == [0, 1] for _, cou, _ in cap.calls)

    ref_record, reference = post_cfg_recorder()
    ref_model = m.clone()
    ref_model.set_model_sampler_post_cfg_function(ref_record, disable_cfg1_optimization=True)
    run_sampling(ref_model, family, steps=steps, cfg=1.0)
    assert len(seen) == len(reference) == steps
    for step, (got, ref) in enumerate(zip(seen, reference, strict=True)):
        # a real negative prediction, not D_c handed on (the two meet as sigma falls: 0.2 then 1e-4 on SD1.5)
        gap = float((got["uncond_denoised"] - got["cond_denoised"]).abs().max())
        assert gap > (1e-2 if step == 0 else 0.0)
        # the same trajectory (scale 1 either way): D_u agrees up to float32 rounding of the guided sums (2e-6 of
        # max |D| ~ 50 seen), well below the first step's gap
        tol = 1e-6 * float(ref["uncond_denoised"].abs().max())
        torch.testing.assert_close(got["uncond_denoised"], ref["uncond_denoised"], rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------- Regional, Flux

def test_flux_base_ratio_is_the_base_text_bias_of_covered_image_tokens(models):
    """README, Regional Prompting on Flux: ``base_ratio`` is a logit bias ln(base_ratio) on the base text for image
    tokens a region covers (0: they do not see the base text; 1: no bias), none for uncovered tokens; so the three
    settings give three different results."""
    m = models["flux"]
    h, w = 6, 10  # token grid 3 x 5
    pos, neg = make_conds("flux")
    other, _ = make_conds("flux", seed=9)
    mask = torch.zeros(1, 48, 80)
    mask[:, :, 48:] = 1.0  # the last two token columns
    covered = torch.zeros(3, 5, dtype=torch.bool)
    covered[:, 3:] = True
    covered = covered.flatten()
    n0, n1 = pos[0][0].shape[1], other[0][0].shape[1]
    results = {}
    for ratio in (0.0, 0.5, 1.0):
        seen = []

        def spy(executor, x, timestep, context, y, guidance, ref_latents, control, to, _seen=seen, **kw):
            _seen.append((list(to.get("cond_or_uncond") or []), x.shape[0], kw.get("attention_mask")))
            return executor(x, timestep, context, y, guidance, ref_latents, control, to, **kw)

        r = run_node("PreprintRegion", conditioning=other, mask=mask, strength=1.0, regions=None)[0]
        patched = run_node("PreprintRegionalPrompting", model=m, regions=r, base_ratio=ratio, start_percent=0.0,
                           end_percent=1.0)[0]
        patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "zz_spy", spy)
        results[ratio] = run_sampling(patched, "flux", steps=STEPS, height=h, width=w, positive=pos, negative=neg)
        cou, batch, att = seen[0]
        row = cou.index(0) * (batch // len(cou))
        img_to_base = att[row, n0 + n1:, :n0].float()  # [image tokens, base text tokens]
        assert torch.equal(img_to_base[~covered], torch.zeros_like(img_to_base[~covered]))
        want = torch.full_like(img_to_base[covered], math.log(ratio) if ratio > 0 else float("-inf"))
        assert torch.equal(img_to_base[covered], want)
    for a, b in ((0.0, 0.5), (0.5, 1.0), (0.0, 1.0)):
        assert float((results[a] - results[b]).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------- SAG

@pytest.mark.parametrize("blur_sigma", [0.5, 3.0])
def test_sag_degrades_the_negative_prediction_with_the_nodes_blur_sigma(models, sag_masks, blur_sigma):
    """SAG's extra pass sees x + (blur(D_u) - D_u) inside the mask (EPS model: alpha 1), blurred with the node's
    blur_sigma: compared with guidance/sag.py's degrade of the D_u the CFG call returned, at that sigma."""
    sag = run_node("PreprintSelfAttentionGuidance", model=models["sd15"], scale=0.8, blur_sigma=blur_sigma,
                   threshold=0.5, layer="", sigma_start=-1.0, sigma_end=-1.0)[0]
    patched, cap = capturing(sag)
    run_sampling(patched, "sd15", steps=STEPS, cfg=5.0, height=16, width=16)
    assert [int(x.shape[0]) for x, _, _ in cap.calls] == [2, 1] * STEPS and len(sag_masks) == STEPS
    for step in range(STEPS):
        (x, cou, out), (x_deg, _, _) = cap.calls[2 * step], cap.calls[2 * step + 1]
        x_u, d_u = Capture.chunk(x, cou, 1), Capture.chunk(out, cou, 1)
        mask = sag_masks[step]
        assert float(mask.mean()) > 0.25  # a good share of the latent is blurred
        want = x_u + (degrade(d_u, mask, blur_sigma) - d_u)
        other = x_u + (degrade(d_u, mask, 1.0) - d_u)
        assert float((want - other).abs().max()) > 1e-2  # the sigma matters far beyond the tolerance below
        torch.testing.assert_close(x_deg, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- RoPE scaling

def rope(m, width, height, mode="NTK-aware"):
    return run_node("PreprintRoPEScaling", model=m, mode=mode, training_width=width, training_height=height)[0]


def test_rope_non_square_training_size_is_bitwise_the_unpatched_model(models):
    """Trained at 64 px wide and 128 px tall: a 128 x 64 (h x w) image is the training size on both axes."""
    m = models["flux"]
    base = run_sampling(m, "flux", steps=STEPS, height=16, width=8)
    assert torch.equal(run_sampling(rope(m, width=64, height=128), "flux", steps=STEPS, height=16, width=8), base)
    # the transposed image is past the training extent along its rows: there the embedding does change
    wide = run_sampling(m, "flux", steps=STEPS, height=8, width=16)
    assert not torch.allclose(run_sampling(rope(m, width=64, height=128), "flux", steps=STEPS, height=8, width=16),
                              wide)


@pytest.mark.parametrize("mode", ["NTK-aware", "position interpolation"])
def test_rope_scales_rows_by_height_and_columns_by_width(models, mode):
    """The node's embedder: rows scaled to training_height / 16 (8 px latents, 2 x 2 patches), columns to
    training_width / 16. On an 8 x 8 token grid with a training size of 64 wide x 128 tall, the rows are at their
    training extent (untouched) and the columns twice theirs."""
    m = models["flux"]
    patched = rope(m, width=64, height=128, mode=mode)
    embedder = patched.object_patches["diffusion_model.pe_embedder"]
    axes, theta = list(embedder.axes_dim), float(embedder.theta)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"),
                      dim=-1).reshape(1, -1, 3)
    got = embedder(ids)
    assert torch.equal(got, scaled_rope(ids, axes, theta, [None, 8.0, 4.0], mode))
    plain = scaled_rope(ids, axes, theta, [None, None, None], mode)  # Flux's own embedding (the node checks that)
    row_pairs = slice(axes[0] // 2, (axes[0] + axes[1]) // 2)
    col_pairs = slice((axes[0] + axes[1]) // 2, sum(axes) // 2)
    assert torch.equal(got[:, :, :, row_pairs], plain[:, :, :, row_pairs])
    assert float((got[:, :, :, col_pairs] - plain[:, :, :, col_pairs]).abs().max()) > 1e-2
