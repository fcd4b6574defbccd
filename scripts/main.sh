#!/usr/bin/env bash
# Set up, then run the main job: the DPM-Solver++ example workflow, headless, images written to ./output
# (on the pack's trained toy model when no checkpoint is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${PREPRINT_VENV:-.venv}
if "$VENV/bin/python" -c 'from preprint.runner.comfy_host import find_comfyui; raise SystemExit(find_comfyui() is None)'; then
  # With no checkpoint installed, the run shows the same sampler on the pack's trained toy model instead.
  "$VENV/bin/python" -m preprint run "${1:-workflows/DPM-Solver++ 2M, SD1.5.json}" --output output \
    --toy-workflow "workflows/Proving ground toy, DPM-Solver++ 2M, SD1.5 layout.json"
else
  echo "[main] no ComfyUI checkout found (COMFYUI_PATH, an enclosing ComfyUI, ./.comfyui, ~/ComfyUI): nothing to run the"
  echo "[main] workflow with. The pack is installed; run scripts/setup.sh (it clones ComfyUI into .comfyui when online) or set COMFYUI_PATH, then run this again."
fi
