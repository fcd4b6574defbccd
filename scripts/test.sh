#!/usr/bin/env bash
# Run the tests: the unit tier always, the host tier when a ComfyUI checkout is found. Sets up first if needed.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${PREPRINT_VENV:-.venv}
if ! "$VENV/bin/python" -c 'import preprint, torch, pytest' >/dev/null 2>&1; then
  bash scripts/setup.sh || exit 1
fi
# The test models are tiny: one thread per process is faster than torch's default of one per core, which on a
# small machine spends more time synchronising threads than computing (and fights any other job for the cores).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PREPRINT_TIER_SUMMARY="${PREPRINT_TIER_SUMMARY:-$PWD/.pytest_tiers.json}"
rm -f "$PREPRINT_TIER_SUMMARY"
"$VENV/bin/python" -m pytest tests/unit tests/host tests/browser --durations=15 "$@"
status=$?
"$VENV/bin/python" - "$PREPRINT_TIER_SUMMARY" <<'PYEOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("tier summary: not available (pytest stopped before the end)")
    raise SystemExit(0)
def line(tier):
    c = data["counts"][tier]
    total = sum(c.values())
    parts = ", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "none"
    return f"{tier} tier: {total} test(s) ran ({parts})"
print(line("unit"))
if data["comfyui"]:
    print(line("host") + f" against ComfyUI at {data['comfyui']}")
else:
    print(f"host tier: SKIPPED, {data['host_skip_reason']}; set COMFYUI_PATH to a ComfyUI checkout to run it")
if data.get("browser_skip_reason"):
    print(f"browser tier: SKIPPED, {data['browser_skip_reason']}")
else:
    print(line("browser") + " in headless Chromium against a ComfyUI server")
PYEOF
exit $status
