"""A running ComfyUI server (its own process) serves the pack: /object_info, /prompt, the template list."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from preprint.runner.comfy_host import PACK_DIR

from ..comfy_server import HYPHENATED_NAME, ServerError, comfy_server
from ..comfy_server import get_json as _get

SMOKE = PACK_DIR / "workflows" / "api" / "Tiny test model smoke test (untrained).json"


@pytest.fixture(scope="module")
def server(comfy_host, tmp_path_factory):
    base = tmp_path_factory.mktemp("server")
    try:
        with comfy_server(comfy_host.path, base) as url:
            yield url, base
    except ServerError as e:
        pytest.fail(str(e))


def test_object_info_lists_nodes_with_description_and_tooltips(server):
    url, _ = server
    info = _get(url + "/object_info/PreprintSamplerDPMSolverPP")["PreprintSamplerDPMSolverPP"]
    assert "arXiv:2211.01095" in info["description"]
    assert info["input"]["required"]["solver"][1]["tooltip"]
    assert info["output_tooltips"][0]


def test_templates_are_listed(server):
    url, _ = server
    templates = _get(url + "/workflow_templates")
    assert "DPM-Solver++ 2M, SD1.5" in templates[HYPHENATED_NAME]


def test_example_runs_through_http_prompt_api(server):
    url, base = server
    prompt = json.loads(SMOKE.read_text())
    body = json.dumps({"prompt": prompt, "client_id": "preprint-test"}).encode()
    req = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        prompt_id = json.loads(r.read())["prompt_id"]
    deadline = time.time() + 600
    while time.time() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            entry = history[prompt_id]
            break
        time.sleep(1)
    else:
        pytest.fail("prompt did not finish")
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images and (base / "output" / images[0]["filename"]).is_file()


def _post_prompt(url: str, prompt: dict) -> tuple[int, dict]:
    body = json.dumps({"prompt": prompt, "client_id": "preprint-test"}).encode()
    req = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


SCHEDULED = "Scheduled CFG / Guidance Interval (Preprint)"
BAD_WIDGETS = {
    "reversed interval": ({"sigma_start": 1.0, "sigma_end": 2.0}, f"{SCHEDULED}: guidance interval", "Swap"),
    "malformed custom list": ({"schedule": "custom", "custom_scales": "7, seven, 5"}, SCHEDULED, "'seven'"),
    "empty custom list": ({"schedule": "custom", "custom_scales": " "}, SCHEDULED, "one CFG scale per"),
}


@pytest.mark.parametrize("case", list(BAD_WIDGETS))
def test_bad_widget_values_are_refused_before_anything_is_queued(server, case):
    """ComfyUI's own validator rejects the prompt (HTTP 400) with the node's message, so the editor marks the
    node; nothing runs."""
    url, _ = server
    prompt = json.loads(SMOKE.read_text())
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "KSampler")
    widgets, *expected = BAD_WIDGETS[case]
    prompt["20"] = {"class_type": "PreprintScheduledCFG", "inputs": {
        "model": ["1", 0], "schedule": "constant", "cfg_start": -1.0, "cfg_end": -1.0, "exponent": 2.0,
        "custom_scales": "", "sigma_start": -1.0, "sigma_end": -1.0, **widgets}}
    prompt[sampler]["inputs"]["model"] = ["20", 0]
    status, answer = _post_prompt(url, prompt)
    assert status == 400, answer
    errors = answer["node_errors"]["20"]["errors"]
    text = " ".join(f"{e['message']} {e.get('details', '')}" for e in errors)
    assert all(x in text for x in expected), text


PAG_BAD_WIDGETS = {
    "unreadable layer list": ("middle0", "cannot read 'middle0'"),
    "unknown layer group": ("wings:1", "no model has a layer group 'wings'"),
    "backwards range": ("input:5-2", "runs backwards"),
}


@pytest.mark.parametrize("case", list(PAG_BAD_WIDGETS))
def test_bad_pag_layer_lists_are_refused_before_anything_is_queued(server, case):
    url, _ = server
    prompt = json.loads(SMOKE.read_text())
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "KSampler")
    layers, expected = PAG_BAD_WIDGETS[case]
    prompt["20"] = {"class_type": "PreprintPerturbedAttentionGuidance", "inputs": {
        "model": ["1", 0], "scale": 2.0, "layers": layers, "adaptive_scale": 0.0, "sigma_start": -1.0,
        "sigma_end": -1.0, "rescale": 0.0, "joint_attention": "image-to-image"}}
    prompt[sampler]["inputs"]["model"] = ["20", 0]
    status, answer = _post_prompt(url, prompt)
    assert status == 400, answer
    text = " ".join(f"{e['message']} {e.get('details', '')}" for e in answer["node_errors"]["20"]["errors"])
    assert "Perturbed-Attention Guidance (Preprint):" in text and expected in text, text


PAG = "Perturbed-Attention Guidance (Preprint)"
PAG_OUT_OF_RANGE = {
    # an input the node's validate_inputs does not name keeps ComfyUI's own range and option checks
    "scale above its max": ({"scale": 500.0}, "bigger than max of 100.0"),
    "joint attention not an option": ({"joint_attention": "sideways"}, "joint_attention"),
    # an input it names is checked by the node against its own widget
    "sigma_start below its min": ({"sigma_start": -5.0}, f"{PAG}: sigma_start = -5.0 is outside its range"),
}


@pytest.mark.parametrize("case", list(PAG_OUT_OF_RANGE))
def test_values_outside_a_widget_are_refused_before_anything_is_queued(server, case):
    """Every input keeps a range / option check at validation, whether ComfyUI or the node's validate_inputs
    makes it (ComfyUI skips its own for the inputs a validate_inputs accepts)."""
    url, _ = server
    prompt = json.loads(SMOKE.read_text())
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "KSampler")
    widgets, expected = PAG_OUT_OF_RANGE[case]
    prompt["20"] = {"class_type": "PreprintPerturbedAttentionGuidance", "inputs": {
        "model": ["1", 0], "scale": 2.0, "layers": "", "adaptive_scale": 0.0, "sigma_start": -1.0,
        "sigma_end": -1.0, "rescale": 0.0, "joint_attention": "image-to-image", **widgets}}
    prompt[sampler]["inputs"]["model"] = ["20", 0]
    status, answer = _post_prompt(url, prompt)
    assert status == 400, answer
    text = " ".join(f"{e['message']} {e.get('details', '')}" for e in answer["node_errors"]["20"]["errors"])
    assert expected in text, text
