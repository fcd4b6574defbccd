"""The command line without any ComfyUI: clear one-line errors, right exit codes, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m preprint`` from a copy of the pack's code outside any ComfyUI (a pack cloned into
    custom_nodes would otherwise always find the ComfyUI around it), with no ~/ComfyUI and no COMFYUI_PATH."""
    copy = tmp_path / "outside" / "preprint"
    if not copy.exists():
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".*", "__pycache__", "benchmarks", "tests",
                                                                  "workflows", "docs", "output", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["HOME"] = str(tmp_path)  # no ~/ComfyUI there
    env["PYTHONPATH"] = str(copy.parent)
    return subprocess.run([sys.executable, "-m", "preprint", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


def test_the_copy_is_what_runs(tmp_path):
    run_cli("--help", tmp_path=tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import preprint; print(preprint.__file__)"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "outside")}, cwd=tmp_path,
                          timeout=60)
    assert proc.stdout.strip().startswith(str(tmp_path / "outside" / "preprint")), proc.stdout + proc.stderr


@pytest.mark.parametrize("command", [["run", str(ROOT / "workflows" / "DPM-Solver++ 2M, SD1.5.json")], ["check"],
                                     ["build-workflows"], ["train-proving-ground", "--smoke"]],
                         ids=lambda c: c[0])
def test_without_comfyui_every_command_says_so_and_exits_3(tmp_path, command):
    """Exit 3 is a missing host: every command that needs ComfyUI says so in one line, before doing anything."""
    proc = run_cli(*command, tmp_path=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().startswith("error: no ComfyUI checkout found")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "COMFYUI_PATH" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("content,message", [('{"nodes": [', "not valid JSON"), ("[1, 2]", "neither an editor")])
def test_malformed_workflow_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "w.json"
    path.write_text(content)
    proc = run_cli("run", str(path), tmp_path=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_missing_file(tmp_path):
    proc = run_cli("run", str(tmp_path / "nope.json"), tmp_path=tmp_path)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_unreadable_workflow_is_exit_2(tmp_path):
    """A path that exists but cannot be read as a file (a folder) is a bad workflow, not a crash."""
    (tmp_path / "folder.json").mkdir()
    proc = run_cli("run", str(tmp_path / "folder.json"), tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "cannot read the file" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
