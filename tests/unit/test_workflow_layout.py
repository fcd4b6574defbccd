"""Example workflow layout (runner/workflow_layout.py): the editor's link geometry, the crossing and overlap
checks, the layout of small graphs, and the written example files (data flows left to right, no node on top
of another, no link over a node, and the graph fits a 1600 x 1000 view wherever its width allows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preprint.runner.workflow_layout import (
    SLOT,
    TITLE,
    VIEW,
    Box,
    Link,
    body_height,
    crossings,
    curve,
    extent,
    fits_view,
    input_point,
    layout,
    output_point,
    overlaps,
)

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))


def test_link_curve_leaves_and_enters_horizontally_and_eases_between_heights():
    """LiteGraph's link: a cubic Bezier with horizontal tangents a quarter of the distance long, so its height
    follows 3t^2 - 2t^3 from the output's to the input's."""
    pts = curve((0.0, 0.0), (400.0, 300.0), points=100)
    assert pts[0] == (0.0, 0.0) and pts[-1] == pytest.approx((400.0, 300.0))
    assert pts[1][1] == pytest.approx(300.0 * (3 * 0.01 ** 2 - 2 * 0.01 ** 3))  # flat start
    assert pts[50][1] == pytest.approx(150.0)
    d = 0.25 * 500.0  # a quarter of the 400 x 300 distance
    assert pts[50][0] == pytest.approx(0.125 * 0 + 0.375 * d + 0.375 * (400 - d) + 0.125 * 400)
    ys = [y for _, y in pts]
    assert ys == sorted(ys)


def test_slots_sit_on_the_body_edges_in_rows():
    b = Box(1, 0, 300.0, 100.0, x=50.0, y=200.0)
    assert output_point(b, 2) == (350.0, 200.0 + 2.7 * SLOT)
    assert input_point(b, 0) == (50.0, 200.0 + 0.7 * SLOT)
    assert b.rect() == (50.0, 200.0 - TITLE, 350.0, 300.0)


def test_crossings_find_a_link_over_a_node_and_only_then():
    """A link from column 0 to column 2 at one height passes over a node of column 1 at that height (its title
    bar counts), not over one moved below it, and never 'crosses' its own ends."""
    a, c = Box(1, 0, 100.0, 60.0, 0.0, 100.0), Box(3, 2, 100.0, 60.0, 400.0, 100.0)
    link = Link(1, 0, 3, 0)
    for y, expected in ((100.0, [(2, link)]), (125.0, [(2, link)]), (100.0 + 14 + TITLE + 1, [])):
        b = Box(2, 1, 100.0, 60.0, 200.0, y)
        assert crossings({1: a, 2: b, 3: c}, [link]) == expected, y
    b_title_only = Box(2, 1, 100.0, 60.0, 200.0, 100.0 + 14 + TITLE - 2)  # the link grazes the title bar
    assert crossings({1: a, 2: b_title_only, 3: c}, [link]) == [(2, link)]


def test_overlaps_count_title_bars():
    a = Box(1, 0, 100.0, 50.0, 0.0, 100.0)
    assert overlaps({1: a, 2: Box(2, 0, 100.0, 50.0, 50.0, 170.0)}) == [(1, 2)]  # its title bar reaches a
    assert overlaps({1: a, 2: Box(2, 0, 100.0, 50.0, 50.0, 181.0)}) == []
    assert overlaps({1: a, 2: Box(2, 0, 100.0, 50.0, 101.0, 100.0)}) == []


def test_body_height_holds_slots_and_widgets():
    assert body_height(2, 1, 3) == 2 * SLOT + 3 * 24 + 14
    assert body_height(1, 4, 2, multiline=1) == 4 * SLOT + 24 + 96 + 14


def _graph():
    """Loader -> two prompts -> sampler <- latent; loader's model to the sampler; sampler -> decode <- loader's
    VAE -> save: the usual text-to-image graph, with links that skip columns."""
    cols = {1: 0, 4: 0, 2: 1, 3: 1, 7: 2, 8: 3, 9: 4}
    sizes = {1: (0, 3, 1), 4: (0, 1, 3), 2: (1, 1, 1), 3: (1, 1, 1), 7: (4, 1, 6), 8: (2, 1, 0), 9: (1, 0, 1)}
    boxes = {i: Box(i, c, 300.0, body_height(*sizes[i])) for i, c in cols.items()}
    links = [Link(1, 1, 2, 0), Link(1, 1, 3, 0), Link(1, 0, 7, 0), Link(2, 0, 7, 1), Link(3, 0, 7, 2),
             Link(4, 0, 7, 3), Link(7, 0, 8, 0), Link(1, 2, 8, 1), Link(8, 0, 9, 0)]
    return boxes, links


def test_layout_of_a_text_to_image_graph_is_clean():
    boxes, links = _graph()
    left = layout(boxes, links)
    assert left == [] and crossings(boxes, links) == [] and overlaps(boxes) == []
    for ln in links:  # data flows left to right
        assert boxes[ln.source].x + boxes[ln.source].width < boxes[ln.target].x
    assert boxes[4].column == 1  # the empty latent sits right before its only use, not at the far left
    assert max(b.y + b.height for b in boxes.values()) < 1000


def test_layout_is_deterministic():
    a, links = _graph()
    b, _ = _graph()
    layout(a, links)
    layout(b, links)
    assert {i: (x.x, x.y) for i, x in a.items()} == {i: (x.x, x.y) for i, x in b.items()}


def _written(path: Path) -> tuple[dict[int, Box], list[Link]]:
    wf = json.loads(path.read_text(encoding="utf-8"))
    boxes = {n["id"]: Box(n["id"], 0, float(n["size"][0]), float(n["size"][1]), float(n["pos"][0]),
                          float(n["pos"][1])) for n in wf["nodes"]}
    return boxes, [Link(ln[1], ln[2], ln[3], ln[4]) for ln in wf["links"]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_flows_left_to_right_without_overlapping_nodes(path):
    boxes, links = _written(path)
    assert overlaps(boxes) == []
    for ln in links:
        assert boxes[ln.source].x + boxes[ln.source].width < boxes[ln.target].x, ln
    assert max(b.y + b.height for b in boxes.values()) - min(b.y - TITLE for b in boxes.values()) < 2000


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_has_no_link_over_a_node(path):
    boxes, links = _written(path)
    assert crossings(boxes, links) == []


def test_examples_fit_the_view_where_their_width_allows():
    """A graph fits a 1600 x 1000 view when the editor, fitted to it, still draws titles and widgets (zoom 8/14 or
    more); one too wide for that (seven columns or more, with the note's) may be taller too, every other one fits."""
    assert WORKFLOWS
    unfit = []
    for p in WORKFLOWS:
        boxes, _ = _written(p)
        width, _ = extent(boxes)
        if (width + 80) * 8 / 14 <= VIEW[0] and not fits_view(boxes):
            unfit.append((p.stem, extent(boxes)))
    assert unfit == []


def test_fits_view_is_the_editors_full_detail_zoom():
    """1600 / (8/14) = 2800 px across and 1000 / (8/14) = 1750 px down, less a 40 px border each side."""
    def graph(width, height):
        return {1: Box(1, 0, width, height - TITLE, 0.0, TITLE)}

    assert fits_view(graph(2720.0, 1670.0))
    assert not fits_view(graph(2721.0, 1670.0)) and not fits_view(graph(2720.0, 1671.0))


def test_the_checks_on_a_written_example_catch_a_link_over_a_node():
    """The file check above fails when one node of a clean example is moved onto a link's path."""
    path = next(p for p in WORKFLOWS if p.stem.startswith("GITS schedule in the stock KSampler"))
    boxes, links = _written(path)
    assert crossings(boxes, links) == []
    long = next(ln for ln in links if boxes[ln.target].x - boxes[ln.source].x > 500)  # spans a column
    (x0, y0), (x1, y1) = output_point(boxes[long.source], long.source_slot), input_point(boxes[long.target],
                                                                                         long.target_slot)
    other = next(b for b in boxes.values() if x0 < b.x < x1 and b.id not in (long.source, long.target))
    other.y = (y0 + y1) / 2 - other.height / 2
    assert (other.id, long) in crossings(boxes, links)


def _sampler_graph():
    """Checkpoint -> two prompts; a latent; a schedule node (tall) taking the model, both prompts and the latent; a
    sampler taking the schedule's sigmas, both prompts and the latent; decode (the checkpoint's VAE) and save. The
    three links from the prompts and the latent to the sampler pass the schedule node's column: no column order
    the barycentre passes try leaves them clear (the example 'GITS schedule in the stock KSampler')."""
    cols = {1: 0, 2: 1, 3: 1, 4: 0, 6: 2, 7: 3, 8: 4, 9: 5}
    heights = {1: 98.0, 2: 130.0, 3: 130.0, 4: 106.0, 6: 358.0, 7: 262.0, 8: 54.0, 9: 58.0}
    boxes = {i: Box(i, c, 300.0, heights[i]) for i, c in cols.items()}
    links = [Link(1, 1, 2, 0), Link(1, 1, 3, 0), Link(1, 0, 6, 0), Link(2, 0, 6, 1), Link(3, 0, 6, 2),
             Link(4, 0, 6, 3), Link(6, 1, 7, 0), Link(2, 0, 7, 1), Link(3, 0, 7, 2), Link(4, 0, 7, 3),
             Link(7, 0, 8, 0), Link(1, 2, 8, 1), Link(8, 0, 9, 0)]
    return boxes, links


def test_layout_clears_a_graph_whose_column_orders_all_leave_crossings():
    boxes, links = _sampler_graph()
    assert layout(boxes, links) == []
    assert crossings(boxes, links) == [] and overlaps(boxes) == []
    for ln in links:
        assert boxes[ln.source].x + boxes[ln.source].width < boxes[ln.target].x
    assert fits_view(boxes)
