"""Every example workflow in ComfyUI's web editor, loaded the way a user loads it."""

from __future__ import annotations

import os
import time

import pytest

from preprint.runner.comfy_host import PACK_DIR

from .editor import dialog_texts, fit_and_screenshot, graph_state, load_by_drop, load_from_templates, load_json
from .editor import problems as graph_problems

WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))
# the examples that run on the pack's own models (the others need checkpoints a test machine does not have)
RUNNABLE = [p for p in WORKFLOWS if not any(n["type"] in ("CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader")
                                             for n in load_json(p)["nodes"])]
# set: write one PNG per example as the editor draws it to docs/workflows/ and its thumbnail for the Templates
# browser beside the workflow (bash scripts/screenshots.sh)
SCREENSHOTS = os.environ.get("PREPRINT_SCREENSHOTS") == "1"


def test_there_are_examples_to_load():
    print(f"browser tier: {len(WORKFLOWS)} example workflows, {len(RUNNABLE)} runnable on the pack's own models")
    assert len(WORKFLOWS) >= 40 and len(RUNNABLE) >= 5


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_loads_from_its_file_as_saved(editor, path):
    """Dropped on the editor: no missing-node dialog, every node a known type with the file's widget values,
    every link in place, and no error from this pack in the browser."""
    page, log = editor
    workflow = load_json(path)
    load_by_drop(page, workflow)
    assert graph_problems(workflow, graph_state(page), dialog_texts(page)) == []
    assert log.ours() == []
    if SCREENSHOTS:
        docs = PACK_DIR / "docs" / "workflows"
        docs.mkdir(parents=True, exist_ok=True)
        fit_and_screenshot(page, docs / f"{path.stem}.png", path.with_suffix(".jpg"))


def test_a_broken_workflow_is_caught(editor):
    """The check above sees what a user would: an unknown node type and a widget value the file does not hold."""
    page, _ = editor
    workflow = load_json(PACK_DIR / "workflows" / "Tiny test model smoke test (untrained).json")
    workflow["nodes"][0]["type"] = "PreprintNoSuchNode"
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    load_by_drop(page, workflow)
    found = graph_problems(workflow, graph_state(page), dialog_texts(page))
    assert any("PreprintNoSuchNode" in p for p in found), found
    page.keyboard.press("Escape")
    intact = load_json(PACK_DIR / "workflows" / "Tiny test model smoke test (untrained).json")
    load_by_drop(page, intact)
    expected = dict(intact, nodes=[dict(n, widgets_values=[7, *n["widgets_values"][1:]]) if n["id"] == sampler["id"]
                                   else n for n in intact["nodes"]])
    found = graph_problems(expected, graph_state(page), dialog_texts(page))
    assert any("KSampler" in p and "widgets" in p for p in found), found


def test_examples_are_in_the_templates_browser(editor):
    """The Templates side bar lists this pack's examples; opening one builds its graph."""
    page, log = editor
    path = PACK_DIR / "workflows" / "Proving ground toy, DPM-Solver++ 2M, SD1.5 layout.json"
    workflow = load_json(path)
    load_from_templates(page, path.stem)
    deadline = time.time() + 30
    while time.time() < deadline and len(graph_state(page)["nodes"]) != len(workflow["nodes"]):
        time.sleep(0.3)
    assert graph_problems(workflow, graph_state(page), dialog_texts(page)) == []
    assert log.ours() == []


@pytest.mark.parametrize("path", RUNNABLE, ids=[p.stem for p in RUNNABLE])
def test_example_queues_and_shows_its_image(editor, path):
    """Queued from the editor, the graph finishes and the editor holds the saved image for its Save Image node."""
    page, log = editor
    load_by_drop(page, load_json(path))
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function("""() => window.app.graph.nodes.some(
        n => n.type === 'SaveImage' && (window.app.nodeOutputs?.[String(n.id)]?.images?.length ?? 0) > 0)""",
                           timeout=300_000)
    assert log.ours() == []


def test_node_help_shows_description_and_tooltips(editor):
    """What a user reads in the editor's node library and hover help: the node definitions the editor holds carry
    each node's description and a tooltip on every input and output, for a sample of the pack's nodes."""
    page, _ = editor
    for node_id in ("PreprintPerturbedAttentionGuidance", "PreprintDeepCache", "PreprintRegionalPrompting"):
        info = page.evaluate("""(id) => {
            const data = LiteGraph.registered_node_types[id]?.nodeData ?? {};
            const inputs = Object.values(data.input?.required ?? {}).concat(Object.values(data.input?.optional ?? {}));
            const tips = inputs.map(spec => spec[1]?.tooltip).concat(data.output_tooltips ?? []);
            return {description: data.description, tips};
        }""", node_id)
        assert info["description"] and "arXiv" in info["description"], (node_id, info)
        assert info["tips"] and all(info["tips"]), (node_id, info)
