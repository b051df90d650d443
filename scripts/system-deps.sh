#!/usr/bin/env bash
# System packages the browser tests need: Debian's Chromium (Playwright drives it at
# /usr/bin/chromium; nothing downloads a browser) and its fonts. Skips what is present;
# without root or sudo it says so and the browser tests skip with that reason.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "system-deps: no root: install chromium and fonts-liberation yourself to run the browser tests" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
