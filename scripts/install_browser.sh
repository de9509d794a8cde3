#!/usr/bin/env bash
# Install the headless browser that tests/test_app_server.py::test_restore_in_a_real_browser drives: Debian's
# chromium and chromium-driver (selenium is given /usr/bin/chromedriver explicitly, so it never downloads a driver).
# Needs root (or sudo) and apt. Safe to run again: does nothing when both are installed. About 1 min, 120 MB.
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser.sh: apt-get not found; install Chromium and its chromedriver at /usr/bin/chromium and" \
       "/usr/bin/chromedriver by other means" >&2
  exit 1
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; then
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
fi
