"""Edges of the layer lists of perturbation guidance (``guidance/pag_layers.py``) that the main PAG tests leave
open: the model-free syntax check the editor runs, range bounds at the exact ends, head and transformer-index
bounds checked on the last (largest) index, the compact description of the valid layers, the layer count, and
the per-family defaults on small or partial models."""

from __future__ import annotations

import dataclasses

import pytest

from preprint.guidance.pag_layers import (
    AttentionLayout,
    BlockInfo,
    LayerSpecError,
    check_syntax,
    default_spec,
    parse_and_resolve,
)

SD15 = AttentionLayout("unet", {
    "input": {i: BlockInfo(1, 8) for i in (1, 2, 4, 5, 7, 8)}, "middle": {0: BlockInfo(1, 8)},
    "output": {i: BlockInfo(1, 8) for i in range(3, 12)}}, {"input": 12, "middle": 1, "output": 12})
SDXL = AttentionLayout("unet", {
    "input": {4: BlockInfo(2, 10), 5: BlockInfo(2, 10), 7: BlockInfo(10, 20), 8: BlockInfo(10, 20)},
    "middle": {0: BlockInfo(10, 20)}, "output": {i: BlockInfo(10 if i < 3 else 2, 20) for i in range(6)}},
    {"input": 9, "middle": 1, "output": 9})


def mmdit(n: int) -> AttentionLayout:
    return AttentionLayout("mmdit", {"joint": {i: BlockInfo(1, 24) for i in range(n)}}, {"joint": n})


def flux(nd: int, ns: int, drop: str | None = None) -> AttentionLayout:
    """A Flux-style layout; ``drop`` leaves a group out entirely (as if the model had none of its blocks)."""
    blocks = {"double": {i: BlockInfo(1, 24) for i in range(nd)}, "single": {i: BlockInfo(1, 24) for i in range(ns)}}
    extent = {"double": nd, "single": ns}
    if drop:
        del blocks[drop], extent[drop]
    return AttentionLayout("flux", blocks, extent)


# ------------------------------------------------------------------------------------------------ syntax check


@pytest.mark.parametrize("spec", ["", " ", "middle:0", "input:4-8.0-1[0,2-3], output:*", "double:*, single:3-5",
                                  "joint:13[0]", "Middle : 0"])
def test_syntax_accepts_well_formed_lists(spec):
    assert check_syntax(spec) is None


@pytest.mark.parametrize(("spec", "message"), [
    ("joint 3", "cannot read 'joint3'"),
    ("middle:0, fancy:1", "no model has a layer group 'fancy'"),
    ("joint:5-3", "runs backwards"),
    ("middle:0.3-1", "inner range '3-1'"),
    ("joint:1[3-1]", "head range '3-1'"),
    ("joint:1[,2]", "empty head number"),
])
def test_syntax_rejects_with_the_reason(spec, message):
    with pytest.raises(LayerSpecError, match=message.replace("[", r"\[")):
        check_syntax(spec)


# ------------------------------------------------------------------------------------------------ bounds


def test_a_range_of_one_block():
    assert parse_and_resolve("joint:3-3", mmdit(24)) == {("joint", 3, None): None}
    assert parse_and_resolve("middle:0.2-2", SDXL) == {("middle", 0, 2): None}


def test_range_ending_one_past_the_last_block_is_refused():
    """output:10-12 on SD1.5 (blocks 0-11) is refused, not cut to the blocks that exist."""
    with pytest.raises(LayerSpecError, match="numbered 0-11"):
        parse_and_resolve("output:10-12", SD15)
    assert sorted(parse_and_resolve("output:10-11", SD15)) == [("output", 10, 0), ("output", 11, 0)]


def test_heads_and_inner_indices_are_checked_on_the_largest():
    with pytest.raises(LayerSpecError, match="head 24 does not exist"):
        parse_and_resolve("joint:3[0,24]", mmdit(24))
    with pytest.raises(LayerSpecError, match="transformer indices 0-9"):
        parse_and_resolve("middle:0.5-10", SDXL)
    assert parse_and_resolve("joint:3[0,23]", mmdit(24)) == {("joint", 3, None): (0, 23)}


# ------------------------------------------------------------------------------------------------ description, count


def test_description_ends_runs_at_gaps():
    layout = AttentionLayout("unet", {"output": {0: BlockInfo(1, 4), 1: BlockInfo(1, 4), 3: BlockInfo(1, 4)}},
                             {"input": 1, "middle": 1, "output": 4})
    assert layout.describe() == "output:0-1,3 (heads per layer: 4)"
    assert SDXL.describe().startswith("input:4-5(.0-1),7-8(.0-9)")


def test_layer_count():
    assert SD15.layer_count == 16
    assert SDXL.layer_count == 70  # SDXL's 70 transformer blocks
    assert flux(19, 38).layer_count == 57


def test_layouts_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SD15.family = "flux"
    with pytest.raises(dataclasses.FrozenInstanceError):
        BlockInfo(1, 8).heads = 4


# ------------------------------------------------------------------------------------------------ defaults


def test_unet_default_without_middle_attention():
    no_middle = AttentionLayout("unet", {"input": {1: BlockInfo(1, 8)}, "output": {5: BlockInfo(1, 8),
                                                                                   3: BlockInfo(1, 8)}},
                                {"input": 4, "middle": 1, "output": 6})
    assert default_spec(no_middle) == "output:3"  # the deepest output block with attention
    empty_middle = AttentionLayout("unet", {**no_middle.blocks, "middle": {}}, no_middle.extent)
    assert default_spec(empty_middle) == "output:3"
    only_input = AttentionLayout("unet", {"input": {1: BlockInfo(1, 8)}}, {"input": 4, "middle": 1, "output": 6})
    # no middle or output attention: the default names the output group, whose error lists the valid layers
    with pytest.raises(LayerSpecError, match="no self-attention in its output blocks. Valid layers: input:1"):
        parse_and_resolve(default_spec(only_input), only_input)


@pytest.mark.parametrize(("n", "block"), [(1, 0), (2, 1), (3, 2), (10, 5), (24, 13), (38, 21)])
def test_mmdit_default_is_at_13_of_24_and_exists(n, block):
    assert default_spec(mmdit(n)) == f"joint:{block}"
    assert parse_and_resolve(default_spec(mmdit(n)), mmdit(n))


@pytest.mark.parametrize(("layout", "spec"), [
    (flux(19, 38), "single:9"), (flux(2, 2), "single:0"), (flux(3, 1), "double:2"),
    (flux(0, 9, drop="double"), "single:4"), (flux(0, 10, drop="double"), "single:5"),
    (flux(19, 0, drop="single"), "double:9"), (flux(18, 0, drop="single"), "double:9"),
])
def test_flux_default_is_the_middle_of_the_whole_stack(layout, spec):
    """A group the model does not have counts as zero blocks."""
    assert default_spec(layout) == spec
    assert parse_and_resolve(spec, layout)
