"""Build the example workflows from their specs.

Each ``workflows/specs/<family>.py`` defines ``WORKFLOWS: dict[str, dict]``: the title users see in the
Templates browser mapped to an API prompt. From one spec come both files, the editor-format workflow in
``workflows/`` and its API twin in ``workflows/api/``, so the two can never drift apart.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .workflow_format import WorkflowError, api_to_editor, check_api, node_defs


def load_specs(workflows_dir: Path) -> dict[str, dict]:
    specs: dict[str, dict] = {}
    for path in sorted((workflows_dir / "specs").glob("*.py")):
        if path.stem == "common":
            continue
        module_spec = importlib.util.spec_from_file_location(f"preprint_workflow_spec_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        for title, prompt in getattr(module, "WORKFLOWS", {}).items():
            if title in specs:
                raise WorkflowError(f"{path.name}: workflow title {title!r} is defined twice")
            specs[title] = prompt
    return specs


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
    for title, prompt in load_specs(workflows_dir).items():
        prompt = with_defaults(prompt, defs)
        problems = check_api(prompt, defs)
        if problems:
            raise WorkflowError(f"spec {title!r}: " + "; ".join(problems))
        editor = api_to_editor(prompt, defs)
        targets = ((out_dir / f"{title}.json", editor), (out_dir / "api" / f"{title}.json", prompt))
        for path, data in targets:
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            written.append(path)
    return written
