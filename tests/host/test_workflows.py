"""Every example workflow fits the live node schemas, its two formats agree, and its API twin executes."""

from __future__ import annotations

import json

import pytest

from preprint.runner.comfy_host import PACK_DIR
from preprint.runner.tiny_substitution import substitute_tiny
from preprint.runner.workflow_format import check_api, check_editor, editor_to_api, node_defs

WORKFLOWS = PACK_DIR / "workflows"
EDITOR_FILES = sorted(WORKFLOWS.glob("*.json"))
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))


@pytest.fixture(scope="module")
def defs(comfy_host):
    return node_defs()


def test_every_editor_workflow_has_an_api_twin_and_back():
    assert EDITOR_FILES, "no example workflows"
    assert {p.name for p in EDITOR_FILES} == {p.name for p in API_FILES}


def test_every_preprint_node_is_used_in_an_example(comfy_host):
    used = {n["type"] for p in EDITOR_FILES for n in json.loads(p.read_text())["nodes"]}
    assert set(comfy_host.pack_node_ids) - used == set()


@pytest.mark.parametrize("path", EDITOR_FILES, ids=lambda p: p.stem)
def test_editor_workflow_fits_schemas_and_matches_twin(path, defs):
    wf = json.loads(path.read_text())
    assert check_editor(wf, defs) == []
    twin = json.loads((WORKFLOWS / "api" / path.name).read_text())
    assert _strip_meta(editor_to_api(wf, defs)) == _strip_meta(twin)


@pytest.fixture(scope="module")
def constant_guidance_scheduler_files(comfy_host, tmp_path_factory):
    """Annealing-guidance scheduler files the examples name, built as constant-w schedulers (the released
    weights cannot be downloaded here), in a models folder registered with ComfyUI for this module."""
    import folder_paths

    from preprint.guidance.annealing import constant_scheduler, save_scheduler

    folder = tmp_path_factory.mktemp("guidance_schedulers")
    names = {n["inputs"]["scheduler_file"] for p in API_FILES for n in json.loads(p.read_text()).values()
             if n["class_type"] == "PreprintSamplerAnnealingGuidance"}
    for name in names:
        save_scheduler(constant_scheduler(5.0), folder / name, source="constant w = 5 for tests")
    paths = folder_paths.folder_names_and_paths["guidance_schedulers"][0]
    paths.append(str(folder))
    folder_paths.filename_list_cache.pop("guidance_schedulers", None)
    yield folder
    paths.remove(str(folder))
    folder_paths.filename_list_cache.pop("guidance_schedulers", None)


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_twin_fits_schemas_and_executes_on_a_tiny_model(path, defs, comfy_host,
                                                            constant_guidance_scheduler_files):
    prompt = json.loads(path.read_text())
    assert check_api(prompt, defs) == []
    tiny, arch = substitute_tiny(prompt, max_side=64, max_steps=4)
    outputs = comfy_host.execute(tiny)
    images = [img for out in outputs.values() for img in out.get("images", [])]
    assert images, f"{path.name} produced no image on the tiny {arch} model"


def test_checks_catch_broken_workflows(defs):
    wf = json.loads(EDITOR_FILES[0].read_text())
    bad = json.loads(json.dumps(wf))
    bad["nodes"][0]["type"] = "NoSuchNode"
    assert any("unknown node type" in p for p in check_editor(bad, defs))
    bad = json.loads(json.dumps(wf))
    # retarget a link to a slot of the wrong type
    link = bad["links"][0]
    link[5] = "IMAGE"
    assert any("cannot feed" in p for p in check_editor(bad, defs))
    bad = json.loads(json.dumps(wf))
    sampler = next(n for n in bad["nodes"] if n["type"] in ("KSampler", "CFGGuider"))
    sampler["widgets_values"][-1] = "not a number"
    assert check_editor(bad, defs)


def _strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}
