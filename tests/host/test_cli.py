"""The run / check commands, as users call them: output images, one-line errors, non-zero exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from preprint.runner.comfy_host import PACK_DIR

WORKFLOW = PACK_DIR / "workflows" / "DPM-Solver++ 2M, SD1.5.json"


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "preprint", *args], capture_output=True, text=True, timeout=900,
                          cwd=cwd)


def test_run_falls_back_to_tiny_model_and_writes_images(comfy_host, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "models").mkdir()  # an empty models folder, whatever the ComfyUI checkout has installed
    # paths relative to the caller's directory, as users type them
    proc = cli("run", os.path.relpath(WORKFLOW, tmp_path), "--output", "out", "--no-user-nodes", "--models",
               "models", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNTRAINED" in proc.stderr
    assert list(out.glob("*.png"))


def test_main_job_without_a_checkpoint_runs_the_trained_toy_and_says_so(comfy_host, tmp_path):
    """What scripts/main.sh runs on a machine with no checkpoint: the example on the proving-ground toy."""
    (tmp_path / "models").mkdir()
    toy = PACK_DIR / "workflows" / "Proving ground toy, DPM-Solver++ 2M, SD1.5 layout.json"
    proc = cli("run", str(WORKFLOW), "--output", str(tmp_path / "out"), "--no-user-nodes", "--models",
               str(tmp_path / "models"), "--toy-workflow", str(toy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "toy model trained by Preprint" in proc.stderr and "UNTRAINED" not in proc.stderr
    assert len(list((tmp_path / "out").glob("preprint_toy*.png"))) == 4  # the toy workflow's batch of 4


def test_check_prints_a_table_of_every_example(comfy_host):
    proc = cli("check")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "DPM-Solver++ 2M, SD1.5.json" in proc.stdout
    assert "fit the live node schemas" in proc.stdout.splitlines()[-1]


def _fails_while_sampling() -> dict:
    """A valid graph that fails during execution: Scheduled CFG needs a positive / negative pair, which
    DualCFGGuider does not give it (the node says so when sampling starts)."""
    return {
        "1": {"class_type": "PreprintTinyTestModel", "inputs": {"architecture": "sd15", "weights_seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "PreprintScheduledCFG", "inputs": {
            "model": ["1", 0], "schedule": "constant", "cfg_start": -1.0, "cfg_end": -1.0, "exponent": 2.0,
            "custom_scales": "", "sigma_start": 5.0, "sigma_end": -1.0}},
        "5": {"class_type": "DualCFGGuider", "inputs": {"model": ["4", 0], "cond1": ["2", 0], "cond2": ["2", 0],
                                                        "negative": ["3", 0], "cfg_conds": 3.0,
                                                        "cfg_cond2_negative": 2.0, "style": "regular"}},
        "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "7": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2,
                                                         "denoise": 1.0}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["5", 0],
                                                                 "sampler": ["6", 0], "sigmas": ["7", 0],
                                                                 "latent_image": ["9", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "fail"}},
    }


# exit codes (runner/cli.py): 2 a bad workflow (unreadable, malformed, unknown node, refused by the validator),
# 3 a missing host or model file (no checkpoint it names, no --models folder, no model at all with --no-tiny),
# 4 a failure while the graph executes
CASES = {"malformed": (2, "not valid JSON"), "unknown_node": (2, "NoSuchNode"),
         "unknown_node_editor": (2, "unknown node type 'NoSuchNode'"), "invalid_input": (2, "invalid"),
         "missing_checkpoint": (3, "not in"), "missing_models_folder": (3, "no such folder"),
         "models_is_a_file": (3, "no such folder"), "no_tiny_nothing_installed": (3, "installed: none"),
         "execution_fails": (4, "combines its conditionings itself"),
         "execution_fails_verbose": (4, "combines its conditionings itself")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_error_and_its_exit_code(case, tmp_path, comfy_host):
    args = ["run"]
    path = tmp_path / f"{case}.json"
    if case == "malformed":
        path.write_text('{"nodes": [')
    elif case == "unknown_node":
        path.write_text(json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}))
    elif case == "unknown_node_editor":
        path.write_text(json.dumps({"nodes": [{"id": 1, "type": "NoSuchNode", "inputs": [], "outputs": [],
                                               "widgets_values": []}], "links": [], "version": 0.4}))
    elif case == "invalid_input":
        prompt = _fails_while_sampling()
        prompt["7"]["inputs"]["steps"] = -3  # below the widget's minimum: ComfyUI's validator refuses it
        path.write_text(json.dumps(prompt))
    elif case.startswith("execution_fails"):
        path.write_text(json.dumps(_fails_while_sampling()))
        if case.endswith("verbose"):
            args = ["-v", *args]
    elif case == "missing_models_folder":
        path = WORKFLOW
        args += ["--models", str(tmp_path / "nowhere")]
    elif case == "models_is_a_file":
        path = WORKFLOW
        (tmp_path / "models.txt").write_text("not a folder")
        args += ["--models", str(tmp_path / "models.txt")]
    elif case == "no_tiny_nothing_installed":
        path = WORKFLOW
        (tmp_path / "models").mkdir()
        args += ["--no-tiny", "--models", str(tmp_path / "models")]
    else:
        path = WORKFLOW
        (tmp_path / "models" / "checkpoints").mkdir(parents=True)
        (tmp_path / "models" / "checkpoints" / "other.safetensors").write_bytes(b"")
        args += ["--no-tiny", "--models", str(tmp_path / "models")]
    proc = cli(*args, str(path), "--no-user-nodes", "--output", str(tmp_path / "out"))
    code, expected = CASES[case]
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert expected in errors[0], errors[0]
    assert not list((tmp_path / "out").glob("*.png"))  # a failed run saves nothing
    if case == "execution_fails_verbose":
        # -v shows ComfyUI's log, with the failing node's traceback, and the error line no longer points to -v
        assert "Traceback" in proc.stderr and "run with -v" not in errors[0]
    else:
        assert "Traceback" not in proc.stderr
        if case == "execution_fails":
            assert errors[0].endswith("(run with -v for the traceback)"), errors[0]


def test_check_reports_a_broken_workflow_and_exits_2(comfy_host, tmp_path):
    """`check` on a file with an unknown node and a good example: a table row per file, exit 2 (a bad workflow)."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}))
    proc = cli("check", str(bad), str(WORKFLOW))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = proc.stdout.splitlines()
    assert any("bad.json" in r and "unknown node type 'NoSuchNode'" in r for r in rows), proc.stdout
    assert any(WORKFLOW.name in r and r.rstrip().endswith("ok") for r in rows), proc.stdout
    assert rows[-1] == "1 of 2 workflow(s) fit the live node schemas"
