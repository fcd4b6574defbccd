"""Lay an example workflow out for the editor: left to right in the order data flows, no link over a node.

Geometry as ComfyUI's editor (LiteGraph) draws a graph: a node's ``pos`` is the top-left corner of its body,
with a title bar of ``TITLE`` px above it; input slot ``k`` connects at the body's left edge and output slot
``k`` at its right edge, both at ``y = pos.y + (k + 0.7) * SLOT``; a link is a cubic Bezier curve from the
output to the input with horizontal tangents a quarter of the distance long.

:func:`layout` puts each node in the column of its depth (longest path from a source), or further right, up to
the column right before its first use (fewer links skip columns, and so can pass over nodes), orders every column
by the mean position of its neighbours (barycentre sweeps: fewer links cross each other), then places each
column's nodes top to bottom at the first height where neither the node nor its title bar meets a link that
passes through the column; the passes repeat until the positions settle. A placement with no link over a node
is then compacted (nodes moved up while it stays clean). Where no ordering gives a clean placement, nodes are
moved one at a time to the heights just above or below the links and nodes of their column (a descent, then an
annealed search) until none is left: a clean graph always beats a shorter one; a clean one too tall for the view
(:func:`fits_view`) gets a few more annealed searches for a shorter one. :func:`crossings` and :func:`overlaps`
are the checks the tests run on the written files. :func:`place_note` then puts a workflow's Note at the top
left, in a column of its own before the graph's first.
"""

from __future__ import annotations

import functools
import random
import textwrap
from dataclasses import dataclass

import numpy as np

TITLE = 30  # title bar above pos
SLOT = 20  # slot row height
WIDGET = 24  # one widget row
MULTILINE = 96  # a multiline text widget
PADDING = 14
WIDTH = 300
COLUMN_GAP = 70
ROW_GAP = 36
MARGIN = 8  # clearance a link keeps from a node it passes
ORIGIN = (40.0, 60.0)
RESTARTS = 40  # seeded shuffles of the column orders tried while crossings are left
REPAIRS = 3  # the least crossed placements that the node-by-node search starts from
ANNEAL_STEPS = 3000
SHORTEN_SEEDS = 8  # annealed searches from a clean placement too tall for the view
ANNEAL_OVER = 400.0  # px of height a link over a node costs inside the annealed search (it must end with none)
# The editor draws titles and widgets down to a zoom of 8 / 14 (setting LiteGraph.Canvas.MinFontSizeForLOD, 8 px, over
# its 14 px node text): a graph fits a 1600 x 1000 view when, fitted with a 40 px border, it needs no smaller zoom.
VIEW = (1600.0, 1000.0)
MIN_ZOOM = 8 / 14
VIEW_BORDER = 40.0
# A Note shows its text in the editor's textarea, in 10 px monospace (setting Comfy.TextareaWidget.FontSize). Measured
# in frontend 1.27 with Chromium: 6.0 px a character, 11.6 px a line, the textarea 20 px narrower and 22 px lower than
# the node body. Taken a little large, so that other monospace fonts fit unscrolled too.
NOTE_WIDTH = 420
NOTE_CHAR = 6.2
NOTE_LINE = 13
NOTE_PADDING = 30  # the textarea's inset in the node body, and a spare half line


@dataclass
class Box:
    id: int
    column: int
    width: float
    height: float  # body height, without the title bar
    x: float = 0.0
    y: float = 0.0

    def rect(self, margin: float = 0.0) -> tuple[float, float, float, float]:
        return (self.x - margin, self.y - TITLE - margin, self.x + self.width + margin, self.y + self.height + margin)


@dataclass(frozen=True)
class Link:
    source: int
    source_slot: int
    target: int
    target_slot: int


def body_height(inputs: int, outputs: int, widgets: int, multiline: int = 0) -> float:
    """Body height that holds the node's slot rows and its widgets (multiline text boxes taller)."""
    return max(inputs, outputs) * SLOT + (widgets - multiline) * WIDGET + multiline * MULTILINE + PADDING


def output_point(box: Box, slot: int) -> tuple[float, float]:
    return box.x + box.width, box.y + (slot + 0.7) * SLOT


def input_point(box: Box, slot: int) -> tuple[float, float]:
    return box.x, box.y + (slot + 0.7) * SLOT


@functools.lru_cache(maxsize=8)
def _bezier_weights(points: int) -> np.ndarray:
    t = np.arange(points + 1) / points
    return np.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t * t, t ** 3])  # [4, points + 1]


@functools.lru_cache(maxsize=1 << 16)  # the layout search asks for the same curves many times
def _curve_array(start: tuple[float, float], end: tuple[float, float], points: int = 64) -> np.ndarray:
    (x0, y0), (x3, y3) = start, end
    d = 0.25 * ((x3 - x0) ** 2 + (y3 - y0) ** 2) ** 0.5
    x1, y1, x2, y2 = x0 + d, y0, x3 - d, y3
    a, b, c, e = _bezier_weights(points)
    pts = np.stack([a * x0 + b * x1 + c * x2 + e * x3, a * y0 + b * y1 + c * y2 + e * y3], axis=1)
    pts.flags.writeable = False  # shared by the cache
    return pts


def curve(start: tuple[float, float], end: tuple[float, float], points: int = 64) -> list[tuple[float, float]]:
    """Points along the editor's link curve from ``start`` (an output) to ``end`` (an input)."""
    return [tuple(p) for p in _curve_array(start, end, points).tolist()]


def _ends(boxes: dict[int, Box], link: Link) -> tuple[tuple[float, float], tuple[float, float]]:
    return output_point(boxes[link.source], link.source_slot), input_point(boxes[link.target], link.target_slot)


def link_curve(boxes: dict[int, Box], link: Link) -> list[tuple[float, float]]:
    return curve(*_ends(boxes, link))


def _link_points(boxes: dict[int, Box], links: list[Link]) -> np.ndarray:
    """Every link's curve, ``[links, points, 2]``."""
    return np.stack([_curve_array(*_ends(boxes, ln)) for ln in links])


def crossings(boxes: dict[int, Box], links: list[Link], margin: float = 0.0) -> list[tuple[int, Link]]:
    """Every (node, link) where the link's curve passes over a node (title bar included) other than its ends."""
    if not links or not boxes:
        return []
    ids = list(boxes)
    rects = np.array([boxes[i].rect(margin) for i in ids])  # [B, 4]
    pts = _link_points(boxes, links)  # [L, P, 2]
    x, y = pts[:, None, :, 0], pts[:, None, :, 1]
    r = rects[None, :, :, None]
    hit = ((r[:, :, 0] <= x) & (x <= r[:, :, 2]) & (r[:, :, 1] <= y) & (y <= r[:, :, 3])).any(axis=2)  # [L, B]
    ends = np.array([[i in (ln.source, ln.target) for i in ids] for ln in links])
    return [(ids[b], links[k]) for k, b in zip(*np.nonzero(hit & ~ends), strict=True)]


def overlaps(boxes: dict[int, Box]) -> list[tuple[int, int]]:
    """Pairs of nodes whose rectangles (title bars included) intersect."""
    items = sorted(boxes.values(), key=lambda b: b.id)
    out = []
    for i, a in enumerate(items):
        ax0, ay0, ax1, ay1 = a.rect()
        for b in items[i + 1:]:
            bx0, by0, bx1, by1 = b.rect()
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                out.append((a.id, b.id))
    return out


def _order_columns(boxes: dict[int, Box], links: list[Link], sweeps: int = 4) -> dict[int, list[int]]:
    columns: dict[int, list[int]] = {}
    for b in sorted(boxes.values(), key=lambda b: (b.column, b.id)):
        columns.setdefault(b.column, []).append(b.id)
    parents: dict[int, list[int]] = {i: [] for i in boxes}
    children: dict[int, list[int]] = {i: [] for i in boxes}
    for ln in links:
        parents[ln.target].append(ln.source)
        children[ln.source].append(ln.target)
    for sweep in range(sweeps):
        rank = {i: k / max(1, len(col) - 1) for col in columns.values() for k, i in enumerate(col)}
        near = parents if sweep % 2 == 0 else children
        for c in sorted(columns, reverse=sweep % 2 == 1):
            columns[c].sort(key=lambda i, near=near, rank=rank: (sum(rank[j] for j in near[i]) / len(near[i])
                                                                 if near[i] else rank[i]))
    return columns


def _bands(boxes: dict[int, Box], links: list[Link], x0: float, x1: float) -> list[tuple[float, float, Link]]:
    """Heights that links occupy between ``x0`` and ``x1`` (a column's span): the links passing through it, and
    the ends of links into it, whose curves can swing past the column's left edge."""
    if not links:
        return []
    pts = _link_points(boxes, links)  # [L, P, 2]
    inside = (pts[:, :, 0] >= x0 - MARGIN) & (pts[:, :, 0] <= x1 + MARGIN)
    lo = np.where(inside, pts[:, :, 1], np.inf).min(axis=1)
    hi = np.where(inside, pts[:, :, 1], -np.inf).max(axis=1)
    through = inside.any(axis=1).tolist()
    return [(float(lo[k]) - MARGIN, float(hi[k]) + MARGIN, ln) for k, ln in enumerate(links) if through[k]]


def _wanted(boxes: dict[int, Box], links: list[Link], i: int) -> float:
    """The height that lines a node's input slots up with the outputs feeding them (on average)."""
    ins = [ln for ln in links if ln.target == i]
    if not ins:
        return ORIGIN[1]
    heights = [output_point(boxes[ln.source], ln.source_slot)[1] - (ln.target_slot + 0.7) * SLOT for ln in ins]
    return sum(heights) / len(heights)


def _place_column(boxes: dict[int, Box], links: list[Link], order: list[int],
                  bands: list[tuple[float, float, Link]], align: bool) -> bool:
    """Top to bottom, each node at the first height clear of the bands, from right below the node above or (with
    ``align``) from where it lines up with its inputs; whether any node moved."""
    moved, top = False, ORIGIN[1]
    for i in order:
        b = boxes[i]
        y = max(top, _wanted(boxes, links, i)) if align else top
        mine = [(lo, hi) for lo, hi, ln in bands if i not in (ln.source, ln.target)]
        while True:
            hit = [hi for lo, hi in mine if y - TITLE < hi and lo < y + b.height]
            if not hit:
                break
            y = max(hit) + TITLE + 1.0
        moved |= abs(b.y - y) > 0.5
        b.y = y
        top = y + b.height + ROW_GAP + TITLE
    return moved


def layout(boxes: dict[int, Box], links: list[Link]) -> list[tuple[int, Link]]:
    """Place ``boxes`` (their ``column`` set) in place: the fewest links over a node (none unless the search
    fails), then the least height; returns the crossings left (none when it succeeded)."""
    # every node right before its first use (a loader, an empty latent, the prompt of a later region): the links
    # that skip columns, and so can pass over nodes, are the fewest; from the last column back
    for b in sorted(boxes.values(), key=lambda b: -b.column):
        uses = [boxes[ln.target].column for ln in links if ln.source == b.id]
        if uses:
            b.column = max(b.column, min(uses) - 1)
    if not boxes:
        return []
    best, crossed = None, []
    tries = [(sweeps, align, None) for sweeps in (4, 2, 1, 0) for align in (False, True)]
    tries += [(0, align, seed) for seed in range(RESTARTS) for align in (False, True)]
    for sweeps, align, seed in tries:
        if seed is not None and best[0][0] == 0:
            break  # shuffled orders only while crossings are left
        left = _layout(boxes, links, sweeps, align, seed)
        if left:
            crossed.append(((len(left), _height(boxes)), _positions(boxes)))
        else:
            _compact(boxes, links)
        best = _better(best, boxes, links)
    if best[0][0]:  # no ordering was clean: search node by node from the least crossed placements
        for _, start in sorted(crossed, key=lambda c: c[0])[:REPAIRS]:
            _restore(boxes, start)
            if _descend(boxes, links):
                _anneal(boxes, links)
            if not crossings(boxes, links):
                _compact(boxes, links)
            best = _better(best, boxes, links)
    _restore(boxes, best[1])
    for seed in range(SHORTEN_SEEDS):  # clean but too tall for the view: look for a shorter clean placement
        if best[0][0] or _fits_height(best[0][1]):
            break
        _anneal(boxes, links, seed)
        if not crossings(boxes, links):
            _compact(boxes, links)
            best = _better(best, boxes, links)
        _restore(boxes, best[1])
    return crossings(boxes, links)


def _positions(boxes: dict[int, Box]) -> dict[int, tuple[float, float]]:
    return {i: (b.x, b.y) for i, b in boxes.items()}


def _restore(boxes: dict[int, Box], positions: dict[int, tuple[float, float]]) -> None:
    for i, (x, y) in positions.items():
        boxes[i].x, boxes[i].y = x, y


def _better(best, boxes: dict[int, Box], links: list[Link]):
    """``best`` or the placement ``boxes`` now have, whichever has fewer crossings, then less height."""
    key = (len(crossings(boxes, links)), _height(boxes))
    return (key, _positions(boxes)) if best is None or key < best[0] else best


def _height(boxes: dict[int, Box]) -> float:
    return max(b.y + b.height for b in boxes.values()) - min(b.y - TITLE for b in boxes.values())


def extent(boxes: dict[int, Box]) -> tuple[float, float]:
    """Width and height of the graph's bounding box, title bars included."""
    return max(b.x + b.width for b in boxes.values()) - min(b.x for b in boxes.values()), _height(boxes)


def fits_view(boxes: dict[int, Box]) -> bool:
    """Whether the graph, fitted to a ``VIEW``-sized editor, is drawn in full detail (zoom >= ``MIN_ZOOM``)."""
    width, height = extent(boxes)
    return (width + 2 * VIEW_BORDER) * MIN_ZOOM <= VIEW[0] and _fits_height(height)


def _fits_height(height: float) -> bool:
    return (height + 2 * VIEW_BORDER) * MIN_ZOOM <= VIEW[1]


def _clashes(boxes: dict[int, Box], i: int) -> bool:
    """Whether node ``i`` overlaps another node."""
    x0, y0, x1, y1 = boxes[i].rect()
    for j, o in boxes.items():
        if j != i:
            a0, b0, a1, b1 = o.rect()
            if x0 < a1 and a0 < x1 and y0 < b1 and b0 < y1:
                return True
    return False


def _heights(boxes: dict[int, Box], links: list[Link], i: int) -> list[float]:
    """Heights worth trying for node ``i``: the top, lined up with its inputs, right above or below each node of
    its column and each band of links through it."""
    b = boxes[i]
    out = {ORIGIN[1], _wanted(boxes, links, i)}
    x0, x1 = b.x, b.x + b.width
    for j, o in boxes.items():
        if j != i and o.x < x1 and x0 < o.x + o.width:
            out.update((o.y + o.height + ROW_GAP + TITLE, o.y - TITLE - ROW_GAP - b.height))
    for lo, hi, _ in _bands(boxes, [ln for ln in links if i not in (ln.source, ln.target)], x0, x1):
        out.update((hi + TITLE + 1.0, lo - b.height - 1.0))
    return sorted(y for y in out if y >= ORIGIN[1])


def _compact(boxes: dict[int, Box], links: list[Link], rounds: int = 8) -> None:
    """Move nodes of a clean placement up, each to the highest of its :func:`_heights` that keeps it clean."""
    for _ in range(rounds):
        moved = False
        for i in sorted(boxes, key=lambda i: boxes[i].y):
            b = boxes[i]
            y0 = b.y
            for y in _heights(boxes, links, i):
                if y >= y0 - 0.5:
                    break
                b.y = y
                if not _clashes(boxes, i) and not crossings(boxes, links):
                    moved = True
                    break
                b.y = y0
        if not moved:
            break


def _descend(boxes: dict[int, Box], links: list[Link], rounds: int = 6) -> bool:
    """Move one node at a time to the height that most lowers (crossings, height); whether crossings are left."""
    now = (len(crossings(boxes, links)), _height(boxes))
    for _ in range(rounds):
        moved = False
        for i in sorted(boxes, key=lambda i: boxes[i].y):
            b = boxes[i]
            chosen = b.y
            for y in _heights(boxes, links, i):
                b.y = y
                if _clashes(boxes, i):
                    continue
                key = (len(crossings(boxes, links)), _height(boxes))
                if key < now:
                    now, chosen, moved = key, y, True
            b.y = chosen
        if not moved or now[0] == 0:
            break
    return now[0] > 0


def _anneal(boxes: dict[int, Box], links: list[Link], seed: int = 0, heat: float = 300.0) -> None:
    """Simulated annealing over the nodes' heights (moves to their :func:`_heights`), which can cross the ridges
    a descent cannot (a node moved over a link that only clears once a second node moves too); keeps the best
    overlap-free placement seen."""
    rng = random.Random(seed)

    def cost() -> float:
        return len(crossings(boxes, links)) * ANNEAL_OVER + len(overlaps(boxes)) * 2 * ANNEAL_OVER + _height(boxes)

    now = cost()
    best = (now if not overlaps(boxes) else float("inf"), {i: b.y for i, b in boxes.items()})
    ids = sorted(boxes)
    for step in range(ANNEAL_STEPS):
        temperature = heat * (1 - step / ANNEAL_STEPS) + 1.0
        b = boxes[rng.choice(ids)]
        y0 = b.y
        b.y = rng.choice(_heights(boxes, links, b.id))
        new = cost()
        if new <= now or rng.random() < np.exp((now - new) / temperature):
            now = new
            if now < best[0] and not overlaps(boxes):
                best = (now, {i: b.y for i, b in boxes.items()})
        else:
            b.y = y0
    for i, y in best[1].items():
        boxes[i].y = y


def _layout(boxes: dict[int, Box], links: list[Link], sweeps: int, align: bool, seed: int | None,
            passes: int = 30) -> list[tuple[int, Link]]:
    columns = _order_columns(boxes, links, sweeps)
    if seed is not None:  # a seeded shuffle of every column's order
        rng = random.Random(seed)
        for order in columns.values():
            rng.shuffle(order)
    x = ORIGIN[0]
    spans = {}
    for c in sorted(columns):
        width = max(boxes[i].width for i in columns[c])
        for i in columns[c]:
            boxes[i].x = x
        spans[c] = (x, x + width)
        x += width + COLUMN_GAP
    for c in sorted(columns):
        _place_column(boxes, links, columns[c], [], align)

    def score() -> float:
        return len(crossings(boxes, links)) * ANNEAL_OVER + max(b.y + b.height for b in boxes.values())

    best = (score(), {i: b.y for i, b in boxes.items()})
    for _ in range(passes):  # the bands move with the nodes: repeat, keep the best placement seen
        moved = False
        for c in sorted(columns):
            moved |= _place_column(boxes, links, columns[c], _bands(boxes, links, *spans[c]), align)
        now = score()
        if now < best[0]:
            best = (now, {i: b.y for i, b in boxes.items()})
        if not moved:
            break
    for i, y in best[1].items():
        boxes[i].y = y
    return crossings(boxes, links)


def note_height(text: str, width: float = NOTE_WIDTH) -> float:
    """Body height of a Note ``width`` px wide that shows ``text`` whole: its lines as the textarea wraps them."""
    per_line = max(1, int((width - NOTE_PADDING) / NOTE_CHAR))
    lines = sum(max(1, len(textwrap.wrap(p, per_line))) for p in text.split("\n"))
    return lines * NOTE_LINE + NOTE_PADDING


def place_note(boxes: dict[int, Box], links: list[Link], note: Box) -> list[tuple[int, int] | tuple[int, Link]]:
    """Put ``note`` at the graph's top left, level with its highest node, and move every node right by the note's
    width and a column gap. Nothing can reach it there: in a graph :func:`layout` placed, no link ends in the first
    column (its nodes have no inputs), and a link's curve swings past its ends by at most 0.29 of its tangent
    length, far less than the first column's width. Returns what the note still overlaps or lies under (checked,
    not assumed; empty when it is clear); ``note`` is added to ``boxes``."""
    if note.id in boxes:
        raise ValueError(f"node id {note.id} is taken; a note needs an id of its own")
    if boxes:
        dx = ORIGIN[0] + note.width + COLUMN_GAP - min(b.x for b in boxes.values())
        for b in boxes.values():
            b.x += dx
        note.y = min(b.y for b in boxes.values())
    else:
        note.y = ORIGIN[1]
    note.x = ORIGIN[0]
    boxes[note.id] = note
    return ([pair for pair in overlaps(boxes) if note.id in pair]
            + [(i, ln) for i, ln in crossings(boxes, links) if i == note.id])
