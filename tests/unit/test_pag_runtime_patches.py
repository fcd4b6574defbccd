"""The attention patches of the perturbed-attention engine (``guidance/pag_runtime.py``), called the way ComfyUI
calls them, with plain-torch stand-ins for ComfyUI's attention and blocks:

* the UNet ``attn1`` replace patch: the rows of the perturbed chunks get the perturbed attention (identity,
  chosen heads, or SEG's blurred queries on the layer's own non-square token grid), every other row is the
  ordinary output bit for bit, and an earlier patch of the layer is chained;
* the DiT block patch: Flux-style (heads already split), SD3-style (``heads=`` keyword, ``v`` as
  ``(B, L, H, D)``) and split-output attention calls; joint ``[text | image]`` sequences, SD3.5's extra
  image-only attention, calls of any other length left alone; single blocks reading the text length from the
  options; an earlier block patch and attention override chained;
* the APPLY_MODEL wrapper marking the perturbed chunks and recording the token grid / text length;
* the options of the perturbed call: one patch per selected layer, keyed as ComfyUI keys them.

Expected outputs are computed here from the definitions (softmax attention, the identity map, the image-only
identity of joint attention as an explicit masked map) on the same inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from preprint.guidance.attention_perturbation import Perturbation, smoothed_energy_output
from preprint.guidance.pag_runtime import (
    PAG,
    PERTURBED,
    Host,
    PassInfo,
    base_attention,
    dit_patch,
    mark_perturbed,
    perturbed_pass_options,
    unet_patch,
)

HEADS, DIM = 2, 8
C = HEADS * DIM


def heads_of(t: torch.Tensor) -> torch.Tensor:
    b, n, _ = t.shape
    return t.reshape(b, n, HEADS, -1).permute(0, 2, 1, 3)


def flat(t: torch.Tensor) -> torch.Tensor:
    b, _, n, _ = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, -1)


def sdpa(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def joint_identity(q, k, v, n_txt):
    """Image rows attend to the text keys and to their own image key; text rows keep their attention."""
    n = q.shape[2]
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:n_txt] = True
    mask[n_txt:, :n_txt] = True
    mask[n_txt:, n_txt:] = torch.eye(n - n_txt, dtype=torch.bool)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, -math.inf)
    return torch.softmax(logits, -1) @ v


def plain_attention(q, k, v, heads, attn_precision=None, transformer_options=None, skip_reshape=False,
                    skip_output_reshape=False):
    """ComfyUI's optimized_attention contract."""
    assert heads == HEADS
    if skip_reshape:
        qh, kh, vh = q, k, v
    else:
        qh, kh, vh = (heads_of(t.reshape(t.shape[0], t.shape[1], -1)) for t in (q, k, v))
    out = sdpa(qh, kh, vh)
    return out if skip_output_reshape else flat(out)


class Recorder:
    def __init__(self, fn, factor=None):
        self.fn, self.factor, self.calls = fn, factor, []

    def __call__(self, *a, **kw):
        self.calls.append((a, kw))
        out = self.fn(*a, **kw)
        return out if self.factor is None else out * self.factor


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ UNet patch

GRID = (4, 5)  # non-square, as a 32x40 latent's middle block


def unet_inputs():
    q, k, v = (rand(6, 20, C, seed=s) for s in (1, 2, 3))
    extra = {"n_heads": HEADS, "cond_or_uncond": [0, 1, 2], "activations_shape": [6, 320, *GRID],
             "attn_precision": "fp32", PAG.marker: PassInfo(2, "unet", 1)}
    return q, k, v, extra


def test_unet_patch_perturbs_only_the_perturbed_chunk():
    q, k, v, extra = unet_inputs()
    attention = Recorder(plain_attention)
    out = unet_patch(Host(attention, None, None, "apply_model"), None, Perturbation(), PAG.marker)(q, k, v, extra)
    base = plain_attention(q, k, v, HEADS)
    assert torch.equal(out[:4], base[:4])
    assert torch.equal(out[4:], v[4:])  # identity attention: each token outputs its own value
    ((a, kw),) = attention.calls
    assert a[3] == HEADS and kw == {"attn_precision": "fp32", "transformer_options": extra}


def test_unet_patch_on_chosen_heads_and_smoothed_energy():
    q, k, v, extra = unet_inputs()
    host = Host(plain_attention, None, None, "apply_model")
    base = heads_of(plain_attention(q, k, v, HEADS))
    out = heads_of(unet_patch(host, None, Perturbation(heads=(1,)), PAG.marker)(q, k, v, extra))
    assert torch.equal(out[:, 0], base[:, 0]) and torch.equal(out[:4], base[:4])
    torch.testing.assert_close(out[4:, 1], heads_of(v)[4:, 1], rtol=1e-6, atol=1e-6)  # mixed in float32
    seg = Perturbation("smoothed_energy", blur_sigma=1.0)
    out = heads_of(unet_patch(host, None, seg, PAG.marker)(q, k, v, extra))
    want = smoothed_energy_output(heads_of(q)[4:], heads_of(k)[4:], heads_of(v)[4:], GRID, 1.0)
    torch.testing.assert_close(out[4:], want)
    assert torch.equal(out[:4], base[:4])


def test_unet_patch_chains_and_leaves_other_calls_alone():
    q, k, v, extra = unet_inputs()
    attention = Recorder(plain_attention)
    host = Host(attention, None, None, "apply_model")
    prev = Recorder(lambda q_, k_, v_, e: plain_attention(q_, k_, v_, HEADS), factor=2.0)
    out = unet_patch(host, prev, Perturbation(), PAG.marker)(q, k, v, extra)
    assert not attention.calls and prev.calls[0][0][3] is extra
    assert torch.equal(out[:4], 2.0 * plain_attention(q, k, v, HEADS)[:4]) and torch.equal(out[4:], v[4:])
    patch = unet_patch(host, None, Perturbation(), PAG.marker)
    unmarked = {key: val for key, val in extra.items() if key != PAG.marker}
    assert torch.equal(patch(q, k, v, unmarked), plain_attention(q, k, v, HEADS))
    absent = {**extra, "cond_or_uncond": [0, 1], PAG.marker: PassInfo(2, "unet", 1)}
    assert torch.equal(patch(q, k, v, absent), plain_attention(q, k, v, HEADS))


def test_base_attention():
    q, k, v, extra = unet_inputs()
    host = Host(plain_attention, None, None, "apply_model")
    assert base_attention(host, lambda *a: "prev", q, k, v, extra) == "prev"
    assert torch.equal(base_attention(host, None, q, k, v, extra), plain_attention(q, k, v, HEADS))


# ------------------------------------------------------------------------------------------------ DiT patch

N_TXT, DGRID = 5, (3, 4)
N_IMG = DGRID[0] * DGRID[1]
WQ, WK, WV = (rand(C, C, seed=10 + i) / 4 for i in range(3))


class Block:
    """A DiT block's attention: joint over ``[txt | img]`` (or ``img`` alone when there is no ``txt``), plus
    optionally SD3.5's image-only and a text-only attention, called in one of ComfyUI's calling styles."""

    def __init__(self, style="flux", extra_calls=False):
        self.style, self.extra_calls, self.seen = style, extra_calls, []

    def attend(self, run, seq):
        q, k, v = seq @ WQ, seq @ WK, seq @ WV
        if self.style == "flux":
            return run(heads_of(q), heads_of(k), heads_of(v), HEADS, skip_reshape=True)
        if self.style == "sd3":
            return run(q, k, v.reshape(*v.shape[:2], HEADS, DIM), heads=HEADS)
        return flat(run(q, k, v, HEADS, skip_output_reshape=True))

    def __call__(self, args):
        self.seen.append(args)
        override = args["transformer_options"].get("optimized_attention_override")
        run = plain_attention if override is None else (lambda *a, **kw: override(plain_attention, *a, **kw))
        txt = args.get("txt")
        out = {"joint": self.attend(run, args["img"] if txt is None else torch.cat([txt, args["img"]], 1))}
        if self.extra_calls:
            out["image"], out["text"] = self.attend(run, args["img"]), self.attend(run, txt)
        return out


def qkv_of(seq):
    return heads_of(seq @ WQ), heads_of(seq @ WK), heads_of(seq @ WV)


def dit_args(txt=True, **topts):
    img, txt_t = rand(4, N_IMG, C, seed=4), rand(4, N_TXT, C, seed=5)
    options = {"cond_or_uncond": [0, 1], PAG.marker: PassInfo(1, "flux", 2), "preprint_pag_grid": DGRID,
               "preprint_pag_txt_len": N_TXT, **topts}
    return {"img": img, **({"txt": txt_t} if txt else {}), "transformer_options": options}


def expected_joint(seq, n_txt, factor=1.0):
    q, k, v = qkv_of(seq)
    want = factor * sdpa(q, k, v)
    want[2:] = joint_identity(q[2:], k[2:], v[2:], n_txt) if n_txt else v[2:]
    return flat(want)


@pytest.mark.parametrize("style", ["flux", "sd3", "split_out"])
def test_double_block_joint_attention(style):
    args = dit_args()
    out = dit_patch(None, Perturbation(), False, PAG.marker)(args, {"original_block": Block(style)})
    seq = torch.cat([args["txt"], args["img"]], 1)
    torch.testing.assert_close(out["joint"], expected_joint(seq, N_TXT))
    assert torch.equal(out["joint"][:2], Block(style)(dit_args())["joint"][:2])  # other rows bit for bit


def test_double_block_image_only_and_other_attention_calls():
    """SD3.5's image-only attention is perturbed as self-attention; a call of any other length is left alone."""
    args = dit_args()
    seg = Perturbation("smoothed_energy", blur_sigma=1.0)
    out = dit_patch(None, seg, False, PAG.marker)(args, {"original_block": Block("sd3", extra_calls=True)})
    plain = Block("sd3", extra_calls=True)(dit_args())
    q, k, v = qkv_of(args["img"])
    torch.testing.assert_close(out["image"][2:], flat(smoothed_energy_output(q[2:], k[2:], v[2:], DGRID, 1.0)))
    assert torch.equal(out["image"][:2], plain["image"][:2])
    assert torch.equal(out["text"], plain["text"])
    seq = torch.cat([args["txt"], args["img"]], 1)
    q, k, v = qkv_of(seq)
    torch.testing.assert_close(out["joint"][2:], flat(smoothed_energy_output(q[2:], k[2:], v[2:], DGRID, 1.0,
                                                                             n_txt=N_TXT)))


def test_double_block_without_text_is_self_attention():
    args = dit_args(txt=False)
    out = dit_patch(None, Perturbation(), False, PAG.marker)(args, {"original_block": Block("flux")})
    torch.testing.assert_close(out["joint"], expected_joint(args["img"], 0))


def test_single_block_reads_the_text_length():
    args = dit_args()
    seq = torch.cat([args["txt"], args["img"]], 1)
    single = {"img": seq, "transformer_options": args["transformer_options"]}
    out = dit_patch(None, Perturbation(), True, PAG.marker)(single, {"original_block": Block("flux")})
    torch.testing.assert_close(out["joint"], expected_joint(seq, N_TXT))
    # no text length recorded: every token is an image token
    options = {key: val for key, val in args["transformer_options"].items() if key != "preprint_pag_txt_len"}
    seg = Perturbation("smoothed_energy", blur_sigma=1.0)
    out = dit_patch(None, seg, True, PAG.marker)({"img": args["img"], "transformer_options": options},
                                                  {"original_block": Block("flux")})
    q, k, v = qkv_of(args["img"])
    torch.testing.assert_close(out["joint"][2:], flat(smoothed_energy_output(q[2:], k[2:], v[2:], DGRID, 1.0)))


def test_dit_patch_chains_block_patch_and_attention_override():
    prev_override = Recorder(lambda func, *a, **kw: func(*a, **kw), factor=2.0)
    args = dit_args(optimized_attention_override=prev_override)
    block = Block("flux")
    prev = Recorder(lambda a, extra: extra["original_block"](a))
    out = dit_patch(prev, Perturbation(), False, PAG.marker)(args, {"original_block": block})
    seq = torch.cat([args["txt"], args["img"]], 1)
    torch.testing.assert_close(out["joint"], expected_joint(seq, N_TXT, factor=2.0))
    assert len(prev.calls) == 1 and len(prev_override.calls) == 1
    assert args["transformer_options"]["optimized_attention_override"] is prev_override  # the caller's untouched


def test_dit_patch_without_perturbed_rows_calls_the_block_as_is():
    block = Block("flux")
    for args in (dit_args(cond_or_uncond=[0, 0]), {"img": rand(4, N_IMG, C), "transformer_options": None},
                 {key: val for key, val in dit_args().items() if key != "transformer_options"}):
        prev = Recorder(lambda a, extra: None)
        dit_patch(prev, Perturbation(), False, PAG.marker)(args, {"original_block": block})
        assert len(prev.calls) == 1 and prev.calls[0][0][0] is args
    args = dit_args(cond_or_uncond=[0, 0])
    out = dit_patch(None, Perturbation(), False, PAG.marker)(args, {"original_block": block})
    assert block.seen[-1] is args
    assert torch.equal(out["joint"], Block("flux")(args)["joint"])


# ------------------------------------------------------------------------------------------------ wrapper, options


class ApplyModel:
    def __init__(self):
        self.calls = []

    def __call__(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        self.calls.append((x, t, c_concat, c_crossattn, control, transformer_options, kwargs))
        return "out"


def test_mark_perturbed_unet():
    executor, wrapper = ApplyModel(), mark_perturbed(PAG.marker)
    topts = {"cond_or_uncond": [0, 2, 1, 2], PERTURBED: {0}, PAG.marker: PassInfo(2, "unet", 1)}
    x = torch.zeros(8, 4, 5, 7)
    assert wrapper(executor, x, "t", "cc", None, "ctl", topts, extra=3) == "out"
    x_, t, cc, cross, ctl, seen, kw = executor.calls[0]
    assert (x_ is x, t, cc, cross, ctl, kw) == (True, "t", "cc", None, "ctl", {"extra": 3})
    assert seen[PERTURBED] == {0, 1, 3} and "preprint_pag_grid" not in seen
    assert topts[PERTURBED] == {0} and seen is not topts


def test_mark_perturbed_dit_grid_and_text_length():
    executor, wrapper = ApplyModel(), mark_perturbed(PAG.marker)
    topts = {"cond_or_uncond": [0, 1], PAG.marker: PassInfo(1, "flux", 2)}
    wrapper(executor, torch.zeros(2, 16, 5, 7), "t", None, torch.zeros(2, 6, 8), None, topts)
    seen = executor.calls[0][5]
    assert (seen[PERTURBED], seen["preprint_pag_grid"], seen["preprint_pag_txt_len"]) == ({1}, (3, 4), 6)
    wrapper(executor, torch.zeros(2, 16, 5, 7), "t", transformer_options=topts)
    assert executor.calls[1][5]["preprint_pag_txt_len"] == 0


def test_mark_perturbed_leaves_unmarked_calls_alone():
    executor, wrapper = ApplyModel(), mark_perturbed(PAG.marker)
    wrapper(executor, torch.zeros(2, 4, 4, 4), "t", transformer_options={"cond_or_uncond": [0, 1], "k": 1})
    wrapper(executor, torch.zeros(2, 4, 4, 4), "t")
    assert executor.calls[0][5] == {"cond_or_uncond": [0, 1], "k": 1} and executor.calls[1][5] == {}


def test_perturbed_pass_options_unet():
    host = Host(plain_attention, None, None, "apply_model")
    by_block = Recorder(lambda q, k, v, e: plain_attention(q, k, v, HEADS), factor=2.0)
    by_layer = Recorder(lambda q, k, v, e: plain_attention(q, k, v, HEADS), factor=3.0)
    other = object()
    original = {"transformer_options": {"patches_replace": {"attn1": {("middle", 0): by_block,
                                                                       ("output", 1, 2): by_layer,
                                                                       ("input", 4, 0): other}}}}
    info = PassInfo(2, "unet", 1)
    layers = {("middle", 0, 0): None, ("output", 1, 2): (1,)}
    mo = perturbed_pass_options(host, original, PAG, info, layers, Perturbation())
    topts = mo["transformer_options"]
    attn1 = topts["patches_replace"]["attn1"]
    assert set(topts["patches_replace"]) == {"attn1"}
    assert set(attn1) == {("middle", 0), ("middle", 0, 0), ("output", 1, 2), ("input", 4, 0)}
    assert attn1[("input", 4, 0)] is other and original["transformer_options"]["patches_replace"]["attn1"][
        ("output", 1, 2)] is by_layer
    assert topts[PAG.marker] is info
    (wrapper,) = topts["wrappers"]["apply_model"][PAG.key]
    executor = ApplyModel()
    wrapper(executor, torch.zeros(6, 4, 4, 5), "t", transformer_options={"cond_or_uncond": [0, 1, 2], **topts})
    assert executor.calls[0][5][PERTURBED] == {2}
    q, k, v, extra = unet_inputs()
    extra = {**extra, **topts}
    out = attn1[("middle", 0, 0)](q, k, v, extra)
    assert torch.equal(out[:4], 2.0 * plain_attention(q, k, v, HEADS)[:4]) and torch.equal(out[4:], v[4:])
    out = heads_of(attn1[("output", 1, 2)](q, k, v, extra))
    base = heads_of(3.0 * plain_attention(q, k, v, HEADS))
    assert torch.equal(out[:, 0], base[:, 0]) and torch.equal(out[:4], base[:4])  # head 1 of the chunk only
    torch.testing.assert_close(out[4:, 1], heads_of(v)[4:, 1], rtol=1e-6, atol=1e-6)  # mixed in float32


def test_perturbed_pass_options_dit():
    host = Host(plain_attention, None, None, "apply_model")
    info = PassInfo(1, "flux", 2)
    layers = {("double", 0, None): None, ("single", 3, None): None}
    prev = Recorder(lambda a, extra: extra["original_block"](a))
    mo = perturbed_pass_options(host, {"transformer_options": {"patches_replace": {"dit": {
        ("double_block", 0): prev}}}}, PAG, info, layers, Perturbation())
    patches = mo["transformer_options"]["patches_replace"]
    assert set(patches) == {"dit"} and set(patches["dit"]) == {("double_block", 0), ("single_block", 3)}
    args = dit_args()
    seq = torch.cat([args["txt"], args["img"]], 1)
    # the double block reads the text length off its own text; its image-only attention is self-attention
    out = patches["dit"][("double_block", 0)](args, {"original_block": Block("flux", extra_calls=True)})
    torch.testing.assert_close(out["joint"], expected_joint(seq, N_TXT))
    torch.testing.assert_close(out["image"], expected_joint(args["img"], 0))
    assert len(prev.calls) == 1
    # the single block reads it off the options
    single = {"img": seq, "transformer_options": args["transformer_options"]}
    out = patches["dit"][("single_block", 3)](single, {"original_block": Block("flux")})
    torch.testing.assert_close(out["joint"], expected_joint(seq, N_TXT))
