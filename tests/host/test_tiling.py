"""Tiled Diffusion on tiny SD1.5 and Flux layouts through real ComfyUI sampling: odd non-square sizes, one model
call per tile, exactly-once coverage of the shifted grid, the whole-image tile as the plain model (bit for bit), the
error for a tile larger than the image, tile batching, determinism, a real (tiny) ControlNet whose residuals reach
each tile at its position, area conditioning, and the errors for bad input."""

from __future__ import annotations

import logging
import math

import comfy.patcher_extension
import pytest
import torch

from preprint.highres import tiling as tl

from .harness import make_conds, node_class, run_node, run_sampling, tiny_model

SHIFTED, OVERLAPPING = tl.MODES
H, W = 13, 22  # 104 x 176 px: neither square nor a multiple of 64
SH, SW = 19, 30  # 152 x 240 px, for 128 px tiles (SD1.5's shifted grid moves in steps of 64 px)
TILE_INFO = "preprint_tiles"


def tiled(m, tile=64, mode=SHIFTED, overlap=16, weighting="gaussian", batch=1, tile_height=None, **window):
    return run_node("PreprintTiledDiffusion", model=m, tile_width=tile, tile_height=tile_height or tile, mode=mode,
                    overlap=overlap, weighting=weighting, tile_batch_size=batch, **window)[0]


@pytest.fixture(scope="module")
def sd15():
    return tiny_model("sd15")


@pytest.fixture(scope="module")
def flux():
    return tiny_model("flux")


class Recorder:
    """DIFFUSION_MODEL wrapper inside the tiling: every forward call's input shape, timestep, tiles and control."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, executor, *args, **kwargs):
        to = kwargs.get("transformer_options")
        if to is None:  # Flux passes it by position
            to = next(a for a in args if isinstance(a, dict) and "sigmas" in a)
        control = kwargs.get("control")
        if control is None:
            control = next((a for a in args if isinstance(a, dict) and "input" in a), None)
        self.calls.append({"shape": tuple(args[0].shape), "t": float(args[1].flatten()[0]),
                           "tiles": to.get(TILE_INFO),
                           "control": None if control is None else {k: [None if r is None else r.clone() for r in v]
                                                                      for k, v in control.items()}})
        return executor(*args, **kwargs)

    def by_step(self) -> list[list[dict]]:
        steps: dict[float, list[dict]] = {}
        for c in self.calls:
            steps.setdefault(c["t"], []).append(c)
        return list(steps.values())


def recorded(m):
    rec = Recorder()
    m = m.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_tiling_recorder", rec)
    return m, rec


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("mode", [SHIFTED, OVERLAPPING])
def test_samples_at_an_odd_non_square_size_tile_by_tile(family, mode, request):
    base = request.getfixturevalue(family)
    m, rec = recorded(tiled(base, mode=mode, tile=128))
    h, w = SH, SW
    out = run_sampling(m, family, steps=3, height=h, width=w, cfg=1.0 if family == "flux" else 5.0)
    assert out.shape[-2:] == (h, w) and torch.isfinite(out).all()
    # tiles, never the whole latent: at most a tile plus a merged sliver (below a quarter tile, or the UNet's 8)
    assert rec.calls and all(max(c["shape"][-2:]) < 16 + 8 for c in rec.calls)
    assert not torch.equal(out, run_sampling(base, family, steps=3, height=h, width=w,
                                             cfg=1.0 if family == "flux" else 5.0))


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("mode", [SHIFTED, OVERLAPPING])
def test_a_tile_as_large_as_the_image_is_bitwise_the_plain_model(family, mode, request, caplog):
    base = request.getfixturevalue(family)
    plain = run_sampling(base, family, steps=4, height=H, width=W)
    m, rec = recorded(tiled(base, tile=W * 8, tile_height=H * 8, mode=mode))
    with caplog.at_level(logging.WARNING):
        assert torch.equal(run_sampling(m, family, steps=4, height=H, width=W), plain)
    assert rec.calls and all(c["shape"][-2:] == (H, W) for c in rec.calls)
    assert [r for r in caplog.records if r.getMessage().startswith(
        "Tiled Diffusion (Preprint): the tile (176 x 104 px) covers the whole image (176 x 104 px)")]


def test_a_sigma_window_outside_the_run_is_bitwise_the_plain_model(sd15):
    plain = run_sampling(sd15, "sd15", steps=4, height=H, width=W)
    off = tiled(sd15, sigma_start=0.001, sigma_end=0.0005)
    assert torch.equal(run_sampling(off, "sd15", steps=4, height=H, width=W), plain)
    half = tiled(sd15, sigma_start=1.0, sigma_end=-1.0)  # karras 4 steps: the last steps only
    m, rec = recorded(half)
    run_sampling(m, "sd15", steps=4, height=H, width=W)
    full = [c for c in rec.calls if c["shape"][-2:] == (H, W)]
    assert full and len(full) < len(rec.calls)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_overlapping_mode_costs_one_model_call_per_tile_per_step(family, request):
    m, rec = recorded(tiled(request.getfixturevalue(family), mode=OVERLAPPING, overlap=16))
    steps = 3
    run_sampling(m, family, steps=steps, height=H, width=W, cfg=5.0)
    want = tl.overlapping_tiles(H, W, 8, 8, 6, 6)  # 2 rows x 4 columns
    assert len(want) == 8
    per_step = rec.by_step()
    assert len(per_step) == steps
    for calls in per_step:
        # cond and uncond are batched per tile (or split by ComfyUI: then two calls per tile)
        per_tile = 2 if all(c["shape"][0] == 1 for c in calls) else 1
        assert len(calls) == len(want) * per_tile
        assert sorted(t for c in calls for t in c["tiles"][0])[:: per_tile] == sorted(want)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_shifted_mode_covers_each_element_once_per_step_on_a_grid_that_moves(family, request):
    m, rec = recorded(tiled(request.getfixturevalue(family), mode=SHIFTED, tile=128))
    h, w = SH, SW
    run_sampling(m, family, steps=5, height=h, width=w, cfg=5.0, seed=2)
    grids = []
    for calls in rec.by_step():
        tiles = [t for c in calls for t in c["tiles"][0]]
        cover = torch.zeros(h, w, dtype=torch.int64)
        for t in tiles:
            cover[t.index] += 1
        assert ((cover == 1).all() or (cover == 2).all()), "each element once per call set (cond+uncond or split)"
        assert len(calls) == len(tiles)  # one model call per tile
        assert all(c["shape"][-2:] == (c["tiles"][0][0].h, c["tiles"][0][0].w) for c in calls)
        grids.append(frozenset(tiles))
    assert len(set(grids)) > 2  # offsets differ between steps


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_tile_batches_give_the_same_result_in_fewer_calls(family, request):
    base = request.getfixturevalue(family)
    one, rec1 = recorded(tiled(base, mode=OVERLAPPING, batch=1))
    four, rec4 = recorded(tiled(base, mode=OVERLAPPING, batch=4))
    a = run_sampling(one, family, steps=2, height=H, width=W)
    b = run_sampling(four, family, steps=2, height=H, width=W)
    assert len(rec4.calls) * 4 == len(rec1.calls)
    assert all(len(c["tiles"][0]) == 4 for c in rec4.calls)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_same_seed_same_image_twice_and_after_another_run(sd15):
    m = tiled(sd15, tile=128)
    first = run_sampling(m, "sd15", steps=3, height=SH, width=SW, seed=3)
    assert torch.equal(run_sampling(m, "sd15", steps=3, height=SH, width=SW, seed=3), first)
    run_sampling(tiled(sd15, mode=OVERLAPPING), "sd15", steps=4, height=16, width=9, seed=9)
    torch.manual_seed(1234)  # the global RNG plays no part
    assert torch.equal(run_sampling(m, "sd15", steps=3, height=SH, width=SW, seed=3), first)
    assert not torch.equal(run_sampling(m, "sd15", steps=3, height=SH, width=SW, seed=4), first)


def test_the_seed_moves_the_grid(sd15):
    grids = []
    for seed in (3, 4):
        m, rec = recorded(tiled(sd15, tile=128))
        run_sampling(m, "sd15", steps=3, height=SH, width=SW, seed=seed)
        grids.append([sorted(t for c in calls for t in c["tiles"][0]) for calls in rec.by_step()])
    assert grids[0] != grids[1]


def test_a_tile_larger_than_the_image_on_one_side_spans_that_side(sd15, caplog):
    m, rec = recorded(tiled(sd15, tile=64, tile_height=256, mode=OVERLAPPING, overlap=0))
    with caplog.at_level(logging.WARNING):
        run_sampling(m, "sd15", steps=2, height=H, width=W)
    assert {c["shape"][-2:] for c in rec.calls} == {(H, 8)}  # one tile spans the height, 8-wide tiles across
    assert not [r for r in caplog.records if "not tiled" in r.getMessage()]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_a_tile_larger_than_the_image_on_both_sides_is_an_error_before_any_model_call(family, request):
    base = request.getfixturevalue(family)
    for tile, tile_height in ((768, None), (W * 8 + 8, H * 8 + 8)):  # far larger, and one element larger
        m, rec = recorded(tiled(base, tile=tile, tile_height=tile_height))
        with pytest.raises(ValueError, match=r"^Tiled Diffusion \(Preprint\): the tile \(\d+ x \d+ px\) is larger "
                                             r"than the image \(176 x 104 px\) on both sides.*nothing to tile.*"
                                             r"smaller than the image on at least one side.*remove this node"):
            run_sampling(m, family, steps=2, height=H, width=W)
        assert rec.calls == []
    # equal to the image on one side and larger on the other: that side is spanned, the run untiled, as equal sizes
    m, _ = recorded(tiled(base, tile=W * 8, tile_height=H * 8 + 64))
    assert torch.equal(run_sampling(m, family, steps=2, height=H, width=W),
                       run_sampling(base, family, steps=2, height=H, width=W))


def test_bad_widgets_are_refused_before_queueing_and_at_execution(sd15):
    cls = node_class("PreprintTiledDiffusion")
    msg = cls.validate_inputs(tile_width=100, tile_height=96, mode=SHIFTED, overlap=16)
    assert isinstance(msg, str) and msg.startswith("Tiled Diffusion (Preprint): tile_width = 100") and "8" in msg
    msg = cls.validate_inputs(tile_width=128, tile_height=96, mode=OVERLAPPING, overlap=96)
    assert isinstance(msg, str) and "overlap = 96" in msg
    assert cls.validate_inputs(tile_width=128, tile_height=96, mode=SHIFTED, overlap=96) is True  # unused there
    assert cls.validate_inputs(tile_width=768, tile_height=768, mode=OVERLAPPING, overlap=128) is True
    with pytest.raises(ValueError, match="multiple of 8"):
        tiled(sd15, tile=100)
    with pytest.raises(ValueError, match="unknown mode"):
        run_node("PreprintTiledDiffusion", model=sd15, tile_width=64, tile_height=64, mode="rolled", overlap=0,
                 weighting="uniform")


def test_area_conditioning_smaller_than_a_tile_runs(sd15):
    pos, neg = make_conds("sd15")
    area = [[pos[0][0], {**pos[0][1], "area": (6, 10, 4, 9), "strength": 1.0, "set_area_to_bounds": False}]]
    m, rec = recorded(tiled(sd15, mode=OVERLAPPING))
    out = run_sampling(m, "sd15", steps=3, height=H, width=W, positive=pos + area, negative=neg)
    assert torch.isfinite(out).all()
    assert any(c["shape"][-2:] == (6, 8) for c in rec.calls)  # the area crop, tiled with the tile clamped to it


def _tiny_controlnet(model):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    from preprint.runner.tiny_models import randomise_

    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels", None)
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    net = comfy.cldm.cldm.ControlNet(**config)
    randomise_(net, 7)
    with torch.no_grad():  # zero convolutions are trained away from zero: make the residuals felt
        for p in net.parameters():
            if p.ndim == 4 and p.shape[-1] == 1:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"))


def _with_control(conds, control):
    return [[c, {**d, "control": control, "control_apply_to_uncond": False}] for c, d in conds]


def test_a_real_controlnet_gives_each_tile_the_residuals_at_its_position(sd15, caplog):
    h, w = 16, 24  # tiles of 8 on an 8-aligned grid: every residual level lines up exactly
    hint = torch.rand(1, 3, h * 8, w * 8, generator=torch.Generator().manual_seed(3))
    control = _tiny_controlnet(sd15).copy().set_cond_hint(hint, 1.0)
    pos, neg = make_conds("sd15")
    pos, neg = _with_control(pos, control), _with_control(neg, control)

    full_controls = []

    def outer(executor, x, t, c_concat, c_crossattn, ctrl, to, **kw):  # before the tiling: the whole residuals
        full_controls.append(None if ctrl is None else {k: [r.clone() for r in v] for k, v in ctrl.items()})
        return executor(x, t, c_concat, c_crossattn, ctrl, to, **kw)

    base = sd15.clone()
    base.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_tiling_outer", outer)
    m, rec = recorded(tiled(base, mode=OVERLAPPING, overlap=0))
    with caplog.at_level(logging.WARNING):
        out = run_sampling(m, "sd15", steps=2, height=h, width=w, positive=pos, negative=neg)
    assert not [r for r in caplog.records if "could not be applied" in r.getMessage()]
    assert torch.isfinite(out).all()
    assert len(rec.calls) == 2 * 6 and len(full_controls) == 2
    for i, call in enumerate(rec.calls):
        full = full_controls[i // 6]
        (tile,), _, _ = call["tiles"]
        for key in ("input", "output", "middle"):
            for got, whole in zip(call["control"][key], full[key], strict=True):
                f = round(h / whole.shape[-2]) if whole.shape[-2] < h else 1
                f = 2 ** round(math.log2(f))
                want = whole[..., tile.y // f: tile.y // f + math.ceil(tile.h / f),
                             tile.x // f: tile.x // f + math.ceil(tile.w / f)]
                assert torch.equal(got, want), (key, tile, f)
    plain = run_sampling(tiled(sd15, mode=OVERLAPPING, overlap=0), "sd15", steps=2, height=h, width=w)
    assert not torch.allclose(out, plain)  # the residuals did something


def test_a_model_whose_latent_is_not_an_image_gets_a_clear_error():
    import comfy.latent_formats

    m = tiny_model("sd15", seed=5)  # its own model object: the shared fixtures stay untouched
    m.model.latent_format = comfy.latent_formats.Wan21()  # a video latent (3 spatial dimensions)
    with pytest.raises(ValueError, match=r"Tiled Diffusion \(Preprint\): .*3 spatial dimension"):
        tiled(m)


def test_regional_prompting_on_a_unet_follows_the_tiles(sd15):
    """UNet regional attention gives each tile its part of the frame's masks: a region covering the whole frame with
    the base prompt is tiled plain sampling bit for bit, a real region prompt changes the tiled result, and a region
    over one of two side-by-side tiles changes that tile only."""
    pos, neg = make_conds("sd15")
    other, _ = make_conds("sd15", seed=7)

    def regional(m, cond, mask):
        regions = run_node("PreprintRegion", conditioning=cond, mask=mask, strength=1.0, regions=None)[0]
        return run_node("PreprintRegionalPrompting", model=m, regions=regions, base_ratio=0.0, start_percent=0.0,
                        end_percent=1.0)[0]

    plain = run_sampling(tiled(sd15), "sd15", steps=2, height=H, width=W, positive=pos, negative=neg)
    full = regional(tiled(sd15), pos, torch.ones(1, H * 8, W * 8))
    assert torch.equal(run_sampling(full, "sd15", steps=2, height=H, width=W, positive=pos, negative=neg), plain)
    mask = torch.zeros(1, H * 8, W * 8)
    mask[:, :, : W * 4] = 1.0
    left = run_sampling(regional(tiled(sd15), other, mask), "sd15", steps=2, height=H, width=W, positive=pos,
                        negative=neg)
    assert not torch.equal(left, plain)
    # two side-by-side tiles without overlap, the region over the left one: the right tile never sees the region
    # (its half is tiled plain sampling bit for bit), the left one is all region (squeezing the frame's mask onto
    # each tile would give the right tile the mask's left half)
    halves = tiled(sd15, tile=W * 4, tile_height=H * 8, mode=OVERLAPPING, overlap=0)
    plain = run_sampling(halves, "sd15", steps=2, height=H, width=W, positive=pos, negative=neg)
    split = run_sampling(regional(halves, other, mask), "sd15", steps=2, height=H, width=W, positive=pos,
                         negative=neg)
    assert torch.equal(split[..., W // 2:], plain[..., W // 2:])
    assert not torch.equal(split[..., : W // 2], plain[..., : W // 2])


def test_regional_prompting_on_flux_follows_the_tiles(flux):
    """Flux regional masks are each tile's part of the frame's: with two side-by-side tiles and a region over the
    left one, the right tile is tiled plain sampling up to rounding (its image tokens never see the region text; the
    masked attention runs another kernel path) and the left one changes by far more."""
    pos, neg = make_conds("flux")
    other, _ = make_conds("flux", seed=7)
    mask = torch.zeros(1, H * 8, W * 8)
    mask[:, :, : W * 4] = 1.0
    regions = run_node("PreprintRegion", conditioning=other, mask=mask, strength=1.0, regions=None)[0]
    halves = tiled(flux, tile=W * 4, tile_height=H * 8, mode=OVERLAPPING, overlap=0)
    plain = run_sampling(halves, "flux", steps=2, height=H, width=W, positive=pos, negative=neg)
    m = run_node("PreprintRegionalPrompting", model=halves, regions=regions, base_ratio=0.0, start_percent=0.0,
                 end_percent=1.0)[0]
    split = run_sampling(m, "flux", steps=2, height=H, width=W, positive=pos, negative=neg)
    left = float((split[..., : W // 2] - plain[..., : W // 2]).abs().max())
    right = float((split[..., W // 2:] - plain[..., W // 2:]).abs().max())
    assert left > 0.01 * float(plain.abs().max()) and right < 1e-4 * left, (left, right)


def test_nodes_with_whole_frame_masks_are_refused_when_tiles_split_the_frame():
    """Regional Prompting on SD3 (its wrapper may run outside the tiling) or with regional LoRA places masks on the
    whole frame; tiles would get them squeezed, so a split frame is an error naming the node, whichever node is
    applied first, and a tile covering the whole image still runs."""
    base = tiny_model("sd3")
    pos, neg = make_conds("sd3")
    other, _ = make_conds("sd3", seed=7)
    mask = torch.zeros(1, H * 8, W * 8)
    mask[:, :, : W * 4] = 1.0
    regions = run_node("PreprintRegion", conditioning=other, mask=mask, strength=1.0, regions=None)[0]

    def regional(m):
        return run_node("PreprintRegionalPrompting", model=m, regions=regions, base_ratio=0.0, start_percent=0.0,
                        end_percent=1.0)[0]

    for m in (tiled(regional(base)), regional(tiled(base))):
        with pytest.raises(ValueError, match=r"^Tiled Diffusion \(Preprint\): Regional Prompting \(Preprint\) places "
                                             r"its masks on the whole frame"):
            run_sampling(m, "sd3", steps=2, height=H, width=W, positive=pos, negative=neg)
    whole = regional(tiled(base, tile=W * 8, tile_height=H * 8))
    assert torch.isfinite(run_sampling(whole, "sd3", steps=2, height=H, width=W, positive=pos, negative=neg)).all()
