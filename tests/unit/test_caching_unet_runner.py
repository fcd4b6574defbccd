"""The block-skipping UNet forward against the stock forward's conventions: time and label embeddings, the forward
patches, ControlNet residuals (missing or mis-shaped ones), the block names and transformer indices the blocks see,
the up-sampler's target shape, plans that skip what a later block needs, and the per-block tallies (pure torch)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from preprint.caching.unet_runner import REUSE, RUN, SKIP, BlockCounts, RunAll, run_unet

from .test_caching_unet import Blk, TinyUNet


def sinusoidal(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


def comfy_timestep_embedding(t, dim, repeat_only=False):
    """ComfyUI's timestep_embedding: sinusoidal, or with ``repeat_only`` the raw timestep repeated ``dim`` times."""
    return t[:, None].float().repeat(1, dim) if repeat_only else sinusoidal(t, dim)


def stock(unet, x, t, y=None, control=None, patches=None):
    """ComfyUI's UNetModel._forward, written plainly (apply_control pops a residual when the list has one and
    adds it when it fits h)."""
    patches = patches or {}
    to: dict = {}

    def apply_control(h, name):
        if control is not None and name in control and len(control[name]) > 0:
            ctrl = control[name].pop()
            if ctrl is not None and torch.broadcast_shapes(h.shape, ctrl.shape) == h.shape:
                h = h + ctrl
        return h

    emb = unet.time_embed(sinusoidal(t, unet.model_channels))
    for p in patches.get("emb_patch", []):
        emb = p(emb, unet.model_channels, to)
    if y is not None:
        emb = emb + unet.label_emb(y)
    hs, h = [], x
    for m in unet.input_blocks:
        h = apply_control(m(h, emb), "input")
        for p in patches.get("input_block_patch", []):
            h = p(h, to)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", []):
            h = p(h, to)
    h = apply_control(unet.middle_block(h, emb), "middle")
    for m in unet.output_blocks:
        hsp = apply_control(hs.pop(), "output")
        h = m(torch.cat([h, hsp], 1), emb, output_shape=hs[-1].shape if hs else None)
    return unet.out(h)


def forward(unet, plan, x, t, y=None, control=None, to=None, counts=None, emb=comfy_timestep_embedding):
    with torch.no_grad():
        return run_unet(unet, plan, emb, x, t, None, y, control, {} if to is None else to, counts=counts)


@pytest.fixture(scope="module")
def unet():
    return TinyUNet().eval()


X = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([500.0, 500.0])


# -- embeddings and patches ------------------------------------------------------------------------------------
def test_time_embedding_is_the_sinusoidal_one(unet):
    """The forward asks for the sinusoidal embedding (repeat_only=False), as the stock forward does."""
    with torch.no_grad():
        assert torch.equal(forward(unet, RunAll(), X, T), stock(unet, X, T))


def test_label_embedding_is_added_for_a_class_conditional_unet():
    """SDXL-style class conditioning: label_emb(y) is added to the time embedding."""
    net = TinyUNet().eval()
    net.num_classes = "sequential"
    net.label_emb = nn.Linear(5, 8)
    y = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = forward(net, RunAll(), X, T, y=y)
        assert torch.equal(out, stock(net, X, T, y=y))
        net.label_emb.weight.zero_()
        net.label_emb.bias.zero_()
        assert not torch.equal(out, forward(net, RunAll(), X, T, y=y))  # the label did matter


def test_forward_patches_apply_where_the_stock_forward_applies_them(unet):
    """emb_patch on the time embedding; input_block_patch on each input block's output before it becomes a
    skip feature; input_block_patch_after_skip on the h passed on, after it."""
    patches = {"emb_patch": [lambda emb, ch, to: emb * 0.5 + 0.25],
               "input_block_patch": [lambda h, to: h * 0.8],
               "input_block_patch_after_skip": [lambda h, to: h + 0.1]}
    out = forward(unet, RunAll(), X, T, to={"patches": patches})
    with torch.no_grad():
        assert torch.equal(out, stock(unet, X, T, patches=patches))
        for k in patches:  # each patch changes the result
            assert not torch.equal(out, stock(unet, X, T, patches={q: v for q, v in patches.items() if q != k}))


# -- ControlNet residuals --------------------------------------------------------------------------------------
def test_missing_controlnet_residuals_are_skipped(unet):
    """A control dict whose lists are empty (or shorter than the blocks) adds nothing where a residual is missing."""
    mid = torch.full((2, 6, 4, 4), 0.3)
    out = forward(unet, RunAll(), X, T, control={"input": [], "middle": [mid], "output": []})
    with torch.no_grad():
        assert torch.equal(out, stock(unet, X, T, control={"middle": [mid]}))
        assert not torch.equal(out, stock(unet, X, T))


def test_a_residual_that_does_not_fit_its_block_is_left_out(unet):
    """As in the stock forward, a residual whose shape does not broadcast to the block's output is ignored (the
    stock forward only logs a warning); the other residuals still apply."""
    bad = torch.ones(2, 4, 4, 4)  # block 0 outputs (2, 4, 8, 8)
    good = torch.full((2, 4, 8, 8), 0.2)
    out = forward(unet, RunAll(), X, T, control={"input": [good, bad]})  # popped from the end: block 0 gets bad
    with torch.no_grad():
        assert torch.equal(out, stock(unet, X, T, control={"input": [good, None]}))


# -- what the blocks see ---------------------------------------------------------------------------------------
class SpatialTransformer(nn.Module):
    """Stands in for ComfyUI's SpatialTransformer: logs the block name and transformer index it runs under."""

    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def forward(self, h, to):
        self.log.append((to["block"], to["transformer_index"]))
        return h


class AttnBlk(Blk):
    """A block with one transformer layer; like forward_timestep_embed, it advances the transformer index."""

    def __init__(self, log, *a, **k):
        super().__init__(*a, **k)
        self.attn = SpatialTransformer(log)

    def forward(self, h, emb, context=None, transformer_options=None, output_shape=None, **kw):
        h = self.attn(super().forward(h, emb, context, transformer_options, output_shape), transformer_options)
        transformer_options["transformer_index"] += 1
        return h


class AttnUNet(TinyUNet):
    def __init__(self):
        super().__init__()
        self.log: list = []
        L = self.log
        self.input_blocks = nn.ModuleList([AttnBlk(L, 2, 4), AttnBlk(L, 4, 4), AttnBlk(L, 4, 6, scale=2),
                                           AttnBlk(L, 6, 6)])
        self.middle_block = AttnBlk(L, 6, 6)
        self.output_blocks = nn.ModuleList([AttnBlk(L, 12, 6), AttnBlk(L, 12, 4, scale=0.5), AttnBlk(L, 8, 4),
                                            AttnBlk(L, 8, 4)])


class HandPlan:
    """A fixed plan: actions by block (default RUN), cached outputs for the reused ones."""

    def __init__(self, actions=None, cached=None):
        self.actions, self._cached = actions or {}, cached or {}

    def action(self, name):
        return self.actions.get(name, RUN)

    def cached(self, name):
        return self._cached[name]

    def computed(self, name, out):
        pass


ORDER = [("input", i) for i in range(4)] + [("middle", 0)] + [("output", j) for j in range(4)]


def test_blocks_see_their_own_name_and_the_stock_transformer_index():
    """Every block runs under transformer_options["block"] = its name; the transformer index starts at 0 and
    counts the transformers before it."""
    net = AttnUNet().eval()
    forward(net, RunAll(), X, T)
    assert net.log == [(name, i) for i, name in enumerate(ORDER)]


def test_transformers_of_blocks_not_run_still_count():
    """DeepCache's cached step (deep branch skipped, output block 2 reused): the last output block's transformer
    sees index 8, as in the full forward, since attention patches key on it."""
    net = AttnUNet().eval()
    deep = {n: SKIP for n in ORDER[1:7]}
    plan = HandPlan({**deep, ("output", 2): REUSE}, {("output", 2): torch.zeros(2, 4, 8, 8)})
    counts = BlockCounts()
    forward(net, plan, X, T, counts=counts)
    assert net.log == [(("input", 0), 0), (("output", 3), 8)]
    assert counts.run == {("input", 0): 1, ("output", 3): 1}
    assert counts.not_run == dict.fromkeys(ORDER[1:8], 1)


class OddUNet(TinyUNet):
    """Two down-samplers on a 10x10 latent: 10 -> 5 -> 2, so each up-sampler must hit its skip feature's size."""

    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList([Blk(2, 4), Blk(4, 4, scale=2), Blk(4, 4, scale=2)])
        self.middle_block = Blk(4, 4)
        self.output_blocks = nn.ModuleList([Blk(8, 4, scale=0.5), Blk(8, 4, scale=0.5), Blk(8, 4)])
        self.out = nn.Conv2d(4, 2, 1)


def test_each_upsampler_targets_the_next_skip_features_shape():
    """An output block gets output_shape = the shape of the skip feature the next block takes (5x5, then 10x10),
    not a doubling (2 -> 4 would not fit)."""
    net = OddUNet().eval()
    x = torch.randn(1, 2, 10, 10, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300.0])
    with torch.no_grad():
        assert torch.equal(forward(net, RunAll(), x, t), stock(net, x, t))


def test_run_all_records_only_the_requested_blocks(unet):
    """RunAll(record=...) keeps the outputs of the named blocks, and only those."""
    plan = RunAll(record={("middle", 0)})
    forward(unet, plan, X, T)
    with torch.no_grad():
        emb = unet.time_embed(sinusoidal(T, 8))
        h = X
        for m in unet.input_blocks:
            h = m(h, emb)
        want = unet.middle_block(h, emb)
    assert list(plan.outputs) == [("middle", 0)]
    assert torch.equal(plan.outputs[("middle", 0)], want)


# -- plans that skip a block a later one needs -----------------------------------------------------------------
def test_running_an_output_block_after_skipping_the_middle_block_is_refused(unet):
    with pytest.raises(RuntimeError, match=r"runs block \('output', 0\) but skipped a block it depends on"):
        forward(unet, HandPlan({("middle", 0): SKIP}), X, T)


def test_running_an_output_block_after_skipping_its_skip_feature_is_refused(unet):
    """Input block 3 skipped, the middle feature reused: output block 0 has h but not its skip feature."""
    plan = HandPlan({("input", 3): SKIP, ("middle", 0): REUSE}, {("middle", 0): torch.zeros(2, 6, 4, 4)})
    with pytest.raises(RuntimeError, match=r"runs block \('output', 0\) but skipped a block it depends on"):
        forward(unet, plan, X, T)


def test_running_an_output_block_whose_target_skip_feature_was_skipped_is_refused(unet):
    """Input block 2 skipped, block 3 reused: output block 0 runs, but the skip feature that sets its output size
    (input block 2's) is missing."""
    plan = HandPlan({("input", 2): SKIP, ("input", 3): REUSE}, {("input", 3): torch.zeros(2, 6, 4, 4)})
    with pytest.raises(RuntimeError, match="skipped the input block feeding the next one"):
        forward(unet, plan, X, T)


# -- per-block tallies -----------------------------------------------------------------------------------------
A, B, C = ("input", 1), ("middle", 0), ("output", 2)


def test_block_counts_show_and_compare_by_their_tallies():
    """Two tallies with the same counts are equal and print the same (the lock is neither shown nor compared)."""
    a, b = BlockCounts(), BlockCounts()
    for c in (a, b):
        c.add(A, True)
        c.add(B, False)
    assert a == b
    assert repr(a) == "BlockCounts(run={('input', 1): 1}, not_run={('middle', 0): 1})"


def test_skipped_fraction_of_no_evaluations_is_zero():
    assert BlockCounts().skipped_fraction() == 0.0


def test_skipped_fraction_counts_blocks_that_only_ran_and_blocks_never_run():
    """A ran 3 times, B was skipped once: 1 of 4 evaluations skipped."""
    c = BlockCounts(run={A: 3}, not_run={B: 1})
    assert c.skipped_fraction() == 0.25
    c = BlockCounts(run={A: 1}, not_run={B: 1})
    assert c.skipped_fraction() == 0.5


def test_skipped_fraction_weighted_by_cost_ignores_blocks_without_a_cost():
    """Weighted by per-block cost; a block absent from the cost table weighs nothing. A ran once, B ran once and
    was skipped once, C (no cost) was skipped 5 times: 1 of 3 weighted evaluations skipped (cost 1 each)."""
    c = BlockCounts(run={A: 1, B: 1}, not_run={B: 1, C: 5})
    assert c.skipped_fraction({A: 1.0, B: 1.0}) == pytest.approx(1 / 3)
    assert c.skipped_fraction({A: 2.0, B: 1.0}) == pytest.approx(1 / 4)
