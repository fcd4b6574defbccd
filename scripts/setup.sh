#!/usr/bin/env bash
# Create the local environment (.venv) with torch, the test tools and this pack installed as `preprint`;
# when no ComfyUI checkout is found, clone the tested release into ./.comfyui (scripts/get_comfyui.sh: skipped
# with one line of advice when there is no network); then install ComfyUI's own requirements with torch pinned.
#   PREPRINT_TORCH            torch requirement(s) to install (default: torch==2.14.1 torchvision==0.29.1)
#   COMFYUI_PATH              ComfyUI checkout (default: the enclosing ComfyUI, else ./.comfyui, else ~/ComfyUI)
#   PREPRINT_NO_COMFY_CLONE=1 never clone ComfyUI (the host tests are then skipped when none is found)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${PREPRINT_VENV:-.venv}
TORCH_SPEC=${PREPRINT_TORCH:-"torch==2.14.1 torchvision==0.29.1"}

say() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true

want_torch=$(printf '%s' "$TORCH_SPEC" | sed -n 's/.*torch==\([^ ]*\).*/\1/p')
have_torch=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ -z "$have_torch" ] || { [ -n "$want_torch" ] && [ "$have_torch" != "$want_torch" ]; }; then
  say "installing $TORCH_SPEC (this can take a few minutes)"
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet $TORCH_SPEC
else
  say "torch $have_torch already installed"
fi
TORCH_PINS=$("$PY" - <<'PYEOF'
import importlib.metadata as m
pins = []
for name in ("torch", "torchvision"):
    try:
        pins.append(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
print(" ".join(pins))
PYEOF
)

say "installing the pack (editable) and the test tools"
# shellcheck disable=SC2086
"$PY" -m pip install --quiet -e ".[test]" $TORCH_PINS

find_comfy() { "$PY" -c 'from preprint.runner.comfy_host import find_comfyui; p = find_comfyui(); print(p or "")'; }
COMFY=$(find_comfy)
if [ -z "$COMFY" ]; then
  # Reports for itself (on failure, one line saying what to do) and never fails: without ComfyUI only the unit
  # tier runs.
  bash scripts/get_comfyui.sh
  COMFY=$(find_comfy)
fi
if [ -n "$COMFY" ]; then
  say "ComfyUI found at $COMFY: installing its requirements with $TORCH_PINS pinned"
  reqs=$(mktemp)
  # torch comes from the pins above; torchaudio is only needed by ComfyUI's audio nodes.
  grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~].*)?$' "$COMFY/requirements.txt" > "$reqs"
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet -r "$reqs" requests $TORCH_PINS
  rm -f "$reqs"
fi
# The browser tier drives the distribution's Chromium through Playwright (Playwright's own browser downloads are
# never used). Install Debian's package where this machine can; otherwise the tier is skipped with the reason.
if [ -n "$COMFY" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's chromium for the browser tier"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
      || say "could not install chromium (no network or no package): the browser tier will be skipped"
  else
    say "no Chromium found and no way to install it here: the browser tier will be skipped"
  fi
fi
say "done"
