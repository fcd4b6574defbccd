"""The Note that opens every example workflow (runner/workflow_builder.py, ``NOTES`` in workflows/specs/*.py): one
per editor file, clear of every node and link, sized for its text, absent from the API twin, and text that says
what the workflow shows, which widget to try first and which paper it comes from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from preprint.runner.workflow_builder import load_examples
from preprint.runner.workflow_format import NOTE_TITLE, NOTE_TYPE, WorkflowError, add_note
from preprint.runner.workflow_layout import (
    NOTE_LINE,
    NOTE_WIDTH,
    ORIGIN,
    Box,
    Link,
    body_height,
    crossings,
    layout,
    note_height,
    overlaps,
    place_note,
)

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows"
SPECS, NOTES = load_examples(WORKFLOWS_DIR)
EDITOR_FILES = sorted(WORKFLOWS_DIR.glob("*.json"))
NOTE_TYPES = ("Note", "MarkdownNote")
ARXIV = re.compile(r"\barXiv:\d{4}\.\d{4,5}\b")
CORE_GRAPH = "plain core graph"
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
TRY_FIRST = re.compile(r"\bTry (\w+)\b.*\bfirst\b")
HOW_TO_ADD = ("add NOTES = {title: text} beside WORKFLOWS in the spec file (see the docstring of "
              "runner/workflow_builder.py), then run `python -m preprint build-workflows`")


def sentences(text: str) -> list[str]:
    return [s for s in SENTENCE_BREAK.split(text.strip()) if s]


def widget_names(prompt: dict) -> set[str]:
    """Inputs of the graph's nodes set to a value (not a link): the widgets a user can turn."""
    return {name for node in prompt.values() for name, value in node.get("inputs", {}).items()
            if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str))}


def _boxes(wf: dict) -> tuple[dict[int, Box], list[Link]]:
    boxes = {n["id"]: Box(n["id"], 0, float(n["size"][0]), float(n["size"][1]), float(n["pos"][0]),
                          float(n["pos"][1])) for n in wf["nodes"]}
    return boxes, [Link(ln[1], ln[2], ln[3], ln[4]) for ln in wf["links"]]


# -- the texts -------------------------------------------------------------------------------------------------------
def test_every_example_workflow_has_a_note():
    assert SPECS
    missing = [title for title in SPECS if title not in NOTES]
    assert missing == [], f"workflows without a note: {missing}; {HOW_TO_ADD}"


@pytest.mark.parametrize("title", sorted(NOTES))
def test_note_says_what_to_try_first_and_names_the_paper(title):
    """Two to four sentences; one says "Try <widget> ... first" naming a widget of this graph; an arXiv id names the
    paper, or the note says the workflow is a plain core graph."""
    text = NOTES[title]
    parts = sentences(text)
    assert 2 <= len(parts) <= 4, f"{len(parts)} sentences: {parts}"
    tried = [m.group(1) for s in parts if (m := TRY_FIRST.search(s))]
    assert tried, "no sentence says 'Try <widget> first'"
    widgets = widget_names(SPECS[title])
    assert set(tried) & widgets, (f"'Try {tried[0]} first' names no widget the spec sets (it sets {sorted(widgets)}); "
                                  "set that widget in the spec, or name one it sets")
    assert ARXIV.search(text) or CORE_GRAPH in text, f"names no paper by arXiv id and is not a {CORE_GRAPH!r}"


def test_sentence_and_widget_checks_can_fail():
    """The reading of a note above rejects one sentence, five sentences, and a widget the graph does not have."""
    assert len(sentences("Only one sentence, arXiv:2403.17377.")) == 1
    assert len(sentences("One. Two. Three. Four. Five.")) == 5
    assert len(sentences("Paper: Ma et al., DeepCache, arXiv:2312.00858. Try cfg at 7.5 first.")) == 2
    assert TRY_FIRST.search("Try nonsense on the node first").group(1) == "nonsense"
    assert "nonsense" not in widget_names(SPECS[next(iter(SPECS))])


def test_a_note_for_a_missing_workflow_or_an_empty_note_is_refused(tmp_path):
    (tmp_path / "specs").mkdir()
    spec = tmp_path / "specs" / "family.py"
    spec.write_text("WORKFLOWS = {'A, SD1.5': {}}\nNOTES = {'A, SDXL': 'Text. More text.'}\n")
    with pytest.raises(WorkflowError, match="'A, SDXL'.*WORKFLOWS does not define"):
        load_examples(tmp_path)
    spec.write_text("WORKFLOWS = {'A, SD1.5': {}}\nNOTES = {'A, SD1.5': '  '}\n")
    with pytest.raises(WorkflowError, match="note for 'A, SD1.5' is empty"):
        load_examples(tmp_path)
    spec.write_text("WORKFLOWS = {'A, SD1.5': {}}\nNOTES = {'A, SD1.5': ' Text. '}\n")
    assert load_examples(tmp_path) == ({"A, SD1.5": {}}, {"A, SD1.5": "Text."})


# -- the written files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", EDITOR_FILES, ids=[p.stem for p in EDITOR_FILES])
def test_written_example_has_one_note_clear_of_the_graph(path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    notes = [n for n in wf["nodes"] if n["type"] in NOTE_TYPES]
    assert len(notes) == 1, f"{len(notes)} notes; {HOW_TO_ADD}"
    note = notes[0]
    assert note["type"] == NOTE_TYPE and note.get("title") == NOTE_TITLE
    assert note["inputs"] == [] and note["outputs"] == [] and note["mode"] == 0
    text = note["widgets_values"][0]
    assert note["widgets_values"] == [text] and text.strip()
    if path.stem in NOTES:
        assert text == NOTES[path.stem], "the note is not its spec's: rebuild with `python -m preprint build-workflows`"
    assert note["size"][1] >= note_height(text, note["size"][0])
    boxes, links = _boxes(wf)
    assert [pair for pair in overlaps(boxes) if note["id"] in pair] == []
    assert [ln for i, ln in crossings(boxes, links) if i == note["id"]] == []
    assert wf["last_node_id"] >= note["id"]


@pytest.mark.parametrize("path", EDITOR_FILES, ids=[p.stem for p in EDITOR_FILES])
def test_api_twin_has_no_note(path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    twin_text = (WORKFLOWS_DIR / "api" / path.name).read_text(encoding="utf-8")
    twin = json.loads(twin_text)
    assert not [nid for nid, n in twin.items() if n["class_type"] in NOTE_TYPES]
    for note in (n for n in wf["nodes"] if n["type"] in NOTE_TYPES):
        assert str(note["id"]) not in twin
        assert json.dumps(note["widgets_values"][0])[1:-1] not in twin_text


# -- placing a note --------------------------------------------------------------------------------------------------
def _laid_out() -> dict:
    """A text-to-image graph laid out by layout(), as an editor workflow."""
    cols = {1: 0, 4: 0, 2: 1, 3: 1, 7: 2, 8: 3, 9: 4}
    sizes = {1: (0, 3, 1), 4: (0, 1, 3), 2: (1, 1, 1), 3: (1, 1, 1), 7: (4, 1, 6), 8: (2, 1, 0), 9: (1, 0, 1)}
    boxes = {i: Box(i, c, 300.0, body_height(*sizes[i])) for i, c in cols.items()}
    links = [Link(1, 1, 2, 0), Link(1, 1, 3, 0), Link(1, 0, 7, 0), Link(2, 0, 7, 1), Link(3, 0, 7, 2),
             Link(4, 0, 7, 3), Link(7, 0, 8, 0), Link(1, 2, 8, 1), Link(8, 0, 9, 0)]
    assert layout(boxes, links) == []
    nodes = [{"id": b.id, "type": "X", "pos": [round(b.x), round(b.y)], "size": [b.width, b.height]}
             for b in boxes.values()]
    return {"last_node_id": 9, "nodes": nodes,
            "links": [[k + 1, ln.source, ln.source_slot, ln.target, ln.target_slot, "T"] for k, ln in enumerate(links)]}


def test_note_goes_top_left_and_the_graph_moves_right_unchanged():
    wf = _laid_out()
    out = add_note(wf, "Shows a plain graph. Try steps first: more is slower.")
    assert wf["last_node_id"] == 9 and len(wf["nodes"]) == 7  # the input is left as it was
    note = out["nodes"][-1]
    assert note["id"] == 10 == out["last_node_id"] and note["type"] == NOTE_TYPE and note["title"] == NOTE_TITLE
    assert note["widgets_values"] == ["Shows a plain graph. Try steps first: more is slower."]
    before = {n["id"]: n["pos"] for n in wf["nodes"]}
    after = {n["id"]: n["pos"] for n in out["nodes"][:-1]}
    shifts = {(after[i][0] - before[i][0], after[i][1] - before[i][1]) for i in before}
    assert len(shifts) == 1 and next(iter(shifts))[1] == 0  # one move, sideways: the layout itself is kept
    assert note["pos"] == [ORIGIN[0], min(p[1] for p in before.values())]  # level with the highest node
    assert all(note["pos"][0] + note["size"][0] < p[0] for p in after.values())  # left of every node
    boxes, links = _boxes(out)
    assert overlaps(boxes) == [] and crossings(boxes, links) == []
    assert out["links"] == wf["links"]


def test_note_is_as_tall_as_its_text():
    short = add_note(_laid_out(), "One line. Two.")["nodes"][-1]["size"]
    long = add_note(_laid_out(), "A longer note. " * 40)["nodes"][-1]["size"]
    assert short[0] == long[0] == NOTE_WIDTH
    assert long[1] > short[1] + 5 * NOTE_LINE
    assert note_height("x\ny\nz") == note_height("x") + 2 * NOTE_LINE  # each line break a line


def test_a_note_that_a_link_would_cross_is_refused():
    """The clearance is checked, not assumed: a long link into the top-left node from far below and to the right
    swings left past its end, over where the note goes."""
    def boxes() -> dict[int, Box]:
        return {1: Box(1, 0, 300.0, 100.0, ORIGIN[0], ORIGIN[1]), 2: Box(2, 1, 300.0, 100.0, 1500.0, 2400.0)}

    link = Link(2, 0, 1, 0)
    assert place_note(boxes(), [link], Box(3, 0, NOTE_WIDTH, 120.0)) == [(3, link)]
    assert place_note(boxes(), [], Box(3, 0, NOTE_WIDTH, 120.0)) == []
    wf = {"last_node_id": 2, "links": [[1, 2, 0, 1, 0, "T"]],
          "nodes": [{"id": b.id, "pos": [b.x, b.y], "size": [b.width, b.height]} for b in boxes().values()]}
    with pytest.raises(WorkflowError, match="would lie over or under"):
        add_note(wf, "Text. More text.")
    with pytest.raises(WorkflowError, match="needs some text"):
        add_note(_laid_out(), " ")
