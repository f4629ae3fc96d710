#!/usr/bin/env bash
# Sets up the CI host (or reuses it) and runs the test suite against it.
# With COMFYUI_PATH set, tests run against that ComfyUI instead (its Python env must have pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${ASDM_PYTHON:-$(bash scripts/setup_host.sh | tail -n 1)}"
bash scripts/setup_browser.sh
exec "$PY" -m pytest -q tests "$@"
