"""Every example workflow fits the live node schemas, its two formats agree, and its API twin executes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from preprint.runner.comfy_host import PACK_DIR
from preprint.runner.tiny_substitution import LATENT_NODES, substitute_tiny
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


def test_shipped_workflows_are_what_their_specs_build(comfy_host, tmp_path):
    """A spec edited without `build-workflows` (or a shipped file edited by hand) leaves the two apart."""
    from preprint.runner.workflow_builder import build_all

    built = build_all(WORKFLOWS, tmp_path)
    shipped = {p.relative_to(WORKFLOWS) for p in [*EDITOR_FILES, *API_FILES]}
    assert {p.relative_to(tmp_path) for p in built} == shipped
    stale = [str(p.relative_to(tmp_path)) for p in built
             if p.read_text() != (WORKFLOWS / p.relative_to(tmp_path)).read_text()]
    assert stale == [], "rebuild with `python -m preprint build-workflows`"


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


@pytest.fixture(scope="module")
def tiny_lora_files(comfy_host, tmp_path_factory):
    """LoRA files the examples name (placeholders for the user's own), made of random low-rank factors for every
    Linear / Conv layer of the tiny model each example runs on, in a loras folder registered for this module."""
    import math

    import folder_paths
    from safetensors.torch import save_file

    from preprint.runner.tiny_models import tiny_model

    folder = tmp_path_factory.mktemp("loras")
    for p in API_FILES:
        prompt = json.loads(p.read_text())
        names = {n["inputs"]["lora_name"] for n in prompt.values() if "lora_name" in n["inputs"]}
        if not names:
            continue
        g, sd = torch.Generator().manual_seed(0), {}
        for name, m in tiny_model(_thumbnail(prompt)[1]).model.diffusion_model.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                key, fan_in = "lora_unet_" + name.replace(".", "_"), math.prod(m.weight.shape[1:])
                sd[key + ".lora_down.weight"] = torch.randn(2, *m.weight.shape[1:], generator=g) / math.sqrt(fan_in)
                up = (m.weight.shape[0], 2, *[1] * (m.weight.ndim - 2))
                sd[key + ".lora_up.weight"] = 0.1 * torch.randn(up, generator=g)
        for name in names:
            save_file(sd, str(folder / name))
    paths = folder_paths.folder_names_and_paths["loras"][0]
    paths.append(str(folder))
    folder_paths.filename_list_cache.pop("loras", None)
    yield folder
    paths.remove(str(folder))
    folder_paths.filename_list_cache.pop("loras", None)


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_twin_fits_schemas_and_executes_on_a_tiny_model(path, defs, comfy_host,
                                                            constant_guidance_scheduler_files, tiny_lora_files):
    prompt = json.loads(path.read_text())
    assert check_api(prompt, defs) == []
    tiny, arch = _thumbnail(prompt)
    outputs = comfy_host.execute(tiny)
    images = [img for out in outputs.values() for img in out.get("images", [])]
    assert images, f"{path.name} produced no image on the tiny {arch} model"


def _thumbnail(prompt: dict) -> tuple[dict, str]:
    """The example on the tiny model: sides capped at 64 px (128 px with tiles, which shrink to 64), 4 steps."""
    return substitute_tiny(prompt, max_side=64, max_steps=4)


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


# -- every technique of a stacked example takes part -------------------------------------------------------------
def _techniques(prompt: dict) -> dict[str, str]:
    """The Preprint nodes that patch a MODEL or wrap a SAMPLER coming in by link and hand the same type on (a node
    that reads the model to make a MASK is not one): node id -> that input."""
    import nodes

    def passes_on(class_type: str, name: str) -> bool:
        return name.upper() in nodes.NODE_CLASS_MAPPINGS[class_type].RETURN_TYPES

    return {nid: name for nid, n in prompt.items() if n["class_type"].startswith("Preprint")
            for name in ("model", "sampler") if isinstance(n["inputs"].get(name), list)
            and passes_on(n["class_type"], name)}


STACKED = [p for p in API_FILES if len(_techniques(json.loads(p.read_text()))) >= 2]
STACK_SIDE, STACK_STEPS = 128, 8
# Widgets tuned for real checkpoints at 25-30 steps that never act on the toy at 8 steps, set where they do.
# Adaptive Guidance: the toy's cond / uncond velocities stay below a cosine of 0.999 (its change on removal was
# exactly 0.0 at 8 and at 25 steps), at 0.99 guidance converges mid-run. AdaptiveDiffusion: no third difference
# of the toy's 8-step trajectory is within 1% (0.0 change), 30% skips some steps.
STACK_WIDGETS = {"PreprintAdaptiveGuidance": {"threshold": 0.99},
                 "PreprintAdaptiveDiffusionSampler": {"threshold": 0.3}}
# Relative change (max |difference| / max |latent|) a bypassed technique must make. Noise floor: a technique that
# is the identity but changes how the batch is laid out (PAG where the attention has one token, the untrained tiny
# SD1.5 at 64 pixels) moved the latent by 1.5e-7 (float32 reordering); a truly inert one by exactly 0. Smallest
# real effect on the toy: 0.011 (attention entropy scaling in the RoPE example); the others 0.036 (Adaptive
# Guidance) to 1.8 (Scheduled CFG).
STACK_MIN_CHANGE = 1e-5


def _on_the_toy(prompt: dict, arch: str) -> dict:
    """The example on the trained proving-ground toy at STACK_SIDE pixels (aspect kept) and STACK_STEPS steps.

    A training size left at 0 (the family's, for a model trained at 512 / 1024 pixels) is scaled with the
    image, so a node that acts only above its training size acts here as in the example."""
    out = copy.deepcopy(prompt)
    factor = 1.0
    for node in out.values():
        if node["class_type"] == "PreprintTinyTestModel":
            node["class_type"], node["inputs"] = "PreprintProvingGroundModel", {"architecture": arch}
        if node["class_type"] in LATENT_NODES:
            w, h = node["inputs"]["width"], node["inputs"]["height"]
            factor = STACK_SIDE / max(w, h)
            node["inputs"]["width"], node["inputs"]["height"] = (max(16, round(v * factor / 16) * 16) for v in (w, h))
    for node in out.values():
        node["inputs"].update(STACK_WIDGETS.get(node["class_type"], {}))
        for key in ("training_width", "training_height"):
            if node["inputs"].get(key) == 0:
                node["inputs"][key] = round((512 if arch == "sd15" else 1024) * factor / 16) * 16
        if isinstance(node["inputs"].get("steps"), int):
            node["inputs"]["steps"] = min(node["inputs"]["steps"], STACK_STEPS)
    return out


def _without(prompt: dict, nid: str, through: str) -> dict:
    """The graph with node ``nid`` bypassed: whatever read its output reads its ``through`` input instead."""
    out = copy.deepcopy(prompt)
    source = out.pop(nid)["inputs"][through]
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == nid:
                node["inputs"][name] = list(source)
    return out


def _saving_latents(prompt: dict) -> dict:
    """The graph with every decode-and-save replaced by SaveLatent on the sampler's output: the latent is compared
    exactly, without the VAE and the 8-bit image in between."""
    out = copy.deepcopy(prompt)
    for nid, node in list(out.items()):
        if node["class_type"] == "SaveImage":
            decode = out.pop(node["inputs"]["images"][0])
            assert decode["class_type"] == "VAEDecode"
            out[nid] = {"class_type": "SaveLatent",
                        "inputs": {"samples": decode["inputs"]["samples"], "filename_prefix": "stack_test/latent"}}
    return out


def _latent(comfy_host, prompt: dict) -> torch.Tensor:
    import folder_paths
    from safetensors.torch import load_file

    saved = [f for out in comfy_host.execute(prompt).values() for f in out.get("latents", [])]
    assert len(saved) == 1, saved
    path = Path(folder_paths.get_output_directory()) / saved[0]["subfolder"] / saved[0]["filename"]
    return load_file(str(path))["latent_tensor"]


@pytest.mark.parametrize("path", STACKED, ids=lambda p: p.stem)
def test_every_technique_of_a_stacked_example_changes_its_result(path, comfy_host):
    """An example that stacks Preprint techniques in one graph, against the same graph with one of them bypassed
    (its consumer reads what it was given), one at a time: every removal must change the sampled latent, so each
    technique is active inside the stack and none is silently dropped by another."""
    prompt, arch = substitute_tiny(json.loads(path.read_text()), max_side=None)
    prompt = _saving_latents(_on_the_toy(prompt, arch))
    full = _latent(comfy_host, prompt)
    assert torch.isfinite(full).all()
    scale = full.abs().max().item()
    changes = {}
    for nid, through in _techniques(prompt).items():
        without = _latent(comfy_host, _without(prompt, nid, through))
        changes[prompt[nid]["class_type"]] = (without - full).abs().max().item() / scale
    inert = {name: change for name, change in changes.items() if not change > STACK_MIN_CHANGE}
    assert not inert, f"bypassing these changed the result by (relative) only {inert}; all changes: {changes}"
