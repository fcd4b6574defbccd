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
    import folder_paths

    if folder_paths.get_filename_list("checkpoints"):
        pytest.skip("this ComfyUI has checkpoints installed; the fallback applies only when none is")
    out = tmp_path / "out"
    # paths relative to the caller's directory, as users type them
    proc = cli("run", os.path.relpath(WORKFLOW, tmp_path), "--output", "out", "--no-user-nodes", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNTRAINED" in proc.stderr
    assert list(out.glob("*.png"))


def test_check_prints_a_table_of_every_example(comfy_host):
    proc = cli("check")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "DPM-Solver++ 2M, SD1.5.json" in proc.stdout
    assert "fit the live node schemas" in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize("case", ["malformed", "unknown_node", "missing_checkpoint"])
def test_bad_input_gives_one_line_error_and_non_zero_exit(case, tmp_path, comfy_host):
    args = ["run"]
    if case == "malformed":
        path = tmp_path / "bad.json"
        path.write_text('{"nodes": [')
    elif case == "unknown_node":
        path = tmp_path / "unknown.json"
        path.write_text(json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}))
    else:
        path = WORKFLOW
        args.append("--no-tiny")
    proc = cli(*args, str(path), "--no-user-nodes")
    assert proc.returncode in (2, 3), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    expected = {"malformed": "not valid JSON", "unknown_node": "NoSuchNode", "missing_checkpoint": "not in"}[case]
    assert expected in errors[0]
