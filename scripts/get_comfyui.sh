#!/usr/bin/env bash
# Bring the tested ComfyUI release into ./.comfyui (git-ignored; runner/comfy_host.py find_comfyui looks there)
# for a machine that has no ComfyUI checkout. scripts/setup.sh calls this only when no checkout is found.
# Never fails: when the clone cannot be made (no git, no network) it prints one line saying what to do and exits 0,
# since the pack itself installs and its unit tests run without ComfyUI.
#   PREPRINT_NO_COMFY_CLONE=1   do not clone (say so in one line)
#   PREPRINT_COMFY_REPO         repository to clone (default: ComfyUI's own on GitHub)
#   PREPRINT_COMFY_TAG          release tag (default: the tested release, the minimum in pyproject's requires-comfyui)
#   PREPRINT_COMFY_TIMEOUT      seconds the clone may take (default 120)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=${PREPRINT_COMFY_REPO:-https://github.com/Comfy-Org/ComfyUI.git}
TAG=${PREPRINT_COMFY_TAG:-v0.3.64}
LIMIT=${PREPRINT_COMFY_TIMEOUT:-120}
DEST=.comfyui
HINT="set COMFYUI_PATH to a ComfyUI checkout, or run: git clone --depth 1 --branch $TAG $REPO $PWD/$DEST"

say() { printf '[setup] %s\n' "$*"; }
give_up() {
  say "no ComfyUI found and it could not be cloned ($1): $HINT; the host tests will be skipped"
  exit 0
}

if [ -f "$DEST/comfy/samplers.py" ] && [ -f "$DEST/nodes.py" ]; then
  say "ComfyUI already cloned at $PWD/$DEST"
  exit 0
fi
if [ -e "$DEST" ]; then
  # Never delete what may be someone's own files: say what is in the way instead.
  give_up "$PWD/$DEST exists but is not a ComfyUI checkout; remove it to let set-up clone there"
fi
if [ "${PREPRINT_NO_COMFY_CLONE:-0}" = "1" ]; then
  say "no ComfyUI found and PREPRINT_NO_COMFY_CLONE=1 asks not to clone it: $HINT; the host tests will be skipped"
  exit 0
fi
command -v git >/dev/null 2>&1 || give_up "git is not installed"

say "no ComfyUI checkout found: cloning ComfyUI $TAG into $PWD/$DEST"
# Clone beside the destination and move it in place only when complete, so an interrupted clone never leaves a
# half checkout that find_comfyui would take for ComfyUI. GIT_TERMINAL_PROMPT=0: an unreachable or private URL
# fails at once instead of waiting for a password.
PARTIAL="$DEST.partial.$$"
trap 'rm -rf "$PARTIAL"' EXIT
runner=()
if command -v timeout >/dev/null 2>&1; then runner=(timeout "$LIMIT"); fi
err=$(GIT_TERMINAL_PROMPT=0 ${runner[@]+"${runner[@]}"} git -c advice.detachedHead=false clone --quiet --depth 1 \
  --branch "$TAG" "$REPO" "$PARTIAL" 2>&1)
status=$?
if [ "$status" -ne 0 ]; then
  if [ "$status" -eq 124 ]; then give_up "the clone took longer than $LIMIT s"; fi
  # git's first "fatal:" line names the cause (host not resolved, connection refused, tag not found ...); what
  # follows it is general advice. Without one, its last line.
  reason=$(printf '%s\n' "$err" | sed -n 's/^fatal: //p' | sed -n 1p)
  # shellcheck disable=SC2016  # a sed script, not a shell expansion
  [ -n "$reason" ] || reason=$(printf '%s\n' "$err" | sed -n '/./h; ${x;p;}')
  give_up "git clone failed: ${reason:-exit status $status}"
fi
if [ ! -f "$PARTIAL/comfy/samplers.py" ] || [ ! -f "$PARTIAL/nodes.py" ]; then
  give_up "$REPO at $TAG does not look like ComfyUI (no comfy/samplers.py or nodes.py)"
fi
mv "$PARTIAL" "$DEST"
say "cloned ComfyUI $TAG into $PWD/$DEST"
