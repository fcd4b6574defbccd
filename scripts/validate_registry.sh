#!/usr/bin/env bash
# Check the pack as the ComfyUI registry does before publishing: `comfy node validate` from comfy-cli (pyproject
# metadata, then its ruff security scan for exec / eval / several statements on one line). Not part of
# scripts/test.sh: it installs comfy-cli from PyPI once, into its own environment (.tools/comfy-cli, git-ignored),
# never into .venv. comfy-cli only warns on several faults and then leaves the field out of what it publishes, so any
# warning counts as a failure here.
#   bash scripts/validate_registry.sh [DIR]   DIR: the pack folder to check (default: this repository)
#   PREPRINT_COMFY_CLI   comfy-cli requirement to install (default: comfy-cli)
#   PYTHON               Python for the tool environment (default: python3)
# Exit status: 0 valid, 1 not valid, 2 comfy-cli could not be installed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
TOOL="$PWD/.tools/comfy-cli"
DIR=$(cd "${1:-.}" && pwd) || exit 1
say() { printf '[registry] %s\n' "$*"; }

if [ ! -x "$TOOL/bin/comfy" ]; then
  say "installing comfy-cli into $TOOL (once)"
  mkdir -p "$(dirname "$TOOL")"
  log="$TOOL.log"
  if "${PYTHON:-python3}" -m venv "$TOOL" >"$log" 2>&1 \
      && "$TOOL/bin/python" -m pip install --quiet "${PREPRINT_COMFY_CLI:-comfy-cli}" >>"$log" 2>&1; then
    rm -f "$log"
  else
    say "could not install comfy-cli (PyPI not reachable? see $log): run this again where PyPI can be" \
      "reached, or run 'comfy node validate' in $DIR with a comfy-cli of your own"
    rm -rf "$TOOL"  # a half-made environment would be taken for a working one next time
    exit 2
  fi
fi

# comfy-cli keeps its settings under ~/.config/comfy-cli: give it a home of its own so the user's are left alone;
# --skip-prompt answers its first-run question (usage tracking) with the default, off.
out=$(cd "$DIR" && HOME="$TOOL/home" "$TOOL/bin/comfy" --skip-prompt --no-json node validate </dev/null 2>&1)
status=$?
printf '%s\n' "$out"
if [ "$status" -ne 0 ]; then
  say "NOT VALID: comfy node validate failed (exit status $status); fix pyproject.toml as it says above"
  exit 1
fi
if printf '%s\n' "$out" | grep -qi 'warning'; then
  say "NOT VALID: comfy node validate passed with warnings; the registry would drop or reject what they name"
  exit 1
fi
say "valid: $DIR passes comfy node validate ($("$TOOL/bin/comfy" --version --no-json 2>/dev/null | tail -1))"
