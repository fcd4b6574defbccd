"""pyproject.toml as the ComfyUI registry reads it, so that an edit cannot silently break publishing.

The rules are those of comfy-cli's `comfy node validate` / `comfy node publish` (comfy_cli/registry/config_parser.py
and registry/api.py: a static non-empty version, the requires-comfyui version pattern, the license forms, the
Operating System / Environment classifiers it recognises, PublisherId and name present) and the registry's published
specification of the node id and version (docs.comfy.org/registry/specifications: the id is under 100 characters of
letters, digits, '-', '_' and '.', starts with a letter, has no two special characters in a row; the version is
X.Y.Z). comfy-cli only warns on several of these and then drops the field; here each is an error.
`scripts/validate_registry.sh` runs comfy-cli itself.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]

NAME = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[._-](?=[A-Za-z0-9]))*$")
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
# comfy-cli's validate_version pattern, applied to each comma-separated part.
VERSION_SPEC = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = ("GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal")
# The publisher id is part of the registry's URLs (/publishers/<id>/nodes/<name>).
PUBLISHER = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9]))*$")
ICON = re.compile(r"^https://\S+\.(?:svg|png|jpe?g|gif|webp)$", re.I)


def registry_problems(data: dict, root: Path = ROOT) -> list[str]:
    """Every way ``data`` (a parsed pyproject.toml) falls short of what the registry needs, one string each."""
    problems: list[str] = []
    project = data.get("project")
    if not isinstance(project, dict):
        return ["[project] table is missing"]

    name = project.get("name")
    if not isinstance(name, str) or not name:
        problems.append("[project] name (the registry's node id) is missing")
    elif len(name) >= 100 or not NAME.match(name):
        problems.append(f"[project] name {name!r}: under 100 characters of letters, digits, '-', '_', '.', starting "
                        "with a letter, no two special characters in a row")

    if "version" in project.get("dynamic", []):
        problems.append("[project] version is dynamic: give a static version (the registry posts it as is)")
    version = project.get("version")
    if not isinstance(version, str) or not SEMVER.match(version):
        problems.append(f"[project] version {version!r}: must be X.Y.Z")

    if not isinstance(project.get("description"), str) or not project["description"].strip():
        problems.append("[project] description is empty: it is the registry's summary of the pack")

    license_ = project.get("license")
    if isinstance(license_, str):
        if not license_.strip():
            problems.append("[project] license is empty")
    elif isinstance(license_, dict) and ("file" in license_ or "text" in license_):
        if "file" in license_ and not (root / license_["file"]).is_file():
            problems.append(f"[project] license file {license_['file']!r} does not exist")
    else:
        problems.append("[project] license: an SPDX string, {file = ...} or {text = ...}")

    urls = project.get("urls", {})
    repo = urls.get("Repository") if isinstance(urls, dict) else None
    if not isinstance(repo, str) or not repo.startswith("https://"):
        problems.append("[project.urls] Repository (an https URL) is required")

    for c in project.get("classifiers", []):
        if c.startswith("Operating System :: ") and not c[len("Operating System :: "):].startswith(OS_PREFIXES):
            problems.append(f"classifier {c!r}: the registry knows only {', '.join(OS_PREFIXES)}")
        if c.startswith("Environment ::") and c[len("Environment :: "):] not in ACCELERATORS:
            problems.append(f"classifier {c!r}: the registry knows only Environment :: " + ", ".join(ACCELERATORS))

    comfy = data.get("tool", {}).get("comfy")
    if not isinstance(comfy, dict):
        return problems + ["[tool.comfy] table is missing"]
    publisher = comfy.get("PublisherId")
    if not isinstance(publisher, str) or not PUBLISHER.match(publisher):
        problems.append(f"[tool.comfy] PublisherId {publisher!r}: lowercase letters, digits and single hyphens")
    if not isinstance(comfy.get("DisplayName"), str) or not comfy["DisplayName"].strip():
        problems.append("[tool.comfy] DisplayName is empty")
    icon = comfy.get("Icon", "")
    if not isinstance(icon, str) or (icon and not ICON.match(icon)):
        problems.append(f"[tool.comfy] Icon {icon!r}: empty, or an https URL of an svg/png/jpg/gif/webp image")
    spec = comfy.get("requires-comfyui")
    if not isinstance(spec, str) or not spec.strip():
        problems.append("[tool.comfy] requires-comfyui is empty: say which ComfyUI the pack is tested with")
    elif not all(VERSION_SPEC.match(part.strip()) for part in spec.split(",")):
        problems.append(f"[tool.comfy] requires-comfyui {spec!r}: [operator]X.Y.Z parts, comma-separated")
    for folder in comfy.get("includes", []):
        if not (root / folder).is_dir():
            problems.append(f"[tool.comfy] includes {folder!r}: no such folder")
    for model in comfy.get("Models", []):
        if not isinstance(model, dict) or not {"location", "model_url"} <= model.keys():
            problems.append("[tool.comfy] Models entries need location and model_url")
    return problems


def load(path: Path = ROOT / "pyproject.toml") -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def test_pyproject_meets_the_registry_rules():
    assert registry_problems(load()) == []


def test_a_broken_pyproject_copy_is_caught(tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    version = load()["project"]["version"]
    broken = text.replace(f'version = "{version}"', 'version = "0.1"', 1).replace('name = "', 'name = "1-', 1)
    assert broken != text
    (tmp_path / "pyproject.toml").write_text(broken)
    problems = registry_problems(load(tmp_path / "pyproject.toml"))
    assert any("version '0.1'" in p for p in problems), problems
    assert any("name '1-" in p for p in problems), problems


def _set(path: str, value):
    """A change to one key (dotted path) of the parsed pyproject; value None removes the key."""
    def apply(data: dict) -> None:
        *parents, key = path.split(".")
        table = data
        for p in parents:
            table = table.setdefault(p, {})
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return apply


BREAKS = {
    "name starts with a digit": (_set("project.name", "123-tool"), "[project] name"),
    "name with two special characters in a row": (_set("project.name", "preprint--nodes"), "[project] name"),
    "name ends with a special character": (_set("project.name", "preprint-"), "[project] name"),
    "name of 100 characters": (_set("project.name", "p" * 100), "[project] name"),
    "name with a space": (_set("project.name", "pre print"), "[project] name"),
    "name missing": (_set("project.name", None), "name (the registry's node id) is missing"),
    "version of two parts": (_set("project.version", "0.1"), "[project] version"),
    "version with a suffix": (_set("project.version", "0.1.0rc1"), "[project] version"),
    "version missing": (_set("project.version", None), "[project] version"),
    "version dynamic": (_set("project.dynamic", ["version"]), "version is dynamic"),
    "description empty": (_set("project.description", " "), "description"),
    "license table without file or text": (_set("project.license", {"name": "GPL"}), "[project] license"),
    "license file missing": (_set("project.license", {"file": "NO-SUCH-LICENSE"}), "does not exist"),
    "no Repository URL": (_set("project.urls.Repository", None), "Repository"),
    "unknown OS classifier": (_set("project.classifiers", ["Operating System :: Linux"]), "classifier"),
    "unknown accelerator classifier": (_set("project.classifiers", ["Environment :: GPU :: CUDA"]), "classifier"),
    "PublisherId empty": (_set("tool.comfy.PublisherId", ""), "PublisherId"),
    "PublisherId with capitals": (_set("tool.comfy.PublisherId", "Preprint"), "PublisherId"),
    "DisplayName missing": (_set("tool.comfy.DisplayName", None), "DisplayName"),
    "Icon not a URL": (_set("tool.comfy.Icon", "icon.png"), "Icon"),
    "requires-comfyui without patch": (_set("tool.comfy.requires-comfyui", ">=0.3"), "requires-comfyui"),
    "requires-comfyui empty": (_set("tool.comfy.requires-comfyui", ""), "requires-comfyui"),
    "includes a missing folder": (_set("tool.comfy.includes", ["no-such-folder"]), "includes"),
    "no [tool.comfy]": (_set("tool.comfy", None), "[tool.comfy] table is missing"),
}


@pytest.mark.parametrize("label", BREAKS)
def test_each_rule_catches_its_break(label):
    change, expected = BREAKS[label]
    data = copy.deepcopy(load())
    change(data)
    problems = registry_problems(data)
    assert any(expected in p for p in problems), f"{label}: {problems}"


def test_tested_comfyui_release_is_named_the_same_everywhere():
    """requires-comfyui's minimum is the release set-up clones (scripts/get_comfyui.sh) and the README names."""
    spec = load()["tool"]["comfy"]["requires-comfyui"]
    m = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)", spec)
    assert m, f"requires-comfyui {spec!r} should be '>=X.Y.Z', X.Y.Z the tested release"
    tested = m.group(1)
    assert f"PREPRINT_COMFY_TAG:-v{tested}}}" in (ROOT / "scripts" / "get_comfyui.sh").read_text()
    assert f"Tested against ComfyUI {tested}." in (ROOT / "README.md").read_text()
