#!/usr/bin/env bash
# The main job on current ComfyUI (COMFYUI_PATH, else ../shared/hosts), else on the early-2024
# host; builds the host first when it is missing (scripts/setup_host.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! out="$(bash scripts/setup_host.sh current)"; then
  echo "[main] current ComfyUI not available here; running on the early-2024 host" >&2
  out="$(bash scripts/setup_host.sh early)"
fi
read -r PY COMFY <<<"$out"
COMFYUI_PATH="$COMFY" exec "$PY" scripts/main_job.py "$@"
