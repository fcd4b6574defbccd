"""Driving ComfyUI's web editor in a real browser: load a workflow as a user does, read back the graph the editor
built, and compare it with the file."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

PACK_MARK = re.compile(r"preprint", re.IGNORECASE)


@dataclass
class PageLog:
    """Console errors, uncaught exceptions and failed requests of one page; ``ours()`` those of this pack."""

    errors: list[str] = field(default_factory=list)

    def attach(self, page) -> PageLog:
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text} {m.location}"))
        page.on("pageerror", lambda e: self.errors.append(f"exception: {e}"))
        page.on("response", lambda r: r.status >= 400 and self.errors.append(f"HTTP {r.status}: {r.url}"))
        return self

    def ours(self) -> list[str]:
        return [e for e in self.errors if PACK_MARK.search(e)]


def open_editor(page, url: str) -> None:
    page.goto(url, wait_until="networkidle", timeout=180_000)
    page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=180_000)
    close_dialogs(page)


def close_dialogs(page) -> None:
    for _ in range(3):
        if not page.locator(".p-dialog").count():
            return
        page.keyboard.press("Escape")
        time.sleep(0.3)


def dialog_texts(page) -> list[str]:
    return page.evaluate("() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)")


def load_by_drop(page, workflow: dict) -> None:
    """Drop the workflow file on the editor, as a user dragging it in from the file manager."""
    page.evaluate("""async (wf) => {
        const file = new File([JSON.stringify(wf)], 'workflow.json', {type: 'application/json'});
        const data = new DataTransfer();
        data.items.add(file);
        document.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
    }""", workflow)
    wait_for_graph(page, len(workflow["nodes"]))


def load_from_templates(page, title: str) -> None:
    """Open the Templates browser from the side bar, pick this pack's section, search the title and open it."""
    page.locator(".side-bar-button", has_text="Templates").first.click()
    page.get_by_text("comfyui-preprint", exact=True).first.click()
    page.get_by_placeholder("Search templates...").fill(title)
    page.get_by_text(title, exact=True).first.click(timeout=30_000)


def wait_for_graph(page, n_nodes: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if page.evaluate("() => window.app.graph.nodes.length") == n_nodes:
            time.sleep(0.5)  # widgets and links are set right after the nodes
            return
        time.sleep(0.2)


def graph_state(page) -> dict:
    """The graph the editor holds: nodes with their widget values, and links by their endpoints."""
    return page.evaluate("""() => {
        const g = window.app.graph;
        const links = g.links instanceof Map ? Array.from(g.links.values()) : Object.values(g.links ?? {});
        return {
            nodes: g.nodes.map(n => ({id: n.id, type: n.type, has_def: !!LiteGraph.registered_node_types[n.type],
                                      widgets: (n.widgets ?? []).map(w => w.value)})),
            links: links.filter(l => l).map(l => [l.origin_id, l.origin_slot, l.target_id, l.target_slot]),
        };
    }""")


def problems(workflow: dict, state: dict, dialogs: list[str]) -> list[str]:
    """What the editor did not reproduce of the file; empty when the graph is the file's."""
    out = [f"dialog: {d.splitlines()[0] if d else ''}" for d in dialogs if "missing" in d.lower()]
    nodes = {n["id"]: n for n in state["nodes"]}
    for spec in workflow["nodes"]:
        node = nodes.get(spec["id"])
        if node is None:
            out.append(f"node {spec['id']} ({spec['type']}) not in the graph")
            continue
        if node["type"] != spec["type"] or not node["has_def"]:
            out.append(f"node {spec['id']}: {spec['type']} is not a node type this editor knows")
            continue
        want = spec.get("widgets_values", [])
        if isinstance(want, list) and node["widgets"] != want:
            out.append(f"node {spec['id']} ({spec['type']}): widgets {node['widgets']} != file {want}")
    if len(nodes) != len(workflow["nodes"]):
        out.append(f"{len(nodes)} nodes in the graph, {len(workflow['nodes'])} in the file")
    want_links = sorted([ln[1], ln[2], ln[3], ln[4]] for ln in workflow.get("links", []))
    if sorted(state["links"]) != want_links:
        out.append(f"links {sorted(state['links'])} != file {want_links}")
    return out


def fit_and_screenshot(page, png, thumbnail=None) -> None:
    """The graph fitted to the view, as a PNG; and optionally a 512 px JPEG of it for the Templates browser."""
    page.evaluate("""() => {  // fit the whole graph in the view, as the editor's "fit view" does
        const c = window.app.canvas, nodes = window.app.graph.nodes;
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        for (const n of nodes) {
            x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 40);
            x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
        }
        const rect = c.canvas.getBoundingClientRect();
        const s = Math.min(rect.width / (x1 - x0 + 80), rect.height / (y1 - y0 + 80), 1.25);
        c.ds.scale = s;
        c.ds.offset = [-x0 + (rect.width / s - (x1 - x0)) / 2, -y0 + (rect.height / s - (y1 - y0)) / 2];
        c.min_font_size_for_lod = 0;  // draw titles and widgets at any zoom, for a readable picture
        c.setDirty(true, true);
    }""")
    time.sleep(0.5)
    page.screenshot(path=str(png))
    from PIL import Image

    with Image.open(png) as im:
        im = im.convert("RGB")
    im.quantize(colors=128).save(png, optimize=True)  # an editor screenshot needs few colours: a fraction the size
    if thumbnail is not None:
        im.thumbnail((512, 512))
        im.save(thumbnail, quality=85)


def load_json(path) -> dict:
    return json.loads(open(path, encoding="utf-8").read())
