"""HiDiffusion on tiny SD1.5 / SDXL layouts through real ComfyUI sampling: off-switch exactness, the RAU-Net
feature sizes at odd, non-square sizes, MSW-MSA windows, ControlNet residuals, determinism, bad input."""

from __future__ import annotations

import logging

import pytest
import torch

from preprint.highres import hidiffusion

from .harness import run_node, run_sampling, tiny_model


def hidiff(m, raunet=True, msw_msa=True, t1=0.4, t2=0.0, preset="custom"):
    return run_node("PreprintHiDiffusion", model=m, raunet=raunet, msw_msa=msw_msa, t1=t1, t2=t2, preset=preset)[0]


@pytest.fixture(scope="module")
def sd15():
    return tiny_model("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_model("sdxl")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("settings", [dict(raunet=False, msw_msa=False), dict(t1=0.0, t2=0.0, msw_msa=False)])
def test_switched_off_is_bitwise_the_unpatched_model(family, settings, request):
    m = request.getfixturevalue(family)
    base = run_sampling(m, family, steps=4, height=8, width=8)
    assert torch.equal(run_sampling(hidiff(m, **settings), family, steps=4, height=8, width=8), base)


def _input_shapes(model, block: int):
    """Spatial size of the features entering input block ``block`` at each call."""
    shapes = []
    # ComfyUI runs a block layer by layer (forward_timestep_embed), never through the block's own __call__
    first_layer = next(iter(model.model.diffusion_model.input_blocks[block].children()))
    handle = first_layer.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape[-2:])))
    return shapes, handle


@pytest.mark.parametrize("family,strided_into,pooled_into,t1,t2", [
    ("sd15", 4, 5, 0.5, 0.25),  # SD1.x: stride-4 conv until t1, pooling until t2
    ("sdxl", 7, 5, 0.25, 0.5),  # SDXL: pooling until t1, stride-4 conv until t2
])
def test_raunet_shrinks_features_at_odd_non_square_sizes_for_its_share_of_the_run(
        family, strided_into, pooled_into, t1, t2, request):
    m = hidiff(request.getfixturevalue(family), msw_msa=False, t1=t1, t2=t2)
    h, w = 13, 22  # 104 x 176 px: neither a multiple of 64 nor square
    strided, hs = _input_shapes(m, strided_into)
    pooled, hp = _input_shapes(m, pooled_into)
    try:
        out = run_sampling(m, family, sampler_name="euler", steps=8, height=h, width=w)
    finally:
        hs.remove()
        hp.remove()
    assert out.shape[-2:] == (h, w) and torch.isfinite(out).all()
    def down(size, k):  # what a stride-k down-sampler or a ceil-mode k x k pool makes of a size
        return tuple((n + k - 1) // k for n in size)

    full = (h, w)
    per_step = len(strided) // 8  # cond and uncond batched: one call per step; split: two
    assert per_step in (1, 2) and len(strided) == 8 * per_step and len(pooled) == 8 * per_step

    def steps(*parts):
        return [size for size, n in parts for _ in range(n * per_step)]

    if family == "sd15":  # stride 4 for 4 of 8 steps (t1 0.5), pooling for 2 (t2 0.25)
        want_strided = steps((down(full, 4), 4), (down(full, 2), 4))
        want_pooled = steps((down(down(full, 4), 2), 2), (down(full, 4), 2), (down(full, 2), 4))
    else:  # pooling for 2 of 8 steps (t1 0.25), stride 4 in down-sampler 1 for 4 (t2 0.5)
        level1 = down(full, 2)
        want_pooled = steps((down(level1, 2), 2), (level1, 6))
        want_strided = steps((down(down(level1, 2), 4), 2), (down(level1, 4), 2), (down(level1, 2), 4))
    assert strided == want_strided
    assert pooled == want_pooled


def test_auto_preset_on_sdxl_at_2x_runs_the_stride_first_then_pooling(sdxl):
    """The official SDXL 2x schedule, chosen by 'auto' from the latent's size (t1 / t2 widgets ignored): of 25
    steps, the stride-4 down-sampler for int(25 * 8/50) = 4, then pooling up to int(25 * 0.4) = 10, then
    neither; never both in one step."""
    m = hidiff(sdxl, msw_msa=False, t1=0.9, t2=0.9, preset="auto")
    h, w = 13, 22
    strided, hs = _input_shapes(m, 7)
    pooled, hp = _input_shapes(m, 5)
    try:
        run_sampling(m, "sdxl", sampler_name="euler", steps=25, height=h, width=w)
    finally:
        hs.remove()
        hp.remove()

    def down(size, k):
        return tuple((n + k - 1) // k for n in size)

    level1 = down((h, w), 2)
    per_step = len(strided) // 25
    assert per_step in (1, 2) and len(strided) == 25 * per_step

    def steps(*parts):
        return [size for size, n in parts for _ in range(n * per_step)]

    assert strided == steps((down(level1, 4), 4), (down(down(level1, 2), 2), 6), (down(level1, 2), 15))
    assert pooled == steps((level1, 4), (down(level1, 2), 6), (level1, 15))


def test_msw_msa_attends_in_windows_on_the_top_layers(sd15, monkeypatch):
    import sys

    from .harness import node_class

    pack = node_class("PreprintHiDiffusion").__module__.rsplit(".", 2)[0]  # the package ComfyUI loaded
    runtime = sys.modules[f"{pack}.highres.hidiffusion_runtime"]
    seen = []
    real = runtime.windowed_attention

    def spy(q, k, v, height, width, shift, attention):
        seen.append((height, width, shift))
        return real(q, k, v, height, width, shift, attention)

    monkeypatch.setattr(runtime, "windowed_attention", spy)
    m = hidiff(sd15, raunet=False)
    out = run_sampling(m, "sd15", steps=4, height=12, width=10)
    assert {(h, w) for h, w, _ in seen} == {(12, 10)}  # input 1, 2 and output 9-11: full latent size
    assert len(seen) % (5 * 4) == 0  # five layers, every call of every step
    assert not torch.equal(out, run_sampling(sd15, "sd15", steps=4, height=12, width=10))


def test_same_seed_same_image_after_another_graph(sd15):
    m = hidiff(sd15, t1=0.5, t2=0.25)
    first = run_sampling(m, "sd15", steps=6, height=12, width=12, seed=3)
    run_sampling(hidiff(sd15, t1=0.7, t2=0.3), "sd15", steps=5, height=16, width=8, seed=9)
    assert torch.equal(run_sampling(m, "sd15", steps=6, height=12, width=12, seed=3), first)
    assert not torch.equal(run_sampling(m, "sd15", steps=6, height=12, width=12, seed=4), first)


def _control_for(model, h, w):
    """ControlNet-shaped residuals: one per input block (full-size features, popped from the end), one for
    the middle block and one per output block's skip."""
    dm = model.model.diffusion_model
    shapes = []
    # a block's output is its last layer's (ComfyUI runs blocks layer by layer, not through their __call__)
    handles = [list(b.children())[-1].register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape)))
               for b in dm.input_blocks]
    mid = []
    handles.append(list(dm.middle_block.children())[-1].register_forward_hook(
        lambda _m, _a, out: mid.append(tuple(out.shape))))
    try:
        run_sampling(model, "sd15", steps=1, height=h, width=w, cfg=1.0)
    finally:
        for x in handles:
            x.remove()
    g = torch.Generator().manual_seed(5)
    inputs = [0.5 * torch.randn(s, generator=g) for s in shapes[: len(dm.input_blocks)]]
    return {"input": inputs[::-1], "middle": [0.5 * torch.randn(mid[0], generator=g)], "output": list(inputs)}


def test_controlnet_residuals_line_up_while_features_are_reduced(sd15, caplog):
    m = hidiff(sd15, msw_msa=False, t1=1.0, t2=1.0)
    h, w = 12, 20
    control = _control_for(sd15, h, w)
    dm = m.model.diffusion_model
    x = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([5.0])
    run = hidiffusion.HiDiffusionRun(torch.tensor([5.0, 1.0, 0.0]), hidiffusion.LAYOUTS["sd15"], 1.0, 1.0, True,
                                     False, 0)
    to = {**m.model_options["transformer_options"], "preprint_hidiffusion": run, "sigmas": sigma,
          "wrappers": m.wrappers}
    context = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1))

    def call(ctrl):
        c = None if ctrl is None else {k: list(v) for k, v in ctrl.items()}
        return m.model.apply_model(x, sigma, c_crossattn=context, control=c, transformer_options=dict(to))

    with caplog.at_level(logging.WARNING):
        plain = call(None)
        zero = call({k: [torch.zeros_like(t) for t in v] for k, v in control.items()})
        steered = call(control)
    assert not [r for r in caplog.records if "could not be applied" in r.getMessage()]
    assert torch.equal(zero, plain)  # zero residuals, resized, change nothing
    assert not torch.allclose(steered, plain)  # real residuals reached the reduced features
    assert dm is sd15.model.diffusion_model  # the shared model was never rebuilt


def test_a_dit_gets_a_clear_error():
    with pytest.raises(ValueError, match="not a UNet"):
        hidiff(tiny_model("flux"))


def test_switch_points_outside_the_run_are_refused_before_queueing():
    from preprint.nodes.highres import PreprintHiDiffusion

    msg = PreprintHiDiffusion.validate_inputs(t1=1.4, t2=0.0)
    assert isinstance(msg, str) and "t1 = 1.4" in msg
    assert PreprintHiDiffusion.validate_inputs(t1=0.4, t2=0.0) is True


CACHES = {
    "deepcache": lambda m: run_node("PreprintDeepCache", model=m, cache_interval=3, branch_depth=0,
                                    schedule="uniform", start_percent=0.0, end_percent=1.0)[0],
    "blockcache": lambda m: run_node("PreprintBlockCache", model=m, mode="online", threshold=5.0,
                                     profile_name="hidiffusion_test", start_percent=0.0, end_percent=1.0)[0],
}


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("cache_first", [False, True])
def test_stacks_with_unet_caches_across_the_switch_point(sd15, cache, cache_first):
    """RAU-Net changes feature sizes at its switch point; a cache must not reuse a feature of the old size."""
    add = CACHES[cache]
    m = hidiff(add(sd15), t1=0.5, t2=0.25) if cache_first else add(hidiff(sd15, t1=0.5, t2=0.25))
    out = run_sampling(m, "sd15", steps=8, height=14, width=10)
    assert out.shape[-2:] == (14, 10) and torch.isfinite(out).all()
    assert not torch.equal(out, run_sampling(hidiff(sd15, t1=0.5, t2=0.25), "sd15", steps=8, height=14, width=10))
