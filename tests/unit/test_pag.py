"""PAG family maths: the guidance formula on the exact mixture, perturbed attention, SoftPAG, head
selection, smoothed energy, layer lists."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from preprint.guidance.attention_perturbation import (
    INFINITE_BLUR_SIGMA,
    Perturbation,
    attention,
    attention_weights,
    blur_tokens,
    identity_output,
    kernel_size_on_axis,
    merge_heads,
    perturb_rows,
    seg_kernel_size,
    smoothed_energy_output,
    split_heads,
)
from preprint.guidance.pag import (
    GuidanceSchedule,
    adaptive_pag_scale,
    guided_prediction,
    perturbation_guidance,
    rescale_to_reference,
)
from preprint.guidance.pag_layers import AttentionLayout, BlockInfo, LayerSpecError, default_spec, parse_and_resolve
from preprint.guidance.pag_runtime import chunks_of, perturbed_uuid, rows_of
from preprint.utils.gaussian_mixture import GaussianMixture
from preprint.utils.sigma_window import SigmaWindow

from .conftest import get_problem

# ------------------------------------------------------------------------------------------ guidance formula


def weak(problem) -> GaussianMixture:
    """A stand-in for the perturbed model: the conditional mixture with every component twice as wide."""
    c = problem.model._cond
    return GaussianMixture(c.means, c.stds * 2.0, c.weights)


def sample_euler(problem, pag_scale: float, steps: int = 30, rescale: float = 0.0) -> torch.Tensor:
    """Euler on the probability-flow ODE with CFG + PAG applied as the post-CFG step applies it."""
    m, kind = problem.model, problem.kind
    sig = problem.sigmas(steps)
    x = problem.x_start.clone()
    for i in range(steps):
        s = sig[i]
        dc, du = m.cond(x, s), m.uncond(x, s)
        dcfg = du + problem.cfg * (dc - du)
        d = guided_prediction(x, dcfg, dc, weak(problem).denoise(x, s, kind), pag_scale, rescale)
        if kind == "eps":
            x = x + (x - d) / s * (sig[i + 1] - s)
        else:  # flow: dx/dsigma = (x - D) / sigma as well
            x = x + (x - d) / s * (sig[i + 1] - s)
    return x


@pytest.mark.parametrize(("kind", "cfg"), [("eps", 1.0), ("eps", 5.0), ("flow", 1.0), ("flow", 3.5)])
def test_scale_zero_is_exactly_no_guidance(kind, cfg):
    p = get_problem(kind, cfg)
    plain = sample_euler(p, 0.0)
    # the same loop without any PAG call at all
    x = p.x_start.clone()
    sig = p.sigmas(30)
    for i in range(30):
        s = sig[i]
        dc, du = p.model.cond(x, s), p.model.uncond(x, s)
        d = du + p.cfg * (dc - du)
        x = x + (x - d) / s * (sig[i + 1] - s)
    assert torch.equal(plain, x)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_formula_on_mixture(kind):
    p = get_problem(kind, 5.0)
    s = torch.tensor(0.7 if kind == "flow" else 2.0, dtype=torch.float64)
    x = p.x_start * (s / p.sigma_max if kind == "eps" else 1.0)
    dc, du = p.model.cond(x, s), p.model.uncond(x, s)
    dp = weak(p).denoise(x, s, kind)
    dcfg = du + 5.0 * (dc - du)
    out = perturbation_guidance(dcfg, dc, dp, 3.0)
    torch.testing.assert_close(out, du + 5.0 * (dc - du) + 3.0 * (dc - dp))
    assert perturbation_guidance(dcfg, dc, dp, 0.0) is dcfg
    # rescale 0 is the identity; rescale 1 matches the positive prediction's noise std per sample
    assert guided_prediction(x, dcfg, dc, dp, 3.0, 0.0).equal(out)
    r = rescale_to_reference(x, out, dc, 1.0)
    torch.testing.assert_close((x - r).std(dim=(1, 2, 3)), (x - dc).std(dim=(1, 2, 3)))


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_guiding_away_from_a_blurrier_model_sharpens_samples(kind):
    """Guiding away from a model whose components are wider pulls samples toward the component means:
    the weak-model direction is exactly what PAG's structural sharpening relies on."""
    p = get_problem(kind, 1.0)
    means = p.model._cond.means.flatten(1)

    def spread(x):
        d = torch.cdist(x.flatten(1), means)
        return float(d.min(dim=1).values.mean())

    assert spread(sample_euler(p, 1.5)) < 0.9 * spread(sample_euler(p, 0.0))


def test_adaptive_scale_and_interval():
    assert adaptive_pag_scale(3.0, 0.0, 12.0) == 3.0
    assert adaptive_pag_scale(3.0, 0.01, 999.0) == pytest.approx(2.99)
    assert adaptive_pag_scale(3.0, 0.01, 500.0) == 0.0
    sched = GuidanceSchedule(3.0, 0.0, SigmaWindow(sigma_start=5.0, sigma_end=1.0))
    assert [sched.scale_at(s, 0) for s in (6.0, 5.0, 2.0, 1.0, 0.5)] == [0.0, 3.0, 3.0, 3.0, 0.0]
    assert GuidanceSchedule(3.0).scale_at(1e4, 999) == 3.0
    with pytest.raises(ValueError, match="below sigma_end"):
        GuidanceSchedule(3.0, window=SigmaWindow(sigma_start=1.0, sigma_end=2.0))


# ------------------------------------------------------------------------------------------ attention


def qkv(b=3, h=4, n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def test_identity_attention_rows():
    q, k, v = qkv()
    base = attention(q, k, v)
    out = perturb_rows(base, q, k, v, [1], Perturbation("identity"))
    assert torch.equal(out[1], v[1])  # identity map: every token outputs its own value
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])


@pytest.mark.parametrize("u", [0.0, 0.3, 1.0])
def test_softpag_is_interpolated_attention_map(u):
    q, k, v = qkv()
    a = attention_weights(q, k).double()
    eye = torch.eye(q.shape[2], dtype=torch.float64)
    expected = torch.einsum("bhij,bhjd->bhid", (1 - u) * a + u * eye, v)
    out = perturb_rows(attention(q, k, v), q, k, v, [0, 1, 2], Perturbation("identity", strength=u))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_head_selection_touches_only_chosen_heads():
    q, k, v = qkv(h=6)
    base = attention(q, k, v)
    out = perturb_rows(base, q, k, v, [0, 2], Perturbation("identity", strength=0.8, heads=(1, 4)))
    for h in range(6):
        changed = not torch.equal(out[:, h], base[:, h])
        assert changed == (h in (1, 4)), h
    assert torch.equal(out[1], base[1])
    with pytest.raises(ValueError, match="heads 0-5"):
        perturb_rows(base, q, k, v, [0], Perturbation("identity", heads=(6,)))


def test_joint_image_to_image_identity_is_a_masked_map():
    n_txt, n_img = 5, 9
    q, k, v = qkv(n=n_txt + n_img)
    out = identity_output(q, k, v, n_txt=n_txt, joint="image")
    # explicit map: text rows unchanged; image row i keeps its text logits and its own image logit only
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    mask = torch.zeros(n_txt + n_img, n_txt + n_img, dtype=torch.bool)
    mask[:n_txt] = True
    mask[n_txt:, :n_txt] = True
    mask[n_txt:, n_txt:] = torch.eye(n_img, dtype=torch.bool)
    expected = torch.softmax(logits.masked_fill(~mask, -math.inf), -1) @ v
    torch.testing.assert_close(out, expected)
    assert torch.equal(identity_output(q, k, v, n_txt=n_txt, joint="all"), v)


def test_layout_round_trip():
    x = torch.randn(2, 7, 12)
    assert torch.equal(merge_heads(split_heads(x, 3)), x)


def test_blur_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5 * 7, 4, generator=g)
    inf = blur_tokens(x, (5, 7), INFINITE_BLUR_SIGMA)
    torch.testing.assert_close(inf, x.mean(dim=2, keepdim=True).expand_as(x))
    assert torch.equal(blur_tokens(x, (5, 7), 0.0), x)
    const = torch.ones(1, 1, 3 * 2, 2)
    torch.testing.assert_close(blur_tokens(const, (3, 2), 3.0), const)  # tiny, odd grids work
    smooth = blur_tokens(x, (5, 7), 1.0)
    assert smooth.var() < x.var()
    with pytest.raises(ValueError, match="grid"):
        blur_tokens(x, (5, 6), 1.0)


@pytest.mark.parametrize(("sigma", "size"), [
    (0.1, 1), (0.4, 3), (0.5, 3), (0.7, 5), (1.0, 7), (1.5, 9), (2.0, 13), (2.5, 15), (10.0, 61), (100.0, 601)])
def test_seg_kernel_size_is_the_official_rule(sigma, size):
    """The odd size just above 6 sigma: ceil(6 sigma) when odd, else one more (SEG-SDXL's rule)."""
    assert seg_kernel_size(sigma) == size
    # cut to the grid as the official code cuts it: the largest odd size <= length + 1
    assert kernel_size_on_axis(sigma, 8) == min(size, 9)
    assert kernel_size_on_axis(sigma, 9) == min(size, 9)
    assert kernel_size_on_axis(sigma, 2) == min(size, 3)


def official_seg_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """SEG-SDXL's blur of a square (N, C, h, h) query map, written out independently of the code under test:
    size rule, cut at the map's side, normalised 2-D Gaussian, reflect padding."""
    side = img.shape[-1]
    c = math.ceil(6 * sigma)
    size = min(c + 1 - c % 2, side - (side % 2 - 1))
    half = (size - 1) * 0.5
    t = torch.linspace(-half, half, size, dtype=img.dtype)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    k2 = torch.outer(k1, k1).expand(img.shape[1], 1, size, size)
    p = size // 2
    return F.conv2d(F.pad(img, (p, p, p, p), mode="reflect"), k2, groups=img.shape[1])


@pytest.mark.parametrize("side", [8, 9])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5, 2.0, 100.0])
def test_seg_blur_matches_the_official_query_blur(side, sigma):
    g = torch.Generator().manual_seed(3)
    b, h, d = 2, 3, 4
    x = torch.randn(b, h, side * side, d, generator=g, dtype=torch.float64)
    as_map = x.permute(0, 1, 3, 2).reshape(b, h * d, side, side)  # the official (B, heads*dim, h, w) layout
    ref = official_seg_blur(as_map, sigma).reshape(b, h, d, side * side).permute(0, 1, 3, 2)
    torch.testing.assert_close(blur_tokens(x, (side, side), sigma), ref, rtol=1e-12, atol=1e-12)


def test_smoothed_energy():
    q, k, v = qkv(n=4 + 12)
    # sigma 0: no blur, ordinary attention
    torch.testing.assert_close(smoothed_energy_output(q, k, v, (3, 4), 0.0, n_txt=4), attention(q, k, v))
    out = smoothed_energy_output(q, k, v, (3, 4), INFINITE_BLUR_SIGMA, n_txt=4)
    torch.testing.assert_close(out[:, :, :4], attention(q, k, v)[:, :, :4])  # text queries untouched
    # infinite blur: every image query is the mean one, so all image rows are equal
    torch.testing.assert_close(out[:, :, 4:], out[:, :, 4:5].expand(-1, -1, 12, -1))


# ------------------------------------------------------------------------------------------ layer lists

SD15 = AttentionLayout("unet", {
    "input": {i: BlockInfo(1, 8) for i in (1, 2, 4, 5, 7, 8)}, "middle": {0: BlockInfo(1, 8)},
    "output": {i: BlockInfo(1, 8) for i in range(3, 12)}}, {"input": 12, "middle": 1, "output": 12})
SDXL = AttentionLayout("unet", {
    "input": {4: BlockInfo(2, 10), 5: BlockInfo(2, 10), 7: BlockInfo(10, 20), 8: BlockInfo(10, 20)},
    "middle": {0: BlockInfo(10, 20)}, "output": {i: BlockInfo(10 if i < 3 else 2, 20) for i in range(6)}},
    {"input": 9, "middle": 1, "output": 9})
FLUX = AttentionLayout("flux", {"double": {i: BlockInfo(1, 24) for i in range(19)},
                                "single": {i: BlockInfo(1, 24) for i in range(38)}}, {"double": 19, "single": 38})
SD3 = AttentionLayout("mmdit", {"joint": {i: BlockInfo(1, 24) for i in range(24)}}, {"joint": 24})


def test_parse_unet():
    sel = parse_and_resolve("input:4-8, middle:0, output:3-5", SD15)
    assert ("input", 6, 0) not in sel and ("input", 4, 0) in sel and ("input", 8, 0) in sel
    assert ("middle", 0, 0) in sel and ("output", 5, 0) in sel and ("output", 6, 0) not in sel
    with pytest.raises(LayerSpecError, match="selects no self-attention"):
        parse_and_resolve("output:0-2", SD15)  # SD1.5's lowest output level has no attention
    sel = parse_and_resolve("middle:0", SDXL)
    assert sorted(sel) == [("middle", 0, t) for t in range(10)]
    sel = parse_and_resolve("output:1.2-3[0,5-6]", SDXL)
    assert sel == {("output", 1, 2): (0, 5, 6), ("output", 1, 3): (0, 5, 6)}


def test_parse_dit():
    assert sorted(parse_and_resolve("double:0-2, single:37", FLUX)) == [
        ("double", 0, None), ("double", 1, None), ("double", 2, None), ("single", 37, None)]
    assert parse_and_resolve("joint:12[2,5], joint:12[7], joint:13", SD3) == {
        ("joint", 12, None): (2, 5, 7), ("joint", 13, None): None}
    assert parse_and_resolve("joint:3[1], joint:3", SD3) == {("joint", 3, None): None}


@pytest.mark.parametrize(("layout", "spec", "message"), [
    (SD15, "input:3", "input:1-2,4-5,7-8; middle:0; output:3-11"),
    (SDXL, "input:3", "input:4-5(.0-1),7-8(.0-9); middle:0(.0-9); output:0-2(.0-9),3-5(.0-1)"),
    (SD15, "input:0-20", "numbered 0-11"),
    (SD15, "double:1", "groups are input, middle, output"),
    (SDXL, "middle:0.10", "transformer indices 0-9"),
    (FLUX, "double:19", "double:0-18; single:0-37"),
    (FLUX, "double:1.0", "blocks have none"),
    (SD3, "joint:3[24]", "heads 0-23"),
    (SD3, "joint:5-3", "runs backwards"),
    (SD3, "joint 3", "cannot read"),
    (SD3, "", "joint:0-23"),
])
def test_bad_specs_name_valid_layers(layout, spec, message):
    with pytest.raises(LayerSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_and_resolve(spec, layout)


def test_defaults():
    assert default_spec(SD15) == "middle:0"
    assert default_spec(SDXL) == "middle:0"
    assert default_spec(SD3) == "joint:13"
    assert default_spec(FLUX) == "single:9"  # block 28 of the 57-block stack
    for layout in (SD15, SDXL, SD3, FLUX):
        assert parse_and_resolve(default_spec(layout), layout)


def test_chunk_rows_and_uuids():
    assert chunks_of([1, 0, 2, 2], 2) == [2, 3]
    assert rows_of([2, 3], 8, 4) == [4, 5, 6, 7]
    assert rows_of([], 8, 4) == []
    with pytest.raises(ValueError):
        rows_of([0], 7, 2)
    assert perturbed_uuid("a") == perturbed_uuid("a") != perturbed_uuid("b")
    # each technique's copy of one cond is a stream of its own; PAG's keeps the uuid it always had
    streams = {perturbed_uuid("a", tag) for tag in ("", "softpag", "seg", "sag")}
    assert len(streams) == 4 and "a" not in streams
    assert perturbed_uuid("a") == perturbed_uuid("a", "")
