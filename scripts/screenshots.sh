#!/usr/bin/env bash
# Draw every example workflow in ComfyUI's editor (headless Chromium): docs/workflows/<title>.png for the README
# and workflows/<title>.jpg, the thumbnail the Templates browser shows. Needs what the browser tier needs.
set -euo pipefail
cd "$(dirname "$0")/.."
PREPRINT_SCREENSHOTS=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/browser -q -k "loads_from_its_file" "$@"
