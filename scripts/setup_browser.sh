#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test (tests/e2e/test_browser.py) when it is missing,
# and the newest ComfyUI front end it also tests (comfyui-frontend-package from PyPI, into the
# cache; the host serves it with --front-end-root). Never fatal: without them the browser test
# (or its newest-front-end half) is skipped and says why. No browser is downloaded from anywhere
# but the system's package manager.
FRONT_END=1.58.1
DEST="${ASDM_CACHE:-$HOME/.cache/asdm-comfyui}/frontend-$FRONT_END"
if [ ! -f "$DEST/comfyui_frontend_package/static/index.html" ]; then
  echo "[setup_browser] installing comfyui-frontend-package $FRONT_END into $DEST" >&2
  rm -rf "$DEST"
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$DEST" \
    "comfyui-frontend-package==$FRONT_END" >&2 || echo "[setup_browser] the newest front end could not be installed" >&2
fi
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup_browser] not root or no apt-get: Chromium not installed; the browser test will be skipped" >&2
  exit 0
fi
echo "[setup_browser] installing Debian's chromium" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { timeout 600 apt-get update -qq && timeout 900 apt-get install -y -qq chromium; } >/dev/null 2>&1; then
  echo "[setup_browser] Chromium could not be installed; the browser test will be skipped" >&2
fi
exit 0
