"""Workflow files: the editor format (version 0.4, as the frontend saves it) and the API-prompt format.

Conversion and checks use the live node definitions of the running ComfyUI, so a workflow is judged
against the schemas users actually have. Errors are one line: what is wrong, where, and how to fix it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .workflow_layout import NOTE_WIDTH, WIDTH, Box, Link, body_height, layout, note_height, place_note

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Combos listing the user's model files: example workflows name the standard files, which a machine may lack.
MODEL_FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name",
                     "lora_name", "control_net_name", "model_name", "style_model_name", "clip_vision_name"}
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
SEED_NAMES = {"seed", "noise_seed"}
NOTE_TYPE = "Note"  # the editor's plain-text note (MarkdownNote renders markdown)
NOTE_TITLE = "About this workflow"
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}  # the yellow the editor gives a Note, as it saves one


class WorkflowError(ValueError):
    """A workflow that cannot be read or does not fit the node schemas."""


@dataclass(frozen=True)
class InputDef:
    name: str
    type: str
    options: dict
    choices: tuple | None
    required: bool

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def has_control_widget(self) -> bool:
        """Seed-like INT widgets get a 'control after generate' value saved right after theirs."""
        if self.type != "INT":
            return False
        flag = self.options.get("control_after_generate")
        return bool(flag) if flag is not None else self.name in SEED_NAMES

    @property
    def has_upload_widget(self) -> bool:
        """An image-upload combo (LoadImage) gets the editor's 'upload' button value saved right after its own."""
        return bool(self.options.get("image_upload"))

    @property
    def saved_values(self) -> int:
        """How many entries of ``widgets_values`` the editor saves for this widget."""
        return 1 + int(self.has_control_widget) + int(self.has_upload_widget)

    @property
    def linked_value(self):
        """What the editor keeps as the value of this widget while a link feeds it: its default ('' for text)."""
        default = self.options.get("default")
        return "" if default is None and self.type == "STRING" else default


@dataclass(frozen=True)
class NodeDef:
    class_type: str
    inputs: tuple[InputDef, ...]
    outputs: tuple[str, ...]
    output_names: tuple[str, ...]

    def input(self, name: str) -> InputDef | None:
        return next((i for i in self.inputs if i.name == name), None)

    @property
    def widgets(self) -> list[InputDef]:
        return [i for i in self.inputs if i.is_widget]


def node_defs() -> dict[str, NodeDef]:
    """Definitions of every node ComfyUI has registered (call after booting ComfyUI)."""
    import nodes

    return {name: _node_def(name, cls) for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}


def _node_def(name: str, cls) -> NodeDef:
    spec = cls.INPUT_TYPES()
    inputs: list[InputDef] = []
    for section in ("required", "optional"):
        for iname, entry in (spec.get(section) or {}).items():
            itype = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if isinstance(itype, (list, tuple)):
                inputs.append(InputDef(iname, "COMBO", opts, tuple(itype), section == "required"))
            elif itype == "COMBO":
                inputs.append(InputDef(iname, "COMBO", opts, tuple(opts.get("options", ())), section == "required"))
            else:
                inputs.append(InputDef(iname, str(itype), opts, None, section == "required"))
    outputs = tuple(str(t) for t in getattr(cls, "RETURN_TYPES", ()))
    names = tuple(getattr(cls, "RETURN_NAMES", None) or outputs)
    return NodeDef(name, tuple(inputs), outputs, names)


def read_json(path: Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise WorkflowError(f"{path}: no such file") from e
    except OSError as e:
        raise WorkflowError(f"{path}: cannot read the file ({e.strerror})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                            "export the workflow again from ComfyUI") from e


def is_editor_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list)


def is_api_format(data: Any) -> bool:
    return (isinstance(data, dict) and len(data) > 0
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def check_api(prompt: dict, defs: dict[str, NodeDef]) -> list[str]:
    """Problems of an API prompt: unknown node types, missing / unknown inputs, bad links, bad widget values."""
    problems: list[str] = []
    for nid, node in prompt.items():
        ctype = node.get("class_type")
        where = f"node {nid} ({ctype})"
        d = defs.get(ctype)
        if d is None:
            problems.append(f"{where}: unknown node type {ctype!r}; install the pack that provides it")
            continue
        inputs = node.get("inputs", {})
        for name, value in inputs.items():
            idef = d.input(name)
            if idef is None:
                problems.append(f"{where}: has no input {name!r}")
                continue
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src = prompt.get(value[0])
                if src is None:
                    problems.append(f"{where}: input {name!r} links to missing node {value[0]}")
                    continue
                sdef = defs.get(src.get("class_type"))
                if sdef is None:
                    continue
                if not (0 <= value[1] < len(sdef.outputs)):
                    problems.append(f"{where}: input {name!r} links to output {value[1]} of node {value[0]}, "
                                    f"which has {len(sdef.outputs)} outputs")
                    continue
                otype = sdef.outputs[value[1]]
                if not types_match(otype, idef.type):
                    problems.append(f"{where}: input {name!r} expects {idef.type} but node {value[0]} gives {otype}")
            else:
                problems.extend(f"{where}: {p}" for p in check_widget_value(idef, value))
        for idef in d.inputs:
            if idef.required and idef.name not in inputs:
                problems.append(f"{where}: required input {idef.name!r} is missing")
    return problems


def types_match(output_type: str, input_type: str) -> bool:
    if "*" in (output_type, input_type):
        return True
    outs = set(output_type.split(","))
    ins = set(input_type.split(","))
    return bool(outs & ins)


def check_widget_value(idef: InputDef, value: Any) -> list[str]:
    name = idef.name
    if idef.type == "COMBO":
        if _is_model_file_combo(idef) and isinstance(value, str) and value.lower().endswith(MODEL_FILE_SUFFIXES):
            return []  # a model file name: whether it is installed is the run command's concern
        if idef.choices is not None and value not in idef.choices:
            shown = ", ".join(map(str, idef.choices[:8])) + (" ..." if len(idef.choices) > 8 else "")
            return [f"{name!r} = {value!r} is not one of the options ({shown})"]
        return []
    if idef.type == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{name!r} = {value!r} must be true or false"]
    if idef.type == "STRING":
        return [] if isinstance(value, str) else [f"{name!r} = {value!r} must be text"]
    if idef.type in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [f"{name!r} = {value!r} must be a number"]
        if idef.type == "INT" and not float(value).is_integer():
            return [f"{name!r} = {value!r} must be a whole number"]
        lo, hi = idef.options.get("min"), idef.options.get("max")
        if lo is not None and value < lo:
            return [f"{name!r} = {value} is below its minimum {lo}"]
        if hi is not None and value > hi:
            return [f"{name!r} = {value} is above its maximum {hi}"]
    return []


def _is_model_file_combo(idef: InputDef) -> bool:
    """A combo that lists files of a models folder (by its name, or because every listed option is a file)."""
    if idef.name in MODEL_FILE_INPUTS:
        return True
    choices = idef.choices or ()
    return all(isinstance(c, str) and c.lower().endswith(MODEL_FILE_SUFFIXES) for c in choices)


def editor_to_api(wf: dict, defs: dict[str, NodeDef]) -> dict:
    """Convert an editor-format workflow to an API prompt (muted / bypassed nodes are left out)."""
    links = {link[0]: link for link in wf.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in wf["nodes"]:
        if node.get("mode", 0) in (2, 4):  # 2 = muted, 4 = bypassed
            continue
        ctype = node.get("type")
        d = defs.get(ctype)
        if d is None:
            if ctype in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
                continue
            raise WorkflowError(f"node {node.get('id')}: unknown node type {ctype!r}; "
                                "install the pack that provides it or remove the node")
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise WorkflowError(f"node {node['id']} ({ctype}): named widget values are not supported")
        pos = 0
        for idef in d.widgets:
            if pos >= len(values):
                break
            inputs[idef.name] = values[pos]
            pos += idef.saved_values
        for slot in node.get("inputs", []):
            link_id = slot.get("link")
            if link_id is None:
                continue
            link = links.get(link_id)
            if link is None:
                raise WorkflowError(f"node {node['id']} ({ctype}): input {slot.get('name')!r} uses link {link_id}, "
                                    "which the workflow does not define")
            inputs[slot["name"]] = [str(link[1]), link[2]]
        entry = {"class_type": ctype, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


def api_to_editor(prompt: dict, defs: dict[str, NodeDef]) -> dict:
    """An API prompt as an editor-format workflow (version 0.4), laid out by :mod:`.workflow_layout`."""
    depth: dict[str, int] = {}

    def node_depth(nid: str, seen: frozenset = frozenset()) -> int:
        if nid in depth:
            return depth[nid]
        if nid in seen:
            raise WorkflowError(f"node {nid} is part of a cycle")
        parents = [v[0] for v in prompt[nid]["inputs"].values() if _is_link(v)]
        depth[nid] = 1 + max((node_depth(p, seen | {nid}) for p in parents), default=-1)
        return depth[nid]

    for nid in prompt:
        node_depth(nid)
    ids = {nid: int(nid) for nid in prompt}
    links: list[list] = []
    out_links: dict[tuple[str, int], list[int]] = {}
    boxes: dict[int, Box] = {}
    nodes: list[dict] = []
    order = sorted(prompt, key=lambda n: (depth[n], ids[n]))
    for nid in order:
        node = prompt[nid]
        d = defs[node["class_type"]]
        inputs_out = []
        # the editor lists socket inputs first and widgets fed by a link after them, and numbers link slots so
        for idef in sorted(d.inputs, key=lambda i: i.is_widget):
            value = node["inputs"].get(idef.name)
            if _is_link(value):
                link_id = len(links) + 1
                src_def = defs[prompt[value[0]]["class_type"]]
                ltype = src_def.outputs[value[1]]
                links.append([link_id, ids[value[0]], value[1], ids[nid], len(inputs_out), ltype])
                out_links.setdefault((value[0], value[1]), []).append(link_id)
                slot = {"name": idef.name, "type": idef.type, "link": link_id}
                if idef.is_widget:
                    slot["widget"] = {"name": idef.name}
                inputs_out.append(slot)
            elif not idef.is_widget:
                if idef.required:
                    raise WorkflowError(f"node {nid}: required input {idef.name!r} is not connected")
                inputs_out.append({"name": idef.name, "type": idef.type, "link": None, "shape": 7})
        widgets: list[Any] = []
        for idef in d.widgets:
            value = node["inputs"].get(idef.name, idef.options.get("default"))
            widgets.append(idef.linked_value if _is_link(value) else value)
            if idef.has_control_widget:
                widgets.append("fixed")
            if idef.has_upload_widget:
                widgets.append("image")
        multiline = sum(1 for idef in d.widgets if idef.options.get("multiline"))
        boxes[ids[nid]] = Box(ids[nid], depth[nid], WIDTH, body_height(len(inputs_out), len(d.outputs), len(widgets),
                                                                     multiline))
        entry = {
            "id": ids[nid], "type": node["class_type"], "pos": [0, 0],
            "size": [WIDTH, boxes[ids[nid]].height], "flags": {}, "order": len(nodes),
            "mode": 0, "inputs": inputs_out,
            "outputs": [{"name": d.output_names[i], "type": t, "links": [], "slot_index": i}
                        for i, t in enumerate(d.outputs)],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        }
        if node.get("_meta", {}).get("title"):
            entry["title"] = node["_meta"]["title"]
        nodes.append(entry)
    for n in nodes:
        for o in n["outputs"]:
            o["links"] = out_links.get((str(n["id"]), o["slot_index"]), [])
    layout(boxes, [Link(ln[1], ln[2], ln[3], ln[4]) for ln in links])
    for n in nodes:
        n["pos"] = [round(boxes[n["id"]].x), round(boxes[n["id"]].y)]
    return {"last_node_id": max(ids.values(), default=0), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
            "version": 0.4}


def add_note(wf: dict, text: str, title: str = NOTE_TITLE) -> dict:
    """``wf`` (an editor workflow) with a Note node holding ``text`` at its top left, the graph moved right to make
    room (:func:`.workflow_layout.place_note`), sized for the text. The Note is saved as the editor saves one (its
    text the only widget value); the editor alone knows the type, so :func:`editor_to_api` and
    :func:`check_editor` pass over it and the API twin does not change."""
    if not isinstance(text, str) or not text.strip():
        raise WorkflowError(f"note {text!r}: a note needs some text")
    out = json.loads(json.dumps(wf))
    nodes = out["nodes"]
    boxes = {n["id"]: Box(n["id"], 0, float(n["size"][0]), float(n["size"][1]), float(n["pos"][0]),
                          float(n["pos"][1])) for n in nodes}
    links = [Link(ln[1], ln[2], ln[3], ln[4]) for ln in out["links"]]
    note_id = max([out.get("last_node_id", 0), *boxes], default=0) + 1
    note = Box(note_id, 0, float(NOTE_WIDTH), float(note_height(text.strip())))
    blocked = place_note(boxes, links, note)
    if blocked:
        raise WorkflowError(f"the note would lie over or under {blocked}; lay the graph out with layout() first")
    for n in nodes:
        n["pos"] = [round(boxes[n["id"]].x), round(boxes[n["id"]].y)]
    nodes.append({"id": note_id, "type": NOTE_TYPE, "pos": [round(note.x), round(note.y)],
                  "size": [round(note.width), round(note.height)], "flags": {}, "order": len(nodes), "mode": 0,
                  "inputs": [], "outputs": [], "title": title, "properties": {}, "widgets_values": [text.strip()],
                  **NOTE_COLORS})
    out["last_node_id"] = note_id
    return out


def check_editor(wf: dict, defs: dict[str, NodeDef]) -> list[str]:
    """Problems of an editor-format workflow: version, node types, link endpoints and types, widget values."""
    problems: list[str] = []
    if wf.get("version") != 0.4:
        problems.append(f"version is {wf.get('version')!r}, expected 0.4 (the format the editor saves)")
    by_id = {n.get("id"): n for n in wf.get("nodes", [])}
    for link in wf.get("links", []):
        if not (isinstance(link, list) and len(link) == 6):
            problems.append(f"link {link!r} is not [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        lid, src, sslot, dst, dslot, ltype = link
        s, t = by_id.get(src), by_id.get(dst)
        if s is None or t is None:
            problems.append(f"link {lid}: joins missing node {src if s is None else dst}")
            continue
        sdef, tdef = defs.get(s.get("type")), defs.get(t.get("type"))
        if sdef is not None and not (0 <= sslot < len(sdef.outputs)):
            problems.append(f"link {lid}: node {src} ({s['type']}) has no output {sslot}")
            continue
        if not (0 <= dslot < len(t.get("inputs", []))):
            problems.append(f"link {lid}: node {dst} ({t['type']}) has no input slot {dslot}")
            continue
        slot = t["inputs"][dslot]
        if slot.get("link") != lid:
            problems.append(f"link {lid}: input {slot.get('name')!r} of node {dst} does not point back to it")
        if sdef is not None and tdef is not None:
            idef = tdef.input(slot.get("name"))
            if idef is None:
                problems.append(f"link {lid}: node {dst} ({t['type']}) has no input {slot.get('name')!r}")
            elif not types_match(sdef.outputs[sslot], idef.type) or not types_match(ltype, idef.type):
                problems.append(f"link {lid}: {s['type']} output {sslot} ({sdef.outputs[sslot]}) cannot feed "
                                f"{t['type']} input {idef.name!r} ({idef.type})")
    for node in wf.get("nodes", []):
        d = defs.get(node.get("type"))
        where = f"node {node.get('id')} ({node.get('type')})"
        if d is None:
            if node.get("type") not in ("Note", "MarkdownNote", "Reroute"):
                problems.append(f"{where}: unknown node type")
            continue
        values = list(node.get("widgets_values") or [])
        expected = sum(w.saved_values for w in d.widgets)
        if len(values) != expected:
            problems.append(f"{where}: {len(values)} widget values, the node has {expected}")
            continue
        pos = 0
        for w in d.widgets:
            linked = any(s.get("name") == w.name and s.get("link") is not None for s in node.get("inputs", []))
            if not linked:
                problems.extend(f"{where}: {p}" for p in check_widget_value(w, values[pos]))
            pos += w.saved_values
    return problems


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)
