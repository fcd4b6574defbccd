"""scripts/get_comfyui.sh: the set-up step that clones the tested ComfyUI release into ./.comfyui when no ComfyUI
checkout is found, and that says in one line what to do when it cannot (no network, no git) without failing.

The script runs for real in a subprocess, from a copy of the pack made in tmp_path, against a local bare repository
that stands in for ComfyUI's (PREPRINT_COMFY_REPO): nothing here reaches the network.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from preprint.runner import comfy_host

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "get_comfyui.sh"
GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed: the clone step cannot be exercised")


def release_tag() -> str:
    """The tag of the tested ComfyUI release: the minimum that pyproject's requires-comfyui names, as ComfyUI tags
    its releases (v0.3.64)."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^requires-comfyui\s*=\s*">=\s*(\d+\.\d+\.\d+)"', text, re.M)
    assert m, "pyproject.toml [tool.comfy] requires-comfyui should read \">=X.Y.Z\", the tested ComfyUI release"
    return "v" + m.group(1)


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run([GIT, *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def origin(tmp_path: Path) -> str:
    """A bare repository shaped like ComfyUI: the tested tag on one commit, a later commit on the default branch
    (so a clone that ignores the tag gets different files)."""
    work = tmp_path / "origin-work"
    (work / "comfy").mkdir(parents=True)
    (work / "comfy" / "samplers.py").write_text("# stand-in\n")
    (work / "nodes.py").write_text("# stand-in\n")
    (work / "release.txt").write_text("tested\n")
    git("init", "-q", "-b", "master", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "release", cwd=work)
    git("tag", release_tag(), cwd=work)
    (work / "release.txt").write_text("later\n")
    git("commit", "-q", "-am", "after the release", cwd=work)
    git("clone", "-q", "--bare", str(work), str(tmp_path / "origin.git"), cwd=tmp_path)
    return (tmp_path / "origin.git").as_uri()


@pytest.fixture
def pack(tmp_path: Path) -> Path:
    """A copy of the pack's scripts folder: the script clones into the folder above its own."""
    (tmp_path / "pack" / "scripts").mkdir(parents=True)
    shutil.copy2(SCRIPT, tmp_path / "pack" / "scripts" / SCRIPT.name)
    return tmp_path / "pack"


def run_script(pack: Path, **env: str) -> subprocess.CompletedProcess:
    # The caller's own settings of the script's variables must not leak into the test.
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PREPRINT_COMFY", "PREPRINT_NO_COMFY"))}
    full.update(env)
    return subprocess.run(["bash", str(pack / "scripts" / SCRIPT.name)], env=full, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def advice_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "host tests will be skipped" in line]


def leftovers(pack: Path) -> list[str]:
    return sorted(p.name for p in pack.iterdir() if p.name.startswith(".comfyui.partial"))


@needs_git
def test_clones_the_tested_tag_where_find_comfyui_looks(pack, origin, tmp_path, monkeypatch):
    monkeypatch.setattr(comfy_host, "PACK_DIR", pack)
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))  # this machine's own ~/ComfyUI must not answer
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert comfy_host.find_comfyui() is None

    r = run_script(pack, PREPRINT_COMFY_REPO=origin)
    assert r.returncode == 0, r.stdout + r.stderr
    dest = pack / ".comfyui"
    assert (dest / "release.txt").read_text() == "tested\n", "the default branch was cloned instead of the tag"
    assert git("describe", "--tags", "--exact-match", cwd=dest) == release_tag()
    assert git("rev-list", "--count", "HEAD", cwd=dest) == "1", "not a shallow clone"
    assert leftovers(pack) == []
    assert advice_lines(r.stdout) == []
    assert comfy_host.find_comfyui() == dest.resolve()

    # Set-up runs again on every main.sh / test.sh: a second run keeps the checkout and says so.
    again = run_script(pack, PREPRINT_COMFY_REPO=origin)
    assert again.returncode == 0 and "already cloned" in again.stdout
    assert (dest / "release.txt").read_text() == "tested\n"


@needs_git
@pytest.mark.parametrize(("url", "cause"), [
    ("http://127.0.0.1:9/ComfyUI.git", "unable to access"),  # nothing listens there: refused at once
    ("file:///nonexistent/ComfyUI.git", "does not appear to be a git repository"),
])
def test_unreachable_repository_says_what_to_do_in_one_line_and_succeeds(pack, url, cause):
    r = run_script(pack, PREPRINT_COMFY_REPO=url)
    assert r.returncode == 0, r.stderr
    lines = advice_lines(r.stdout)
    assert len(lines) == 1, r.stdout
    assert "could not be cloned" in lines[0] and "COMFYUI_PATH" in lines[0]
    assert cause in lines[0], "the line should carry git's reason"
    assert f"--branch {release_tag()}" in lines[0] and str(pack / ".comfyui") in lines[0]
    assert r.stderr == "", "git's own messages should be folded into the one line"
    assert not (pack / ".comfyui").exists() and leftovers(pack) == []


def fake_path(tmp_path: Path, git_script: str | None) -> str:
    """A PATH holding the tools the script uses, with `git` absent or replaced by ``git_script``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed", "mv", "rm", "timeout", "sleep"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    if git_script is not None:
        (bin_dir / "git").write_text("#!" + shutil.which("bash") + "\n" + git_script)
        (bin_dir / "git").chmod(0o755)
    return str(bin_dir)


def test_without_git_says_so(pack, tmp_path):
    r = run_script(pack, PATH=fake_path(tmp_path, None), PREPRINT_COMFY_REPO="file:///unused")
    assert r.returncode == 0, r.stderr
    lines = advice_lines(r.stdout)
    assert len(lines) == 1 and "git is not installed" in lines[0], r.stdout
    assert not (pack / ".comfyui").exists()


@pytest.mark.skipif(shutil.which("timeout") is None, reason="no `timeout` command here: the clone has no time limit")
def test_a_clone_that_hangs_is_stopped_at_the_time_limit(pack, tmp_path):
    r = run_script(pack, PATH=fake_path(tmp_path, "exec sleep 30\n"), PREPRINT_COMFY_REPO="file:///unused",
                   PREPRINT_COMFY_TIMEOUT="1")
    assert r.returncode == 0, r.stderr
    lines = advice_lines(r.stdout)
    assert len(lines) == 1 and "longer than 1 s" in lines[0], r.stdout
    assert not (pack / ".comfyui").exists() and leftovers(pack) == []


@needs_git
def test_opting_out_clones_nothing(pack, origin):
    r = run_script(pack, PREPRINT_COMFY_REPO=origin, PREPRINT_NO_COMFY_CLONE="1")
    assert r.returncode == 0
    lines = advice_lines(r.stdout)
    assert len(lines) == 1 and "PREPRINT_NO_COMFY_CLONE=1" in lines[0]
    assert not (pack / ".comfyui").exists()


@needs_git
def test_a_folder_in_the_way_is_left_alone(pack, origin):
    (pack / ".comfyui").mkdir()
    (pack / ".comfyui" / "mine.txt").write_text("keep me")
    r = run_script(pack, PREPRINT_COMFY_REPO=origin)
    assert r.returncode == 0
    lines = advice_lines(r.stdout)
    assert len(lines) == 1 and "not a ComfyUI checkout" in lines[0]
    assert (pack / ".comfyui" / "mine.txt").read_text() == "keep me"
    assert not (pack / ".comfyui" / "nodes.py").exists()
