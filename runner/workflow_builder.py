"""Build the example workflows from their specs.

Each ``workflows/specs/<family>.py`` defines ``WORKFLOWS: dict[str, dict]``: the title users see in the
Templates browser mapped to an API prompt. From one spec come both files, the editor-format workflow in
``workflows/`` and its API twin in ``workflows/api/``, so the two can never drift apart.

Beside it, ``NOTES: dict[str, str]`` gives each title the text of the Note that opens its editor file (titled
"About this workflow", at the top left, the graph moved right to make room): two to four plain-text sentences
saying what the workflow shows, "Try <widget> first" with what moving that widget does, and the paper it comes
from (title and arXiv id), or that it is a plain core graph. The Note is the editor's own node type, so only the
editor file holds it; the API twin is the prompt alone. A title in ``NOTES`` that ``WORKFLOWS`` lacks is an error
(a renamed workflow); a workflow without a note is built with a warning, and the tests list it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from .workflow_format import WorkflowError, add_note, api_to_editor, check_api, node_defs

log = logging.getLogger(__name__)


def load_examples(workflows_dir: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Every spec's workflows (title -> API prompt) and notes (title -> text)."""
    specs: dict[str, dict] = {}
    notes: dict[str, str] = {}
    for path in sorted((workflows_dir / "specs").glob("*.py")):
        if path.stem == "common":
            continue
        module_spec = importlib.util.spec_from_file_location(f"preprint_workflow_spec_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        workflows = getattr(module, "WORKFLOWS", {})
        for title, prompt in workflows.items():
            if title in specs:
                raise WorkflowError(f"{path.name}: workflow title {title!r} is defined twice")
            specs[title] = prompt
        for title, text in getattr(module, "NOTES", {}).items():
            if title not in workflows:
                raise WorkflowError(f"{path.name}: NOTES has a note for {title!r}, which its WORKFLOWS does not "
                                    "define; give the note the workflow's exact title")
            if not isinstance(text, str) or not text.strip():
                raise WorkflowError(f"{path.name}: the note for {title!r} is empty; write what the workflow shows, "
                                    "which widget to try first and the paper it comes from")
            notes[title] = text.strip()
    return specs, notes


def load_specs(workflows_dir: Path) -> dict[str, dict]:
    return load_examples(workflows_dir)[0]


def with_defaults(prompt: dict, defs) -> dict:
    """Spell out every widget a spec leaves at its default, so both files state the full settings."""
    out = {}
    for nid, node in prompt.items():
        d = defs.get(node["class_type"])
        inputs = dict(node.get("inputs", {}))
        if d is not None:
            for w in d.widgets:
                if w.name not in inputs and "default" in w.options:
                    inputs[w.name] = w.options["default"]
            inputs = {i.name: inputs[i.name] for i in d.inputs if i.name in inputs}  # schema order
        out[nid] = {**node, "inputs": inputs}
    return out


def build_all(workflows_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write every spec's two files under ``out_dir`` (default: ``workflows_dir`` itself)."""
    defs = node_defs()
    written: list[Path] = []
    out_dir = out_dir or workflows_dir
    (out_dir / "api").mkdir(parents=True, exist_ok=True)
    specs, notes = load_examples(workflows_dir)
    for title, prompt in specs.items():
        prompt = with_defaults(prompt, defs)
        problems = check_api(prompt, defs)
        if problems:
            raise WorkflowError(f"spec {title!r}: " + "; ".join(problems))
        editor = api_to_editor(prompt, defs)
        if title in notes:
            editor = add_note(editor, notes[title])
        else:
            log.warning("workflow %r has no note: add one to NOTES in its spec file", title)
        targets = ((out_dir / f"{title}.json", editor), (out_dir / "api" / f"{title}.json", prompt))
        for path, data in targets:
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            written.append(path)
    return written
