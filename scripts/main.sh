#!/usr/bin/env bash
# Sets up the CI host (or reuses it) and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${ASDM_PYTHON:-$(bash scripts/setup_host.sh | tail -n 1)}"
exec "$PY" scripts/main_job.py "$@"
