#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test (tests/e2e/test_browser.py) when it is missing.
# Never fatal: without it the browser test is skipped and says why. No browser is downloaded
# from anywhere but the system's package manager.
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
